/* test.h: the unit-test harness. Each test is a function; RUN prints one line per test,
 * "ok NAME", "not ok NAME" or "skip NAME: why", which tests/run.sh counts. A failed CHECK
 * prints where and what, and the test goes on so one run shows every failure. */
#ifndef DSV3_TEST_H
#define DSV3_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failed_, test_skipped_, test_any_failed_;
static char test_skip_why_[256];

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "    %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);   \
            test_failed_ = 1;                                                              \
        }                                                                                  \
    } while (0)

#define CHECKF(cond, ...)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "    %s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fputc('\n', stderr);                                                           \
            test_failed_ = 1;                                                              \
        }                                                                                  \
    } while (0)

/* Stops the current test early (after a failed CHECK the rest would only crash). */
#define REQUIRE(cond)                                                                      \
    do {                                                                                   \
        CHECK(cond);                                                                       \
        if (test_failed_)                                                                  \
            return;                                                                        \
    } while (0)

#define SKIP(...)                                                                          \
    do {                                                                                   \
        snprintf(test_skip_why_, sizeof test_skip_why_, __VA_ARGS__);                      \
        test_skipped_ = 1;                                                                 \
        return;                                                                            \
    } while (0)

#define RUN(fn)                                                                            \
    do {                                                                                   \
        test_failed_ = test_skipped_ = 0;                                                  \
        fflush(stdout);                                                                    \
        fn();                                                                              \
        if (test_failed_)                                                                  \
            test_any_failed_ = 1;                                                          \
        if (test_skipped_ && !test_failed_)                                                \
            printf("skip %s: %s\n", #fn, test_skip_why_);                                  \
        else                                                                               \
            printf("%s %s\n", test_failed_ ? "not ok" : "ok", #fn);                        \
        fflush(stdout);                                                                    \
    } while (0)

#define TEST_EXIT() return test_any_failed_ ? 1 : 0

/* Deterministic per-test randomness (splitmix64), seeded from DSV3_TEST_SEED or the time,
 * printed so a failure can be replayed: fresh inputs every run, reproducible on demand. */
static uint64_t test_rng_state_;

__attribute__((unused)) static uint64_t test_rand(void)
{
    uint64_t z = (test_rng_state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

#include <time.h>
static void test_seed(void)
{
    const char *s = getenv("DSV3_TEST_SEED");
    test_rng_state_ = s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)clock();
    fprintf(stderr, "# DSV3_TEST_SEED=%llu\n", (unsigned long long)test_rng_state_);
}

#endif
