/* cupti_util.h: what the two CUPTI tracers (tools/cupti_trace.c, an injection library, and
 * tests/bench/bench_train_kernels.c) share: readable kernel names and the activity buffers
 * CUPTI asks for. Header-only (static functions): the tracers link nothing of each other. */
#ifndef DSV3_CUPTI_UTIL_H
#define DSV3_CUPTI_UTIL_H

#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A readable kernel name: _Z<len><name> with a template's first integer argument
 * (moe_wgmma_kernel<1> -> moe_wgmma_kernel<1>); unmangled names (cuBLAS's) cut at 60. */
static void cupti_short_name(char *out, size_t cap, const char *m)
{
    if (!m) {
        snprintf(out, cap, "?");
        return;
    }
    if (m[0] == '_' && m[1] == 'Z') {
        const char *p = m + 2;
        p += *p == 'N';
        p += *p == 'L';
        char *end;
        long len = strtol(p, &end, 10);
        if (len > 0 && end != p && (size_t)len < cap - 8 && strlen(end) >= (size_t)len) {
            int w = snprintf(out, cap, "%.*s", (int)len, end);
            const char *t = end + len;
            if (t[0] == 'I' && t[1] == 'L' && t[2] == 'i')
                snprintf(out + w, cap - (size_t)w, "<%ld>", strtol(t + 3, NULL, 10));
            return;
        }
    }
    snprintf(out, cap, "%.60s", m);
}

/* CUPTI's request for an activity buffer: 8 MiB, as many records as fit. */
static void CUPTIAPI cupti_buf_request(uint8_t **buf, size_t *size, size_t *max_records)
{
    *size = (size_t)8 << 20;
    *buf = aligned_alloc(8, *size);
    *max_records = 0;
}

#endif
