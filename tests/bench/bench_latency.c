/* bench_latency: the latency floor of a chain of dependent GPU steps (kernels/latency.h):
 * what one hand-over costs with no bytes to move, as a graph of launches (one block or one
 * block a SM, plain or with programmatic dependent launch) and as the phases of one
 * persistent kernel. With a decode step's count of dependent steps and its bytes floor it
 * prints the time the hand-overs alone take and the most of the bytes floor a step can then
 * reach: floor / max(floor, hand-overs) if every byte streams during the hand-overs (weights
 * prefetched before each wait), floor / (floor + hand-overs) if none does. For docs/PERF.md (batch-1 decode).
 * Usage: bench_latency [N [STEPS FLOOR_US]]   N steps a chain (default 200); STEPS dependent
 * steps a decode step and FLOOR_US its bytes floor in microseconds (bench_sample_floor). */
#include <stdio.h>
#include <stdlib.h>

#include "../../kernels/latency.h"

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 200;
    int steps = argc > 3 ? atoi(argv[2]) : 0;
    double floor_us = argc > 3 ? atof(argv[3]) : 0;
    if (n < 1 || (argc > 3 && (steps < 1 || floor_us <= 0)) || argc == 3 || argc > 4) {
        fprintf(stderr, "usage: bench_latency [N [STEPS FLOOR_US]]\n");
        return 2;
    }
    gk_latency r;
    dsv3_err e = {0};
    if (gk_latency_probe(n, &r, &e)) {
        fprintf(stderr, "bench_latency: %s\n", e.msg);
        return 1;
    }
    struct {
        const char *name;
        double us;
    } rows[] = {
        {"graph, 1 block, plain launches", r.one_plain},
        {"graph, 1 block, PDL", r.one_pdl},
        {"graph, a block a SM (all-to-all), plain", r.wide_plain},
        {"graph, a block a SM (all-to-all), PDL", r.wide_pdl},
        {"persistent kernel, grid hand-over", r.phases},
    };
    printf("# latency of a dependent step, %d-step chains, %d SMs (median of replays)\n", n,
           r.sms);
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        printf("%-42s %6.2f us a step", rows[i].name, rows[i].us);
        if (steps)
        {
            double h = steps * rows[i].us;
            printf("; %d steps %7.1f us: at most %3.0f%% of the bytes floor (%3.0f%% with no"
                   " bytes read during a hand-over)",
                   steps, h, 100.0 * floor_us / (h > floor_us ? h : floor_us),
                   100.0 * floor_us / (floor_us + h));
        }
        printf("\n");
    }
    return 0;
}
