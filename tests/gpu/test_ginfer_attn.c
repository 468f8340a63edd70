/* GPU test of the decode attention over the latent cache (kernels/decode_attn.cu, through
 * ginfer_attn_run) against a CPU reference in double, on fresh random inputs: each case draws
 * the head count (ragged against the kernel's groups of 8), the latent and rope widths (1b-moe's
 * 256 + 32, V3's 512 + 64, the tiny models' 32 + 8, others), 1-3 rows in distinct slots at
 * positions whose lengths do not divide the part count (and some shorter than it: empty
 * parts), the part count and the cache type (bf16: the reference reads the same rounded
 * values). Checked: the warp-split scores (the default) and the serial dot each within
 * F32_BOUND (1e-4, relative, a (row, head) latent row) of the reference (the figures
 * printed); the warp-split result deterministic (two runs bitwise equal), the same bits
 * whether the parts are combined by the split kernel's last block or by the combine launch,
 * and the same bits from the kernel compiled for the row width (W = 160, 288, 576: small's
 * 128 + 32 is among the widths) as from the runtime loop (DSV3_GINFER_ATTN_NJ=0). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "gpu_test.h"

/* The value bf16 storage keeps of x (round to nearest even). */
static float bf16_round(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7fffu + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

static double gauss(void)
{
    double u = ((test_rand() >> 11) + 1) * 0x1p-53, v = (test_rand() >> 11) * 0x1p-53;
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

/* out[kv] = softmax_t(scale * (ql . c_t + qp . k_t)) weighted c_t over t <= pos. */
static void ref_head(const float *ql, const float *qp, const float *rows, int pos, int kv,
                     int rope, float scale, double *out, double *sc)
{
    int W = kv + rope;
    double mx = -INFINITY, sum = 0;
    for (int t = 0; t <= pos; t++) {
        const float *c = rows + (size_t)t * W;
        double d = 0;
        for (int j = 0; j < kv; j++)
            d += (double)ql[j] * c[j];
        for (int j = 0; j < rope; j++)
            d += (double)qp[j] * c[kv + j];
        sc[t] = d * scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    for (int j = 0; j < kv; j++)
        out[j] = 0;
    for (int t = 0; t <= pos; t++) {
        double p = exp(sc[t] - mx);
        sum += p;
        for (int j = 0; j < kv; j++)
            out[j] += p * rows[(size_t)t * W + j];
    }
    for (int j = 0; j < kv; j++)
        out[j] /= sum;
}

static void run_case(int cs)
{
    static const int widths[][2] = {{256, 32}, {512, 64}, {32, 8},  {64, 16},
                                    {128, 64}, {96, 24},  {128, 32}};
    static const int heads[] = {16, 5, 12, 8, 3, 20, 1};
    static const int splits[] = {64, 1, 3, 7, 64, 17};
    int kv = widths[cs % 7][0], rope = widths[cs % 7][1], W = kv + rope;
    int nh = heads[cs * 3 % 7], nsplit = splits[cs % 6], cf32 = cs % 2;
    int N = 1 + (int)(test_rand() % 3), n_slots = N + 1;
    int n_ctx = 200 + (int)(test_rand() % 1200);
    float scale = (float)(1 / sqrt(64.0 + rope));
    int slot[3], pos[3];
    for (int r = 0; r < N; r++) {
        slot[r] = (r + cs) % n_slots;
        /* lengths not multiples of the part count; one row shorter than it (empty parts) */
        int len = r == 1 ? 1 + (int)(test_rand() % (nsplit + 2))
                         : n_ctx / 2 + (int)(test_rand() % (n_ctx / 2));
        if (len % nsplit == 0 && nsplit > 1)
            len--;
        pos[r] = (len < 1 ? 1 : len > n_ctx ? n_ctx : len) - 1;
    }
    size_t nc = (size_t)n_slots * n_ctx * W, nq = (size_t)N * nh;
    float *cache = malloc(nc * sizeof *cache), *ql = malloc(nq * kv * sizeof *ql);
    float *qp = malloc(nq * rope * sizeof *qp), *o[5];
    double *ref = malloc(kv * sizeof *ref), *sc = malloc((size_t)n_ctx * sizeof *sc);
    for (int i = 0; i < 5; i++)
        o[i] = malloc(nq * kv * sizeof *o[i]);
    for (size_t i = 0; i < nc; i++)
        cache[i] = (float)gauss();
    if (!cf32)
        for (size_t i = 0; i < nc; i++)
            cache[i] = bf16_round(cache[i]);
    /* scores of std ~1-2: softmaxes neither uniform nor one-hot */
    for (size_t i = 0; i < nq * kv; i++)
        ql[i] = (float)(0.6 * gauss());
    for (size_t i = 0; i < nq * rope; i++)
        qp[i] = (float)(0.6 * gauss());
    dsv3_err e;
    /* 0: warp dot, combine launch; 1: again; 2: warp dot, fused combine; 3: serial dot;
     * 4: warp dot at a runtime row width */
    int ok = 1;
    const char *nj = getenv("DSV3_GINFER_ATTN_NJ");
    char *keep = nj ? strdup(nj) : NULL;
    for (int v = 0; v < 5 && ok; v++) {
        if (v == 4)
            setenv("DSV3_GINFER_ATTN_NJ", "0", 1);
        ok = ginfer_attn_run(ql, qp, cache, cf32, slot, pos, N, nh, kv, rope, n_ctx, n_slots,
                             nsplit, scale, v != 3, v == 2, o[v], &e) == 0;
        CHECKF(ok, "case %d variant %d: %s", cs, v, ok ? "" : e.msg);
    }
    if (keep)
        setenv("DSV3_GINFER_ATTN_NJ", keep, 1);
    else
        unsetenv("DSV3_GINFER_ATTN_NJ");
    free(keep);
    if (ok) {
        double worst[2] = {0, 0};
        for (int r = 0; r < N; r++)
            for (int h = 0; h < nh; h++) {
                size_t b = ((size_t)r * nh + h);
                ref_head(ql + b * kv, qp + b * rope, cache + (size_t)slot[r] * n_ctx * W, pos[r],
                         kv, rope, scale, ref, sc);
                for (int v = 0; v < 2; v++) {
                    const float *g = o[v == 0 ? 0 : 3] + b * kv;
                    double d = 0, s = 0;
                    for (int j = 0; j < kv; j++) {
                        d += (g[j] - ref[j]) * (g[j] - ref[j]);
                        s += ref[j] * ref[j];
                    }
                    double re = isfinite(d) ? sqrt(d / (s > 0 ? s : 1)) : INFINITY;
                    worst[v] = re > worst[v] ? re : worst[v];
                }
            }
        CHECKF(worst[0] <= F32_BOUND, "case %d (kv %d rope %d heads %d rows %d parts %d %s): warp dot "
               "rel err %.3g", cs, kv, rope, nh, N, nsplit, cf32 ? "fp32" : "bf16", worst[0]);
        CHECKF(worst[1] <= F32_BOUND, "case %d: serial dot rel err %.3g", cs, worst[1]);
        CHECKF(!memcmp(o[0], o[1], nq * kv * sizeof(float)), "case %d: warp dot not deterministic",
               cs);
        CHECKF(!memcmp(o[0], o[2], nq * kv * sizeof(float)),
               "case %d: fused combine differs from the combine launch", cs);
        CHECKF(!memcmp(o[0], o[4], nq * kv * sizeof(float)),
               "case %d (width %d): the compiled width differs from the runtime loop", cs, W);
        printf("# stat attn case %d kv %d rope %d heads %d rows %d parts %d %s pos %d..%d: "
               "warp %.2e serial %.2e\n", cs, kv, rope, nh, N, nsplit, cf32 ? "fp32" : "bf16",
               pos[0], pos[N - 1], worst[0], worst[1]);
    }
    for (int i = 0; i < 5; i++)
        free(o[i]);
    free(cache), free(ql), free(qp), free(ref), free(sc);
}

static void test_attention_cases(void)
{
    GT_NEED_GPU();
    for (int cs = 0; cs < 14; cs++)
        run_case(cs);
}

int main(void)
{
    test_seed();
    RUN(test_attention_cases);
    TEST_EXIT();
}
