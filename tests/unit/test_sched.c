/* Tests of lib/sched: the learning rate, the batch-size ramp and the switches at chosen
 * positions, against values worked by hand from the formulas in sched.h (DeepSeek-V3's own
 * numbers where the report gives them), plus the checks of inconsistent schedules. */
#include <math.h>

#include "../../lib/sched.h"
#include "../test.h"

#define NEAR(a, b) (fabs((a) - (b)) <= 1e-12 * fabs(b) + 1e-18)

static sched_pos at_step(uint64_t s)
{
    return (sched_pos){s, s * 1000};
}

static void test_lr_steps(void)
{
    sched_lr s = {SCHED_STEPS, 1e-3, 1e-4, 10, 100, 200, 300, 3e-5};
    static const struct { uint64_t step; double lr; } cases[] = {
        {0, 1e-4},           /* the first update: peak * 1/10, never 0 */
        {4, 5e-4},           /* peak * 5/10 */
        {9, 1e-3},           /* the update that ends the warm-up reaches the peak */
        {50, 1e-3},          /* constant */
        {100, 1e-3},         /* cosine starts at the peak */
        {125, 1e-4 + 0.9e-3 * 0.5 * (1 + 0.70710678118654752)},  /* cos(pi/4) */
        {150, 5.5e-4},       /* half way: the mean of peak and final */
        {199, 1e-4 + 0.9e-3 * 0.5 * (1 + cos(M_PI * 0.99))},
        {200, 1e-4},         /* the final rate */
        {299, 1e-4},
        {300, 3e-5},         /* the tail */
        {1000000, 3e-5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        double lr = sched_lr_at(&s, at_step(cases[i].step), 1000);
        CHECKF(NEAR(lr, cases[i].lr), "step %llu: %.17g, expected %.17g",
               (unsigned long long)cases[i].step, lr, cases[i].lr);
    }
    /* No decay given: constant after the warm-up; no warm-up: the peak from the start. */
    sched_lr c = {SCHED_STEPS, 2e-3, 0, 0, 0, 0, 0, 0};
    CHECK(sched_lr_at(&c, at_step(0), 1) == 2e-3 && sched_lr_at(&c, at_step(1u << 30), 1) == 2e-3);
}

/* V3's schedule in tokens: 2.2e-4 until 10T tokens, cosine to 2.2e-5 at 14.3T, then 2.2e-5
 * until 14.633T and 7.3e-6 for the rest. Warm-up 2K steps of 15360 x 4096 tokens. */
static void test_lr_tokens_v3(void)
{
    double step_tokens = 15360.0 * 4096;
    sched_lr s = {SCHED_TOKENS, 2.2e-4, 2.2e-5, 2000 * step_tokens, 10e12, 14.3e12, 14.633e12,
                  7.3e-6};
    sched_pos p = {0, 0};
    CHECK(NEAR(sched_lr_at(&s, p, (uint64_t)step_tokens), 2.2e-4 / 2000));
    p.tokens = (uint64_t)(999 * step_tokens);
    CHECK(NEAR(sched_lr_at(&s, p, (uint64_t)step_tokens), 2.2e-4 * 1000 / 2000));
    p.tokens = (uint64_t)5e12;
    CHECK(sched_lr_at(&s, p, (uint64_t)step_tokens) == 2.2e-4);
    p.tokens = (uint64_t)12.15e12;  /* the middle of the decay */
    CHECK(NEAR(sched_lr_at(&s, p, (uint64_t)step_tokens), (2.2e-4 + 2.2e-5) / 2));
    p.tokens = (uint64_t)14.5e12;
    CHECK(sched_lr_at(&s, p, (uint64_t)step_tokens) == 2.2e-5);
    p.tokens = (uint64_t)14.7e12;
    CHECK(sched_lr_at(&s, p, (uint64_t)step_tokens) == 7.3e-6);
    /* The step count does not matter in tokens. */
    p.step = 12345;
    CHECK(sched_lr_at(&s, p, (uint64_t)step_tokens) == 7.3e-6);
}

static void test_batch_ramp(void)
{
    /* V3: 3072 -> 15360 sequences over 469B tokens. */
    sched_ramp r = {SCHED_TOKENS, 3072, 15360, 469e9, 8};
    sched_pos p = {0, 0};
    CHECK(sched_batch_at(&r, p) == 3072);
    p.tokens = (uint64_t)234.5e9;
    CHECK(sched_batch_at(&r, p) == 9216);  /* half way */
    p.tokens = (uint64_t)100e9;
    /* 3072 + 12288 * 100/469 = 5692.04..., down to a multiple of 8: 5688 */
    CHECKF(sched_batch_at(&r, p) == 5688, "%llu", (unsigned long long)sched_batch_at(&r, p));
    p.tokens = (uint64_t)469e9;
    CHECK(sched_batch_at(&r, p) == 15360);
    p.tokens = (uint64_t)1e13;
    CHECK(sched_batch_at(&r, p) == 15360);
    /* In steps, no ramp, and a multiple larger than the batch: at least one multiple. */
    sched_ramp s = {SCHED_STEPS, 4, 16, 4, 1};
    CHECK(sched_batch_at(&s, at_step(0)) == 4 && sched_batch_at(&s, at_step(1)) == 7 &&
          sched_batch_at(&s, at_step(2)) == 10 && sched_batch_at(&s, at_step(4)) == 16);
    sched_ramp flat = {SCHED_STEPS, 0, 6, 0, 4};
    CHECK(sched_batch_at(&flat, at_step(0)) == 4);
    sched_ramp tiny = {SCHED_STEPS, 0, 2, 0, 4};
    CHECK(sched_batch_at(&tiny, at_step(0)) == 4);
}

static void test_switches(void)
{
    sched_switch lambda = {SCHED_TOKENS, 0.3, 0.1, 10e12};   /* MTP weight */
    sched_switch gamma = {SCHED_TOKENS, 0.001, 0.0, 14.3e12}; /* bias-update speed */
    sched_pos p = {0, (uint64_t)9.999e12};
    CHECK(sched_switch_at(&lambda, p) == 0.3 && sched_switch_at(&gamma, p) == 0.001);
    p.tokens = (uint64_t)10e12;
    CHECK(sched_switch_at(&lambda, p) == 0.1 && sched_switch_at(&gamma, p) == 0.001);
    p.tokens = (uint64_t)14.3e12;
    CHECK(sched_switch_at(&gamma, p) == 0.0);
    sched_switch never = {SCHED_STEPS, 0.5, 9, 0};
    CHECK(sched_switch_at(&never, at_step(1u << 30)) == 0.5);
    sched_switch steps = {SCHED_STEPS, 1, 2, 3};
    CHECK(sched_switch_at(&steps, at_step(2)) == 1 && sched_switch_at(&steps, at_step(3)) == 2);
}

static void test_lr_check(void)
{
    char buf[200];
    sched_lr ok = {SCHED_STEPS, 1e-3, 1e-4, 10, 100, 200, 0, 0};
    CHECK(sched_lr_check(&ok, buf, sizeof buf) == 0);
    sched_lr backwards = ok;
    backwards.decay_end = 50;
    CHECK(sched_lr_check(&backwards, buf, sizeof buf) == -1 && strstr(buf, "before it starts"));
    sched_lr inside = ok;
    inside.decay_start = 5;
    CHECK(sched_lr_check(&inside, buf, sizeof buf) == -1 && strstr(buf, "warm-up"));
    sched_lr neg = ok;
    neg.peak = -1;
    CHECK(sched_lr_check(&neg, buf, sizeof buf) == -1);
}

int main(void)
{
    test_seed();
    RUN(test_lr_steps);
    RUN(test_lr_tokens_v3);
    RUN(test_batch_ramp);
    RUN(test_switches);
    RUN(test_lr_check);
    TEST_EXIT();
}
