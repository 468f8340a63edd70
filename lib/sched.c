/* sched: learning-rate, batch-size and switch schedules (see sched.h). */
#include "sched.h"

#include <math.h>
#include <stdio.h>

double sched_at(sched_pos p, sched_unit u)
{
    return u == SCHED_TOKENS ? (double)p.tokens : (double)p.step;
}

double sched_lr_at(const sched_lr *s, sched_pos p, uint64_t step_tokens)
{
    double x = sched_at(p, s->unit);
    if (s->tail_start > 0 && x >= s->tail_start)
        return s->tail;
    if (x < s->warmup) {
        /* The update at x ends at x+1 (steps) or x+step_tokens (tokens): warm-up reaches the
         * peak with the update that ends at `warmup`. */
        double end = s->unit == SCHED_STEPS ? x + 1 : x + (double)step_tokens;
        return s->peak * (end < s->warmup ? end / s->warmup : 1.0);
    }
    if (s->decay_end <= 0 || x < s->decay_start)
        return s->peak;
    if (x >= s->decay_end)
        return s->final;
    double r = (x - s->decay_start) / (s->decay_end - s->decay_start);
    return s->final + (s->peak - s->final) * 0.5 * (1.0 + cos(M_PI * r));
}

uint64_t sched_batch_at(const sched_ramp *s, sched_pos p)
{
    uint64_t mult = s->multiple ? s->multiple : 1, b = s->final;
    double x = sched_at(p, s->unit);
    if (s->span > 0 && x < s->span)
        b = (uint64_t)floor((double)s->first +
                            ((double)s->final - (double)s->first) * (x / s->span));
    b -= b % mult;
    return b < mult ? mult : b;
}

double sched_switch_at(const sched_switch *s, sched_pos p)
{
    return s->at > 0 && sched_at(p, s->unit) >= s->at ? s->after : s->before;
}

int sched_lr_check(const sched_lr *s, char *buf, int n)
{
    if (!(s->peak >= 0) || !(s->final >= 0) || !(s->tail >= 0))
        return snprintf(buf, (size_t)n, "learning rates must be >= 0"), -1;
    if (s->decay_end > 0 && s->decay_end < s->decay_start)
        return snprintf(buf, (size_t)n, "the decay ends (%g) before it starts (%g)",
                        s->decay_end, s->decay_start), -1;
    if (s->decay_end > 0 && s->decay_start < s->warmup)
        return snprintf(buf, (size_t)n, "the decay starts (%g) inside the warm-up (%g)",
                        s->decay_start, s->warmup), -1;
    return 0;
}
