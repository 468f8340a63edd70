/* latency: what a dependent hand-over between GPU kernels or phases costs on this device,
 * with no bytes to move: the latency floor under batch-1 decode (docs/PERF.md). A decode step
 * is a chain of dependent steps (a GEMV needs all of the vector before it), so its time is at
 * least (hand-overs x the cost of one) whatever the bytes; these probes measure that cost.
 *
 * Each probe runs a chain of n steps in which step i reads what step i-1 wrote:
 *   one:  kernels of one block of 32 threads (a value passed on), in a CUDA graph;
 *   wide: kernels of one block per SM, 256 threads, each block reading the whole vector of
 *         SMs x 256 floats the kernel before wrote and writing its part (a GEMV's all-to-all
 *         dependence with no weights), in a CUDA graph;
 *   both plain and with programmatic dependent launch (griddepcontrol.wait at the kernel's
 *   start, launch_dependents right after: the next kernel's launch overlaps this one);
 *   phases: one persistent kernel of one block per SM whose n phases do the wide step's work,
 *         separated by a grid-wide hand-over on a growing counter (each block adds one after
 *         its writes, then waits for the count of the phase).
 * Times are the median over replays of (graph or kernel time) / n, in microseconds. */
#ifndef DSV3_LATENCY_H
#define DSV3_LATENCY_H

#include "../lib/err.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gk_latency {
    int sms;           /* blocks of the wide and persistent probes */
    double one_plain;  /* us a step */
    double one_pdl;
    double wide_plain;
    double wide_pdl;
    double phases;
} gk_latency;

/* Runs every probe with chains of n steps on the current device. */
int gk_latency_probe(int n, gk_latency *out, dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
