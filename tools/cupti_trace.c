/* cupti_trace: where a whole program's GPU time goes, idle time included, without touching
 * the program. A CUDA injection library (the driver loads it at cuInit when
 * CUDA_INJECTION64_PATH names it and calls InitializeInjection): it records every kernel,
 * memset and copy on the device and every runtime/driver API call on the host through
 * CUPTI's activity API (libcupti opened at run time: DSV3_CUPTI_LIB, else the usual names),
 * and at exit writes a report to DSV3_TRACE_OUT (default stderr):
 *   - the window: from the end of the N-th kernel whose name contains DSV3_TRACE_AFTER
 *     (e.g. "adamw:1": after the first optimizer step, so warm-up is left out; default: the
 *     whole run) to the end of the last kernel whose name contains DSV3_TRACE_UNTIL (e.g.
 *     "adamw": the last optimizer step, leaving the final checkpoint's copies out; default:
 *     the last kernel);
 *   - the device's busy time (union of intervals) and idle time in the window, the idle
 *     split into "host behind" (the next kernel's launch call returned after the device had
 *     gone idle) and "launch/dependency";
 *   - the largest idle gaps grouped by (previous kernel -> next kernel), each with the host
 *     API calls made during those gaps (what the host was doing while the device waited);
 *   - the kernels by total time;
 *   - with DSV3_TRACE_SEQ=1, every kernel of the window ("seq START END NAME", microseconds).
 * Used by scripts/trace-train.sh. A profiling tool for the device machine, not part of the
 * library or the programs. */
#define _GNU_SOURCE
#include "cupti_util.h"
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct krec {
    uint64_t start, end;
    uint32_t corr;
    char name[64];
} krec;

typedef struct arec {
    uint64_t start, end;
    uint32_t corr, cbid;
    int driver;
} arec;

/* CUPTI's callbacks carry no user pointer: the one trace of this process. */
static struct {
    krec *k;
    size_t nk, kcap;
    arec *a;
    size_t na, acap;
    CUptiResult (*reg)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc);
    CUptiResult (*enable)(CUpti_ActivityKind);
    CUptiResult (*flush)(uint32_t);
    CUptiResult (*next)(uint8_t *, size_t, CUpti_Activity **);
    CUptiResult (*cbname)(CUpti_CallbackDomain, uint32_t, const char **);
    uint64_t *queued; /* by correlation id: when the host's call that queued it returned */
    uint32_t nq;
} T;

static void add_kernel(uint64_t s, uint64_t e, uint32_t corr, const char *name)
{
    if (T.nk == T.kcap) {
        T.kcap = T.kcap ? 2 * T.kcap : 65536;
        T.k = realloc(T.k, T.kcap * sizeof *T.k);
    }
    krec *r = &T.k[T.nk++];
    r->start = s, r->end = e, r->corr = corr;
    cupti_short_name(r->name, sizeof r->name, name);
}

static void CUPTIAPI buf_complete(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size,
                                  size_t valid)
{
    (void)ctx, (void)stream, (void)size;
    CUpti_Activity *rec = NULL;
    while (T.next(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
            CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)rec;
            add_kernel(k->start, k->end, k->correlationId, k->name);
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
            CUpti_ActivityMemset4 *k = (CUpti_ActivityMemset4 *)rec;
            add_kernel(k->start, k->end, k->correlationId, "[memset]");
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
            CUpti_ActivityMemcpy6 *k = (CUpti_ActivityMemcpy6 *)rec;
            add_kernel(k->start, k->end, k->correlationId,
                       k->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "[memcpy HtoD]"
                       : k->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "[memcpy DtoH]"
                                                                        : "[memcpy]");
        } else if (rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME ||
                   rec->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
            CUpti_ActivityAPI *k = (CUpti_ActivityAPI *)rec;
            if (T.na == T.acap) {
                T.acap = T.acap ? 2 * T.acap : 65536;
                T.a = realloc(T.a, T.acap * sizeof *T.a);
            }
            T.a[T.na++] = (arec){k->start, k->end, k->correlationId, k->cbid,
                                 rec->kind == CUPTI_ACTIVITY_KIND_DRIVER};
        }
    }
    free(buf);
}

static int by_start_k(const void *a, const void *b)
{
    uint64_t x = ((const krec *)a)->start, y = ((const krec *)b)->start;
    return x < y ? -1 : x > y;
}

static int by_start_a(const void *a, const void *b)
{
    uint64_t x = ((const arec *)a)->start, y = ((const arec *)b)->start;
    return x < y ? -1 : x > y;
}

static const char *api_name(const arec *a)
{
    const char *n = NULL;
    if (T.cbname)
        T.cbname(a->driver ? CUPTI_CB_DOMAIN_DRIVER_API : CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &n);
    return n ? n : "?";
}

typedef struct named { char name[136]; double us, host_us; int n; } named;

static named *bump(named *v, size_t *n, size_t cap, const char *name, double us, double h)
{
    size_t j = 0;
    while (j < *n && strcmp(v[j].name, name))
        j++;
    if (j == *n) {
        if (*n == cap)
            return NULL;
        snprintf(v[(*n)++].name, sizeof v[j].name, "%s", name);
    }
    v[j].us += us, v[j].host_us += h, v[j].n++;
    return &v[j];
}

static int by_us(const void *a, const void *b)
{
    double x = ((const named *)a)->us, y = ((const named *)b)->us;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* The first kernel index of the window. */
static size_t window_start(void)
{
    const char *after = getenv("DSV3_TRACE_AFTER");
    if (!after || !*after)
        return 0;
    char pat[64];
    snprintf(pat, sizeof pat, "%s", after);
    char *colon = strchr(pat, ':');
    long nth = 1;
    if (colon) {
        *colon = 0;
        nth = strtol(colon + 1, NULL, 10);
    }
    for (size_t i = 0; i < T.nk; i++)
        if (strstr(T.k[i].name, pat) && --nth <= 0)
            return i + 1;
    return T.nk;
}

/* One past the last kernel of the window. */
static size_t window_end(size_t w0)
{
    const char *until = getenv("DSV3_TRACE_UNTIL");
    if (!until || !*until)
        return T.nk;
    for (size_t i = T.nk; i > w0; i--)
        if (strstr(T.k[i - 1].name, until))
            return i;
    return T.nk;
}

static void report(void)
{
    T.flush(1);
    const char *path = getenv("DSV3_TRACE_OUT");
    FILE *f = path && *path ? fopen(path, "w") : stderr;
    if (!f)
        f = stderr;
    qsort(T.k, T.nk, sizeof *T.k, by_start_k);
    qsort(T.a, T.na, sizeof *T.a, by_start_a);
    for (size_t i = 0; i < T.na; i++)
        if (T.a[i].corr >= T.nq)
            T.nq = T.a[i].corr + 1;
    T.queued = calloc(T.nq ? T.nq : 1, sizeof *T.queued);
    for (size_t i = 0; i < T.na; i++)
        if (T.a[i].end > T.queued[T.a[i].corr])
            T.queued[T.a[i].corr] = T.a[i].end;
    size_t w0 = window_start(), w1 = window_end(w0);
    if (w0 + 1 >= w1) {
        fprintf(f, "# cupti_trace: %zu kernels, none in the window\n", T.nk);
        return;
    }
    enum { CAP = 4096 };
    named *pairs = calloc(CAP, sizeof *pairs), *apis = calloc(CAP, sizeof *apis),
          *kern = calloc(CAP, sizeof *kern);
    size_t np = 0, napi = 0, nkern = 0;
    uint64_t t0 = T.k[w0].start, maxend = T.k[w0].end;
    double busy = (T.k[w0].end - T.k[w0].start) * 1e-3, idle = 0, host = 0, api_in_gaps = 0;
    int big = 0;
    size_t ai = 0;
    bump(kern, &nkern, CAP, T.k[w0].name, busy, 0);
    for (size_t i = w0 + 1; i < w1; i++) {
        krec *r = &T.k[i];
        bump(kern, &nkern, CAP, r->name, (r->end - r->start) * 1e-3, 0);
        if (r->start > maxend) {
            double us = (r->start - maxend) * 1e-3;
            uint64_t q = r->corr < T.nq ? T.queued[r->corr] : 0;
            double h = q > maxend ? (q - maxend) * 1e-3 : 0;
            h = h > us ? us : h;
            idle += us, host += h;
            if (us > 50) {
                big++;
                char pair[136];
                snprintf(pair, sizeof pair, "%s -> %s", T.k[i - 1].name, r->name);
                bump(pairs, &np, CAP, pair, us, h);
                /* the host's calls while the device waited (their overlap with the gap;
                 * a call begun shortly before it, such as a synchronisation, included) */
                while (ai < T.na && T.a[ai].start < maxend)
                    ai++;
                for (size_t j = ai > 256 ? ai - 256 : 0; j < T.na && T.a[j].start < r->start; j++) {
                    uint64_t s0 = T.a[j].start > maxend ? T.a[j].start : maxend;
                    uint64_t e = T.a[j].end < r->start ? T.a[j].end : r->start;
                    if (e <= s0)
                        continue;
                    double d = (e - s0) * 1e-3;
                    api_in_gaps += T.a[j].driver ? 0 : d;
                    bump(apis, &napi, CAP, api_name(&T.a[j]), d, 0);
                }
            }
        }
        if (r->end > maxend) {
            busy += (r->end - (r->start > maxend ? r->start : maxend)) * 1e-3;
            maxend = r->end;
        }
    }
    double span = (maxend - t0) * 1e-3;
    fprintf(f, "# cupti_trace window: %zu of %zu kernels (after %s, until %s), span %.3f ms, device busy "
               "%.3f ms (%.1f%%), idle %.3f ms: host behind %.3f ms, launch/dependency %.3f ms; "
               "%d gaps over 50 us\n",
            w1 - w0, T.nk, getenv("DSV3_TRACE_AFTER") ? getenv("DSV3_TRACE_AFTER") : "start",
            getenv("DSV3_TRACE_UNTIL") ? getenv("DSV3_TRACE_UNTIL") : "the end",
            span * 1e-3, busy * 1e-3, 100 * busy / span, idle * 1e-3, host * 1e-3,
            (idle - host) * 1e-3, big);
    qsort(pairs, np, sizeof *pairs, by_us);
    fprintf(f, "## gaps over 50 us by kernel pair: count, idle ms, of it host behind ms\n");
    for (size_t j = 0; j < np && j < 25; j++)
        fprintf(f, "gap %-100s %5d %9.3f %9.3f\n", pairs[j].name, pairs[j].n, pairs[j].us * 1e-3,
                pairs[j].host_us * 1e-3);
    qsort(apis, napi, sizeof *apis, by_us);
    fprintf(f, "## host calls during those gaps (runtime calls %.3f ms): name, calls, ms\n",
            api_in_gaps * 1e-3);
    for (size_t j = 0; j < napi && j < 20; j++)
        fprintf(f, "api %-60s %6d %9.3f\n", apis[j].name, apis[j].n, apis[j].us * 1e-3);
    qsort(kern, nkern, sizeof *kern, by_us);
    fprintf(f, "## kernels in the window: name, calls, ms, share of busy\n");
    for (size_t j = 0; j < nkern && j < 40; j++)
        fprintf(f, "k %-60s %6d %9.3f %6.2f%%\n", kern[j].name, kern[j].n, kern[j].us * 1e-3,
                100 * kern[j].us / busy);
    if (getenv("DSV3_TRACE_SEQ") && *getenv("DSV3_TRACE_SEQ") != '0') {
        /* every kernel of the window in start order, microseconds from the window's first
         * start: what scripts/trace-decode.sh orders into a decode step's chain */
        fprintf(f, "## the window's kernels: seq start_us end_us name\n");
        for (size_t i = w0; i < w1; i++)
            fprintf(f, "seq %.3f %.3f %s\n", (T.k[i].start - t0) * 1e-3,
                    (T.k[i].end - t0) * 1e-3, T.k[i].name);
    }
    if (f != stderr)
        fclose(f);
    free(pairs), free(apis), free(kern), free(T.queued);
}

int InitializeInjection(void);

int InitializeInjection(void)
{
    const char *env = getenv("DSV3_CUPTI_LIB");
    const char *names[] = {env, "libcupti.so.13", "libcupti.so",
                           "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13",
                           "/usr/local/cuda/lib64/libcupti.so.13"};
    void *h = NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names && !h; i++)
        if (names[i])
            h = dlopen(names[i], RTLD_NOW);
    if (!h) {
        fprintf(stderr, "cupti_trace: cannot open libcupti (set DSV3_CUPTI_LIB)\n");
        return 0;
    }
    *(void **)&T.reg = dlsym(h, "cuptiActivityRegisterCallbacks");
    CUptiResult (*enable)(CUpti_ActivityKind);
    *(void **)&enable = dlsym(h, "cuptiActivityEnable");
    *(void **)&T.flush = dlsym(h, "cuptiActivityFlushAll");
    *(void **)&T.next = dlsym(h, "cuptiActivityGetNextRecord");
    *(void **)&T.cbname = dlsym(h, "cuptiGetCallbackName");
    if (!T.reg || !enable || !T.flush || !T.next || T.reg(cupti_buf_request, buf_complete)) {
        fprintf(stderr, "cupti_trace: libcupti lacks the activity API\n");
        return 0;
    }
    const CUpti_ActivityKind kinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                        CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_MEMCPY,
                                        CUPTI_ACTIVITY_KIND_RUNTIME, CUPTI_ACTIVITY_KIND_DRIVER};
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++)
        enable(kinds[i]);
    atexit(report);
    return 1;
}
