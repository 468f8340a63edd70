/* sched: the training schedules of DeepSeek-V3 (report section 4.2) as pure functions of
 * the training position.
 *
 * A position is measured in steps or in tokens (sched_unit); every schedule takes the
 * position in its own unit, so a run can state its warm-up in steps and its decay in tokens.
 * Owns:
 *  - the learning rate: linear warm-up to the peak, constant, cosine decay to the final rate,
 *    then constant at the final rate, optionally dropping to a last rate for a tail
 *    (V3: 0 -> 2.2e-4 over 2K steps, constant to 10T tokens, cosine to 2.2e-5 over 4.3T,
 *    2.2e-5 for 333B tokens, 7.3e-6 for the last 167B);
 *  - the batch-size ramp: linear from a first to a final batch (sequences) over a span
 *    (V3: 3072 -> 15360 over the first 469B tokens), rounded down to a multiple of a step;
 *  - piecewise-constant values (the MTP loss weight lambda: 0.3 then 0.1 after 10T tokens;
 *    the bias-update speed gamma: 0.001 then 0 for the last 500B tokens). */
#ifndef DSV3_SCHED_H
#define DSV3_SCHED_H

#include <stdint.h>

typedef enum { SCHED_STEPS, SCHED_TOKENS } sched_unit;

/* A training position: updates done and tokens consumed by them. */
typedef struct sched_pos {
    uint64_t step, tokens;
} sched_pos;

/* The position x in unit u. */
double sched_at(sched_pos p, sched_unit u);

typedef struct sched_lr {
    sched_unit unit;
    double peak, final;         /* final: the rate after the decay */
    double warmup;              /* x in [0, warmup): peak * (x+1)/warmup in steps, x/warmup in tokens */
    double decay_start, decay_end;  /* cosine from peak at decay_start to final at decay_end */
    double tail_start, tail;    /* x >= tail_start (> 0): the rate is tail; tail_start 0: none */
} sched_lr;

/* The learning rate of the update that starts at position p (with the tokens it will
 * consume counted in: the first update's rate is peak/warmup, never 0). */
double sched_lr_at(const sched_lr *s, sched_pos p, uint64_t step_tokens);

typedef struct sched_ramp {
    sched_unit unit;
    uint64_t first, final;  /* sequences per update */
    double span;            /* first at x = 0, final from x = span on; 0: always final */
    uint64_t multiple;      /* result rounded down to a multiple of this (>= 1), at least one */
} sched_ramp;

uint64_t sched_batch_at(const sched_ramp *s, sched_pos p);

typedef struct sched_switch {
    sched_unit unit;
    double before, after;
    double at;              /* x < at: before; else after. at <= 0: always before */
} sched_switch;

double sched_switch_at(const sched_switch *s, sched_pos p);

/* Checks a schedule's fields against each other; message into buf (returns -1). */
int sched_lr_check(const sched_lr *s, char *buf, int n);

#endif
