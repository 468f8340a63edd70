/* GPU test of kernels/attention: the fused causal attention, forward (output and log-sum-
 * exp) and backward (dq, dk, dv), against lib/ops attention_forward/backward on fresh
 * random bf16 inputs: MLA's head dims 192/128, the small configs' 96/64 and 24/16, sequence
 * lengths that are not multiples of the 64-row tile; and masked by document (ragged packed
 * documents) against lib/ops attention_*_seg, the fused backward candidates (DSV3_ATTN_BWD
 * 9, 10) and the deterministic ones 12, 16, 17 (and 18-22: the warp-specialised dQ and
 * dK/dV kernels, also against 17's bits at T = 4096) on both, and the default pick by
 * gpu_attention_set_nondet (the same bits run to run unless set; the fused backward for
 * documents when set). With DSV3_GPU_BENCH=1 also
 * timings on
 * V3 and 1B-MoE shapes against the measured matrix rate. */
#include "../../kernels/attention.h"
#include "../../kernels/gemm.h"
#include "../../lib/ops.h"
#include "bench.h"

/* forward variants (gpu_attention_set_variant): 0 the default (on sm_90 the warp-specialised
 * TMA forward, head dim 96 kept), 1 and 2 mma.sync, 3 the pipelined wgmma forward, 4 and 5
 * the warp-specialised forward (4: head dim 96 padded to 128), 6 the wgmma forward that was
 * the default before */
#define NVAR 7

static void attention_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    /* ragged T (not multiples of the 64- and 128-row tiles), head dims below the padded
     * instantiation (160/120 in 192/128, 80/48 in 96/64); T=700 at 96/64: 11 tiles of 64,
     * so the four-stage rings of the Hopper backward wrap around twice; 400 and 333 with B > 1:
     * the warp-specialised forward's two- and three-stage rings wrap, its 4-D tensor maps
     * zero-fill each sequence's last tile */
    static const int sh[][5] = {{1, 1, 1, 192, 128},  {2, 65, 3, 192, 128}, {1, 200, 2, 96, 64},
                                {2, 37, 4, 24, 16},   {1, 128, 2, 192, 128}, {1, 130, 1, 32, 32},
                                {1, 257, 2, 192, 128}, {2, 190, 3, 96, 64},  {1, 129, 2, 160, 120},
                                {1, 150, 2, 80, 48},   {1, 700, 2, 96, 64},  {2, 400, 2, 192, 128},
                                {3, 333, 3, 96, 64}};
    double wo = 0, wl = 0, wq = 0, wk = 0, wv = 0;
    /* DSV3_ATTN_QUICK=1: the default kernels only (under compute-sanitizer) */
    const int quick = getenv("DSV3_ATTN_QUICK") != NULL;
    double w0[5] = {0, 0, 0, 0, 0}; /* variant 0 alone: the default kernels */
    for (size_t s = 0; s < NVAR * (sizeof sh / sizeof sh[0]); s++) {
        /* every shape under each kernel variant (gpu_attention_set_variant) */
        int variant = (int)(s / (sizeof sh / sizeof sh[0]));
        gpu_attention_set_variant(gt_ctx_, variant);
        size_t si = s % (sizeof sh / sizeof sh[0]);
        int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
        if ((variant > 0 && dk <= 32) || (quick && variant != 0))
            continue;
        float scale = 1.0f / sqrtf((float)dk) * 1.1f;
        size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv, nl = (size_t)B * nh * T;
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
        float *dout = gt_rand_bf(nv, 1);
        gpu_bf16 *gq = gt_up_bf(q, nq), *gk = gt_up_bf(k, nq), *gv = gt_up_bf(v, nv);
        gpu_bf16 *gdo = gt_up_bf(dout, nv), *go = gt_poisoned(nv * 2);
        gpu_bf16 *gdq = gt_poisoned(nq * 2), *gdk = gt_poisoned(nq * 2), *gdv = gt_poisoned(nv * 2);
        float *glse = gt_poisoned(nl * 4);
        REQUIRE(gq && gk && gv && gdo && go && gdq && gdk && gdv && glse);
        CHECKF(gpu_attention_fwd(gt_ctx_, go, glse, gq, gk, gv, B, T, nh, dk, dv, scale, &e) == 0,
               "%s", e.msg);
        CHECKF(gpu_attention_bwd(gt_ctx_, gdq, gdk, gdv, gdo, go, glse, gq, gk, gv, B, T, nh, dk,
                                 dv, scale, &e) == 0,
               "%s", e.msg);
        float *o = gt_down_bf(go, nv), *lse = gt_down_f(glse, nl);
        float *dq = gt_down_bf(gdq, nq), *dk_ = gt_down_bf(gdk, nq), *dv_ = gt_down_bf(gdv, nv);
        float *ro = gt_zeros(nv), *att = gt_zeros((size_t)B * nh * T * T), *rlse = gt_zeros(nl);
        float *rdq = gt_zeros(nq), *rdk = gt_zeros(nq), *rdv = gt_zeros(nv);
        attention_forward(ro, att, q, k, v, B, T, nh, dk, dv, scale);
        attention_backward(rdq, rdk, rdv, dout, att, q, k, v, B, T, nh, dk, dv, scale);
        for (int b = 0; b < B; b++)
            for (int h = 0; h < nh; h++)
                for (int i = 0; i < T; i++) {
                    double mx = -INFINITY, z = 0;
                    const float *qi = q + (((size_t)b * T + i) * nh + h) * dk;
                    double sc[T];
                    for (int j = 0; j <= i; j++) {
                        const float *kj = k + (((size_t)b * T + j) * nh + h) * dk;
                        double d = 0;
                        for (int c = 0; c < dk; c++)
                            d += (double)qi[c] * kj[c];
                        sc[j] = d * scale;
                        mx = sc[j] > mx ? sc[j] : mx;
                    }
                    for (int j = 0; j <= i; j++)
                        z += exp(sc[j] - mx);
                    rlse[((size_t)b * nh + h) * T + i] = (float)(mx + log(z));
                }
        double a = gt_relerr(o, ro, nv), bl = gt_relerr(lse, rlse, nl), c = gt_relerr(dq, rdq, nq);
        double d = gt_relerr(dk_, rdk, nq), f = gt_relerr(dv_, rdv, nv);
        wo = a > wo ? a : wo, wl = bl > wl ? bl : wl, wq = c > wq ? c : wq;
        wk = d > wk ? d : wk, wv = f > wv ? f : wv;
        if (variant == 0) {
            double r[5] = {a, bl, c, d, f};
            for (int x = 0; x < 5; x++)
                w0[x] = r[x] > w0[x] ? r[x] : w0[x];
        }
        CHECKF(a <= BF16_BOUND && bl <= F32_BOUND && c <= BF16_BOUND && d <= BF16_BOUND &&
                   f <= BF16_BOUND,
               "variant %d B=%d T=%d nh=%d dk=%d dv=%d: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e",
               variant, B, T, nh, dk, dv, a, bl, c, d, f);
        free(q), free(k), free(v), free(dout), free(o), free(lse), free(dq), free(dk_), free(dv_);
        free(ro), free(att), free(rlse), free(rdq), free(rdk), free(rdv);
        gt_reset(mark);
    }
    gpu_attention_set_variant(gt_ctx_, 0);
    gt_stat("attention default (sm90 wgmma) fwd out", w0[0], BF16_BOUND);
    gt_stat("attention default (sm90 wgmma) fwd lse", w0[1], F32_BOUND);
    gt_stat("attention default (sm90 wgmma) bwd dq", w0[2], BF16_BOUND);
    gt_stat("attention default (sm90 wgmma) bwd dk", w0[3], BF16_BOUND);
    gt_stat("attention default (sm90 wgmma) bwd dv", w0[4], BF16_BOUND);
    gt_stat("attention fwd out (6 variants)", wo, BF16_BOUND);
    gt_stat("attention fwd lse", wl, F32_BOUND);
    gt_stat("attention bwd dq", wq, BF16_BOUND);
    gt_stat("attention bwd dk", wk, BF16_BOUND);
    gt_stat("attention bwd dv", wv, BF16_BOUND);
}

/* Attention masked by document (gpu_attention_*_seg) against lib/ops attention_*_seg:
 * ragged documents (1 to 70 tokens, numbers going on across sequences; some length-1)
 * crossing the 64-row tiles, under each forward variant (0, 3, 4 and 5 on Hopper: the wgmma
 * kernels; 3 takes 0's for documents). The last shapes take documents of up to 300 tokens (sixth column 1), so whole
 * 64- and 128-row tiles lie inside one document (only the causal mask) and tiles lie before
 * a query tile's document (skipped). */
static void attention_segments_match_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][6] = {{2, 150, 2, 192, 128, 0}, {1, 200, 2, 96, 64, 0},
                                {3, 37, 4, 24, 16, 0},    {1, 130, 1, 32, 32, 0},
                                {2, 517, 2, 192, 128, 1}, {2, 450, 2, 96, 64, 1},
                                {1, 300, 1, 160, 120, 1}, {1, 900, 2, 96, 64, 1}};
    double wo = 0, wq = 0, wk = 0, wv = 0;
    const int quick = getenv("DSV3_ATTN_QUICK") != NULL; /* the default kernels only */
    for (size_t s = 0; s < NVAR * (sizeof sh / sizeof sh[0]); s++) {
        int variant = (int)(s / (sizeof sh / sizeof sh[0]));
        gpu_attention_set_variant(gt_ctx_, variant);
        size_t si = s % (sizeof sh / sizeof sh[0]);
        int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
        if ((variant > 0 && dk <= 32) || (quick && variant != 0))
            continue;
        float scale = 1.0f / sqrtf((float)dk);
        size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv, nl = (size_t)B * nh * T;
        int32_t *seg = malloc((size_t)B * T * 4);
        REQUIRE(seg);
        int32_t doc = (int32_t)(test_rand() % 5);
        const int longest = sh[si][5] ? 300 : 70;
        for (int b = 0; b < B; b++)
            for (int t = 0, left = 0; t < T; t++) {
                if (left == 0) {
                    doc++;
                    left = test_rand() % 4 == 0 ? 1 : 1 + (int)(test_rand() % longest);
                }
                seg[(size_t)b * T + t] = doc;
                left--;
            }
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
        float *dout = gt_rand_bf(nv, 1);
        gpu_bf16 *gq = gt_up_bf(q, nq), *gk = gt_up_bf(k, nq), *gv = gt_up_bf(v, nv);
        gpu_bf16 *gdo = gt_up_bf(dout, nv), *go = gt_poisoned(nv * 2);
        gpu_bf16 *gdq = gt_poisoned(nq * 2), *gdk = gt_poisoned(nq * 2), *gdv = gt_poisoned(nv * 2);
        float *glse = gt_poisoned(nl * 4);
        int32_t *gseg = gt_up(seg, (size_t)B * T * 4);
        REQUIRE(gq && gk && gv && gdo && go && gdq && gdk && gdv && glse && gseg);
        CHECKF(gpu_attention_fwd_seg(gt_ctx_, go, glse, gq, gk, gv, gseg, B, T, nh, dk, dv, scale,
                                     &e) == 0,
               "%s", e.msg);
        CHECKF(gpu_attention_bwd_seg(gt_ctx_, gdq, gdk, gdv, gdo, go, glse, gq, gk, gv, gseg, B,
                                     T, nh, dk, dv, scale, &e) == 0,
               "%s", e.msg);
        float *o = gt_down_bf(go, nv);
        float *dq = gt_down_bf(gdq, nq), *dk_ = gt_down_bf(gdk, nq), *dv_ = gt_down_bf(gdv, nv);
        float *ro = gt_zeros(nv), *att = gt_zeros((size_t)B * nh * T * T);
        float *rdq = gt_zeros(nq), *rdk = gt_zeros(nq), *rdv = gt_zeros(nv);
        attention_forward_seg(ro, att, q, k, v, seg, B, T, nh, dk, dv, scale);
        attention_backward_seg(rdq, rdk, rdv, dout, att, q, k, v, seg, B, T, nh, dk, dv, scale);
        double a = gt_relerr(o, ro, nv), c = gt_relerr(dq, rdq, nq);
        double d = gt_relerr(dk_, rdk, nq), f = gt_relerr(dv_, rdv, nv);
        wo = a > wo ? a : wo, wq = c > wq ? c : wq, wk = d > wk ? d : wk, wv = f > wv ? f : wv;
        CHECKF(a <= BF16_BOUND && c <= BF16_BOUND && d <= BF16_BOUND && f <= BF16_BOUND,
               "documents, variant %d B=%d T=%d nh=%d dk=%d dv=%d: out %.2e dq %.2e dk %.2e "
               "dv %.2e",
               variant, B, T, nh, dk, dv, a, c, d, f);
        free(q), free(k), free(v), free(dout), free(o), free(dq), free(dk_), free(dv_);
        free(ro), free(att), free(rdq), free(rdk), free(rdv), free(seg);
        gt_reset(mark);
    }
    gpu_attention_set_variant(gt_ctx_, 0);
    gt_stat("attention documents fwd out", wo, BF16_BOUND);
    gt_stat("attention documents bwd dq", wq, BF16_BOUND);
    gt_stat("attention documents bwd dk", wk, BF16_BOUND);
    gt_stat("attention documents bwd dv", wv, BF16_BOUND);
}

/* The warp-specialised forward (variants 0, 4, 5) on long sequences against the earlier
 * wgmma forward (variant 6, itself checked against lib/ops above): 4096 and 2500 keys are 32 and
 * 20 tiles, so the K/V rings turn over many times and the mbarrier phases flip; B and nh > 1;
 * causal and by document (1-2048 tokens). Output within bf16 bounds, lse within f32 ones
 * (the kernels differ only in their exponential and the order of their sums). */
static void attention_ws_matches_default(void)
{
    GT_NEED_GPU();
    if (getenv("DSV3_ATTN_QUICK"))
        SKIP("DSV3_ATTN_QUICK set");
    dsv3_err e;
    /* B, T, nh, dk, dv, documents */
    static const int sh[][6] = {{2, 4096, 3, 96, 64, 0}, {1, 2500, 2, 192, 128, 0},
                                {2, 3000, 2, 96, 64, 1}, {1, 2049, 2, 192, 128, 1}};
    double wo = 0, wl = 0;
    for (size_t si = 0; si < sizeof sh / sizeof sh[0]; si++) {
        int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
        float scale = 1.0f / sqrtf((float)dk);
        size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv, nl = (size_t)B * nh * T;
        int32_t *seg = malloc((size_t)B * T * 4);
        REQUIRE(seg);
        for (int b = 0, doc = 0; b < B; b++)
            for (int t = 0, left = 0; t < T; t++) {
                if (left == 0)
                    doc++, left = 1 + (int)(test_rand() % 2048);
                seg[(size_t)b * T + t] = doc;
                left--;
            }
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
        gpu_bf16 *gq = gt_up_bf(q, nq), *gk = gt_up_bf(k, nq), *gv = gt_up_bf(v, nv);
        gpu_bf16 *go = gt_poisoned(nv * 2);
        float *glse = gt_poisoned(nl * 4);
        int32_t *gseg = sh[si][5] ? gt_up(seg, (size_t)B * T * 4) : NULL;
        REQUIRE(gq && gk && gv && go && glse && (gseg || !sh[si][5]));
        float *ro = NULL, *rl = NULL;
        static const int vars[] = {6, 0, 4, 5};
        for (size_t vi = 0; vi < 4 && !test_failed_; vi++) {
            gpu_attention_set_variant(gt_ctx_, vars[vi]);
            CHECKF(gpu_attention_fwd_seg(gt_ctx_, go, glse, gq, gk, gv, gseg, B, T, nh, dk, dv,
                                         scale, &e) == 0,
                   "%s", e.msg);
            float *o = gt_down_bf(go, nv), *l = gt_down_f(glse, nl);
            if (vi == 0) {
                ro = o, rl = l;
                continue;
            }
            double a = gt_relerr(o, ro, nv), c = gt_relerr(l, rl, nl);
            wo = a > wo ? a : wo, wl = c > wl ? c : wl;
            CHECKF(a <= BF16_BOUND && c <= F32_BOUND,
                   "variant %d against 6, B=%d T=%d nh=%d %d/%d documents %d: out %.2e lse %.2e",
                   vars[vi], B, T, nh, dk, dv, sh[si][5], a, c);
            free(o), free(l);
        }
        gpu_attention_set_variant(gt_ctx_, 0);
        free(ro), free(rl), free(q), free(k), free(v), free(seg);
        gt_reset(mark);
    }
    gt_stat("attention warp-specialised fwd out (vs variant 6, long T)", wo, BF16_BOUND);
    gt_stat("attention warp-specialised fwd lse", wl, F32_BOUND);
}

/* Backward of one shape into host floats (bf16 values, so equal floats are equal bits),
 * DSV3_ATTN_BWD set to cand for the call when cand is not NULL. */
static void bwd_down(float *out[3], const char *cand, gpu_bf16 *const in[5], const float *lse,
                     const int32_t *seg, int B, int T, int nh, int dk, int dv, float scale)
{
    dsv3_err e;
    size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv;
    gpu_bf16 *d[3] = {gt_poisoned(nq * 2), gt_poisoned(nq * 2), gt_poisoned(nv * 2)};
    out[0] = out[1] = out[2] = NULL;
    REQUIRE(d[0] && d[1] && d[2]);
    if (cand)
        setenv("DSV3_ATTN_BWD", cand, 1);
    int rc = gpu_attention_bwd_seg(gt_ctx_, d[0], d[1], d[2], in[3], in[4], lse, in[0], in[1],
                                   in[2], seg, B, T, nh, dk, dv, scale, &e);
    unsetenv("DSV3_ATTN_BWD");
    CHECKF(rc == 0, "%s", e.msg);
    out[0] = gt_down_bf(d[0], nq), out[1] = gt_down_bf(d[1], nq), out[2] = gt_down_bf(d[2], nv);
}

/* Backward candidates named by DSV3_ATTN_BWD (cand) against lib/ops attention_*_seg on
 * shapes sh (B, T, nh, dk, dv, documents: 0 none, 1 short of 1-70 tokens, 2 long of 1-300:
 * whole tiles inside one document, tiles before a query tile's document skipped); with rep,
 * each call run twice and the bits compared (no atomics: reproducible), and against
 * candidate 5's: required where cand[i] is listed in same5 (the same products in the same
 * order), else printed. Worst errors into w (dq, dk, dv). */
static void bwd_cands_vs_cpu(const char *const *cand, size_t nc, const int (*sh)[6], size_t ns,
                             int rep, const char *same5, double w[3])
{
    dsv3_err e;
    gpu_attention_set_variant(gt_ctx_, 0);
    for (size_t ci = 0; ci < nc; ci++)
        for (size_t si = 0; si < ns; si++) {
            int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
            float scale = 1.0f / sqrtf((float)dk);
            size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv;
            size_t nl = (size_t)B * nh * T;
            int32_t *seg = malloc((size_t)B * T * 4);
            REQUIRE(seg);
            int32_t doc = (int32_t)(test_rand() % 5);
            const int longest = sh[si][5] == 2 ? 300 : 70;
            for (int b = 0; b < B; b++)
                for (int t = 0, left = 0; t < T; t++) {
                    if (left == 0) {
                        doc++;
                        left = test_rand() % 4 == 0 ? 1 : 1 + (int)(test_rand() % longest);
                    }
                    /* no documents: one per sequence (the CPU side), NULL on the GPU */
                    seg[(size_t)b * T + t] = sh[si][5] ? doc : b;
                    left--;
                }
            size_t mark = gpu_arena_mark(gt_ctx_);
            float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
            float *dout = gt_rand_bf(nv, 1);
            gpu_bf16 *gq = gt_up_bf(q, nq), *gk = gt_up_bf(k, nq), *gv = gt_up_bf(v, nv);
            gpu_bf16 *gdo = gt_up_bf(dout, nv), *go = gt_poisoned(nv * 2);
            gpu_bf16 *gdq = gt_poisoned(nq * 2), *gdk = gt_poisoned(nq * 2);
            gpu_bf16 *gdv = gt_poisoned(nv * 2);
            float *glse = gt_poisoned(nl * 4);
            int32_t *gseg = sh[si][5] ? gt_up(seg, (size_t)B * T * 4) : NULL;
            REQUIRE(gq && gk && gv && gdo && go && gdq && gdk && gdv && glse &&
                    (gseg || !sh[si][5]));
            CHECKF(gpu_attention_fwd_seg(gt_ctx_, go, glse, gq, gk, gv, gseg, B, T, nh, dk, dv,
                                         scale, &e) == 0,
                   "%s", e.msg);
            setenv("DSV3_ATTN_BWD", cand[ci], 1);
            int rc = gpu_attention_bwd_seg(gt_ctx_, gdq, gdk, gdv, gdo, go, glse, gq, gk, gv,
                                           gseg, B, T, nh, dk, dv, scale, &e);
            unsetenv("DSV3_ATTN_BWD");
            CHECKF(rc == 0, "%s", e.msg);
            float *dq = gt_down_bf(gdq, nq), *dk_ = gt_down_bf(gdk, nq), *dv_ = gt_down_bf(gdv, nv);
            if (rep) { /* again into fresh poisoned buffers: the same bits */
                float *r[3];
                gpu_bf16 *in[5] = {gq, gk, gv, gdo, go};
                bwd_down(r, cand[ci], in, glse, gseg, B, T, nh, dk, dv, scale);
                int same = test_failed_ || (!memcmp(r[0], dq, nq * sizeof(float)) &&
                                            !memcmp(r[1], dk_, nq * sizeof(float)) &&
                                            !memcmp(r[2], dv_, nv * sizeof(float)));
                CHECKF(same, "backward %s, documents %d, B=%d T=%d %d/%d: two runs differ",
                       cand[ci], sh[si][5], B, T, dk, dv);
                free(r[0]), free(r[1]), free(r[2]);
                bwd_down(r, "5", in, glse, gseg, B, T, nh, dk, dv, scale);
                same = test_failed_ || (!memcmp(r[0], dq, nq * sizeof(float)) &&
                                        !memcmp(r[1], dk_, nq * sizeof(float)) &&
                                        !memcmp(r[2], dv_, nv * sizeof(float)));
                const int must = same5 && strstr(same5, cand[ci]) != NULL;
                CHECKF(same || !must, "backward %s, documents %d, B=%d T=%d %d/%d: not candidate "
                       "5's bits", cand[ci], sh[si][5], B, T, dk, dv);
                if (!must)
                    printf("# backward %s, documents %d, B=%d T=%d %d/%d: %s candidate 5's bits\n",
                           cand[ci], sh[si][5], B, T, dk, dv, same ? "the same as" : "not");
                free(r[0]), free(r[1]), free(r[2]);
            }
            float *ro = gt_zeros(nv), *att = gt_zeros((size_t)B * nh * T * T);
            float *rdq = gt_zeros(nq), *rdk = gt_zeros(nq), *rdv = gt_zeros(nv);
            attention_forward_seg(ro, att, q, k, v, seg, B, T, nh, dk, dv, scale);
            attention_backward_seg(rdq, rdk, rdv, dout, att, q, k, v, seg, B, T, nh, dk, dv,
                                   scale);
            double c = gt_relerr(dq, rdq, nq), d = gt_relerr(dk_, rdk, nq);
            double f = gt_relerr(dv_, rdv, nv);
            w[0] = c > w[0] ? c : w[0], w[1] = d > w[1] ? d : w[1], w[2] = f > w[2] ? f : w[2];
            CHECKF(c <= BF16_BOUND && d <= BF16_BOUND && f <= BF16_BOUND,
                   "backward %s, documents %d, B=%d T=%d nh=%d dk=%d dv=%d: dq %.2e "
                   "dk %.2e dv %.2e",
                   cand[ci], sh[si][5], B, T, nh, dk, dv, c, d, f);
            free(q), free(k), free(v), free(dout), free(dq), free(dk_), free(dv_);
            free(ro), free(att), free(rdq), free(rdk), free(rdv), free(seg);
            gt_reset(mark);
        }
}

/* The fused Hopper backward candidates (DSV3_ATTN_BWD 9 and 10: dQ by fp32 reductions,
 * kernels/attention_fa.cuh) against lib/ops attention_*_seg at 96/64 (80/48 padded), causal
 * and masked by document: T not a multiple of the 128-row tiles (257: the last key block
 * holds one key, its second warpgroup none), 700 and 900 (the three-stage query ring wraps
 * around), short documents (1-70 tokens) and long ones (1-300: whole tiles inside one
 * document, tiles before a query tile's document skipped). Run in every test_attention
 * (the sweep's DSV3_ATTN_BWD=9 or 10 also sends the checks above through them); skipped
 * when DSV3_ATTN_BWD is set (the sweep) or under DSV3_ATTN_QUICK. */
static void attention_fused_bwd_match_cpu(void)
{
    GT_NEED_GPU();
    if (getenv("DSV3_ATTN_BWD") || getenv("DSV3_ATTN_QUICK"))
        SKIP("DSV3_ATTN_BWD or DSV3_ATTN_QUICK set");
    /* B, T, nh, dk, dv, documents (0 none, 1 short, 2 long) */
    static const int sh[][6] = {{1, 200, 2, 96, 64, 0}, {2, 190, 3, 96, 64, 0},
                                {1, 150, 2, 80, 48, 0}, {1, 257, 1, 96, 64, 0},
                                {1, 700, 2, 96, 64, 0}, {1, 200, 2, 96, 64, 1},
                                {2, 450, 2, 96, 64, 2}, {1, 900, 2, 96, 64, 2}};
    static const char *const cand[] = {"9", "10"};
    double w[3] = {0, 0, 0};
    bwd_cands_vs_cpu(cand, 2, sh, sizeof sh / sizeof sh[0], 0, NULL, w);
    gt_stat("attention fused bwd (9, 10) dq", w[0], BF16_BOUND);
    gt_stat("attention fused bwd (9, 10) dk", w[1], BF16_BOUND);
    gt_stat("attention fused bwd (9, 10) dv", w[2], BF16_BOUND);
}

/* The deterministic candidates 12, 16 and 17 (5 without ptxas's wgmma serialisation; dQ
 * steps of 128 keys; the A operands of S and dP held in registers, through ldmatrix from the
 * swizzled tiles and wgmma's register form with a K-major B; 11 and 13-15, retired, were
 * steps between them) against lib/ops at 96/64 (80/48 padded) and 192/128 (160/120), causal
 * and by document, ragged T (257: an empty second warpgroup; 700, 900: the 4-stage rings
 * wrap), B > 1; each call twice, the same bits; 12's bits those of 5 (whether 16's and 17's
 * are is printed). Skipped as the fused test is. */
static void attention_bwd_cands_match_cpu(void)
{
    GT_NEED_GPU();
    if (getenv("DSV3_ATTN_BWD") || getenv("DSV3_ATTN_QUICK"))
        SKIP("DSV3_ATTN_BWD or DSV3_ATTN_QUICK set");
    static const int sh[][6] = {{2, 190, 3, 96, 64, 0},  {1, 150, 2, 80, 48, 0},
                                {1, 257, 1, 96, 64, 0},  {1, 700, 2, 96, 64, 0},
                                {1, 200, 2, 96, 64, 1},  {1, 900, 2, 96, 64, 2},
                                {2, 130, 2, 192, 128, 0}, {1, 257, 1, 160, 120, 0},
                                {2, 300, 2, 192, 128, 2}};
    static const char *const cand[] = {"12", "16", "17"};
    double w[3] = {0, 0, 0};
    /* 12 is 5 with its loop exits moved: the same bits */
    bwd_cands_vs_cpu(cand, sizeof cand / sizeof cand[0], sh, sizeof sh / sizeof sh[0], 1, "12",
                     w);
    gt_stat("attention bwd candidates 12, 16, 17 dq", w[0], BF16_BOUND);
    gt_stat("attention bwd candidates 12, 16, 17 dk", w[1], BF16_BOUND);
    gt_stat("attention bwd candidates 12, 16, 17 dv", w[2], BF16_BOUND);
}

/* The warp-specialised candidates 18 and 19 (kernels/attention_wsb.cuh: 17's dK/dV
 * kernel, then a dQ kernel with a TMA loader warpgroup and two consumer warpgroups taking
 * turns; 19 issues a tile's dQ with the next tile's S and dP) and 20, 21 (18's dQ kernel after
 * a dK/dV kernel on the same schedule; 21 without K, V in registers; 22 with one turn a
 * 64-query step) on shapes sh: the same bits twice and candidate 17's
 * bits (the same products in the same order). */
static void ws_dq_vs_17(const int (*sh)[6], size_t ns)
{
    dsv3_err e;
    static const char *const cand[] = {"18", "19", "20", "21", "22"};
    gpu_attention_set_variant(gt_ctx_, 0);
    for (size_t si = 0; si < ns; si++) {
        int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
        const int docs = sh[si][5];
        float scale = 1.0f / sqrtf((float)dk);
        size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv, n[3] = {nq, nq, nv};
        int32_t *seg = malloc((size_t)B * T * 4);
        REQUIRE(seg);
        for (int b = 0, doc = 0; b < B; b++)
            for (int t = 0, left = 0; t < T; t++) {
                if (left == 0)
                    doc++, left = 1 + (int)(test_rand() % 900);
                seg[(size_t)b * T + t] = doc;
                left--;
            }
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
        float *dout = gt_rand_bf(nv, 1);
        gpu_bf16 *in[5] = {gt_up_bf(q, nq), gt_up_bf(k, nq), gt_up_bf(v, nv), gt_up_bf(dout, nv),
                           gt_poisoned(nv * 2)};
        float *glse = gt_poisoned((size_t)B * nh * T * 4);
        int32_t *gseg = docs ? gt_up(seg, (size_t)B * T * 4) : NULL;
        REQUIRE(in[0] && in[1] && in[2] && in[3] && in[4] && glse && (gseg || !docs));
        CHECKF(gpu_attention_fwd_seg(gt_ctx_, in[4], glse, in[0], in[1], in[2], gseg, B, T, nh,
                                     dk, dv, scale, &e) == 0,
               "%s", e.msg);
        float *r17[3];
        bwd_down(r17, "17", in, glse, gseg, B, T, nh, dk, dv, scale);
        for (size_t ci = 0; ci < sizeof cand / sizeof cand[0]; ci++) {
            float *r1[3], *r2[3];
            bwd_down(r1, cand[ci], in, glse, gseg, B, T, nh, dk, dv, scale);
            bwd_down(r2, cand[ci], in, glse, gseg, B, T, nh, dk, dv, scale);
            int same12 = 1, same17 = 1;
            double worst = 0;
            for (int x = 0; x < 3 && !test_failed_; x++) {
                size_t by = n[x] * sizeof(float);
                same12 &= !memcmp(r1[x], r2[x], by), same17 &= !memcmp(r1[x], r17[x], by);
                double rel = gt_relerr(r1[x], r17[x], n[x]);
                worst = rel > worst ? rel : worst;
            }
            CHECKF(same12 && same17, "backward %s, B=%d T=%d nh=%d %d/%d docs %d: two runs %s, "
                   "candidate 17's bits %s (largest relative difference %.2e)", cand[ci], B, T,
                   nh, dk, dv, docs, same12 ? "agree" : "differ", same17 ? "kept" : "not kept",
                   worst);
            for (int x = 0; x < 3; x++)
                free(r1[x]), free(r2[x]);
        }
        for (int x = 0; x < 3; x++)
            free(r17[x]);
        free(q), free(k), free(v), free(dout), free(seg);
        gt_reset(mark);
    }
}

/* Candidates 18-22 against lib/ops at 96/64 (and where they hand over to 17: 80/48, whose
 * value dim is below one box, and 192/128), causal and by document, ragged T (257: the last
 * query block's second warpgroup has no rows; 700, 1000: the 4-stage rings wrap), B and nh
 * above 1, each call twice for the same bits; then candidate 17's bits on those shapes and on
 * long rows (T = 4096 and 4000, several B and nh, causal and documents) where the CPU is too
 * slow. Skipped as the fused test is. */
static void attention_ws_bwd_match(void)
{
    GT_NEED_GPU();
    if (getenv("DSV3_ATTN_BWD") || getenv("DSV3_ATTN_QUICK"))
        SKIP("DSV3_ATTN_BWD or DSV3_ATTN_QUICK set");
    static const int sh[][6] = {{2, 190, 3, 96, 64, 0},  {1, 257, 1, 96, 64, 0},
                                {2, 700, 2, 96, 64, 0},  {1, 1000, 3, 96, 64, 0},
                                {1, 200, 2, 96, 64, 1},  {1, 900, 2, 96, 64, 2},
                                {1, 150, 2, 80, 48, 0},  {2, 130, 2, 192, 128, 0}};
    static const int lg[][6] = {{2, 4096, 3, 96, 64, 0}, {1, 4096, 5, 96, 64, 0},
                                {3, 4000, 2, 96, 64, 0}, {2, 4096, 2, 96, 64, 1},
                                {1, 4000, 3, 96, 64, 1}};
    static const char *const cand[] = {"18", "19", "20", "21", "22"};
    double w[3] = {0, 0, 0};
    bwd_cands_vs_cpu(cand, sizeof cand / sizeof cand[0], sh, sizeof sh / sizeof sh[0], 1, NULL, w);
    ws_dq_vs_17(sh, sizeof sh / sizeof sh[0]);
    ws_dq_vs_17(lg, sizeof lg / sizeof lg[0]);
    gt_stat("attention bwd warp-specialised (18-22) dq", w[0], BF16_BOUND);
    gt_stat("attention bwd warp-specialised (18-22) dk", w[1], BF16_BOUND);
    gt_stat("attention bwd warp-specialised (18-22) dv", w[2], BF16_BOUND);
}

/* The backward's default pick (f3_bwd_pick) by the context's reproducibility setting:
 * deterministic (the default, gpu_attention_set_nondet 0), two runs give the same bits,
 * documents or not, and those of the candidate named (20 causal, 16 documents, 5 at 192/128)
 * and of a retired one (3: the default pick); set nondet, a document-masked call of
 * 96/64 takes the fused candidate 10 (the same bits as 10 named where T <= 128: one key
 * block adds each dQ element once, so its sum has no order), within bf16 bounds of lib/ops
 * elsewhere, while causal calls and 192/128 keep the deterministic kernels (the same bits
 * as before). Skipped when DSV3_ATTN_BWD is set (it overrides the pick). */
static void attention_nondet_pick(void)
{
    GT_NEED_GPU();
    if (getenv("DSV3_ATTN_BWD"))
        SKIP("DSV3_ATTN_BWD set");
    dsv3_err e;
    /* B, T, nh, dk, dv, documents */
    static const int sh[][6] = {{2, 120, 2, 96, 64, 1}, {1, 900, 2, 96, 64, 1},
                                {1, 100, 2, 96, 64, 0}, {1, 300, 2, 192, 128, 1}};
    double wq = 0, wk = 0, wv = 0;
    gpu_attention_set_variant(gt_ctx_, 0);
    for (size_t si = 0; si < sizeof sh / sizeof sh[0]; si++) {
        int B = sh[si][0], T = sh[si][1], nh = sh[si][2], dk = sh[si][3], dv = sh[si][4];
        const int docs = sh[si][5], fused = docs && dk <= 96;
        float scale = 1.0f / sqrtf((float)dk);
        size_t nq = (size_t)B * T * nh * dk, nv = (size_t)B * T * nh * dv, n[3] = {nq, nq, nv};
        int32_t *seg = malloc((size_t)B * T * 4);
        REQUIRE(seg);
        for (int b = 0, doc = 0; b < B; b++)
            for (int t = 0, left = 0; t < T; t++) {
                if (left == 0)
                    doc++, left = 1 + (int)(test_rand() % 200);
                seg[(size_t)b * T + t] = docs ? doc : b; /* the CPU side: one per sequence */
                left--;
            }
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *q = gt_rand_bf(nq, 2), *k = gt_rand_bf(nq, 2), *v = gt_rand_bf(nv, 1);
        float *dout = gt_rand_bf(nv, 1);
        gpu_bf16 *in[5] = {gt_up_bf(q, nq), gt_up_bf(k, nq), gt_up_bf(v, nv), gt_up_bf(dout, nv),
                           gt_poisoned(nv * 2)};
        float *glse = gt_poisoned((size_t)B * nh * T * 4);
        int32_t *gseg = docs ? gt_up(seg, (size_t)B * T * 4) : NULL;
        REQUIRE(in[0] && in[1] && in[2] && in[3] && in[4] && glse && (gseg || !docs));
        CHECKF(gpu_attention_fwd_seg(gt_ctx_, in[4], glse, in[0], in[1], in[2], gseg, B, T, nh,
                                     dk, dv, scale, &e) == 0,
               "%s", e.msg);
        float *r1[3], *r2[3], *r5[3], *ru[3], *rn[3], *r10[3] = {NULL, NULL, NULL};
        bwd_down(r1, NULL, in, glse, gseg, B, T, nh, dk, dv, scale);
        bwd_down(r2, NULL, in, glse, gseg, B, T, nh, dk, dv, scale);
        /* the deterministic default by name: 96/64 20 (causal) or 16 (documents), 192/128 5 */
        bwd_down(r5, dk > 96 ? "5" : docs ? "16" : "20", in, glse, gseg, B, T, nh, dk, dv, scale);
        bwd_down(ru, "3", in, glse, gseg, B, T, nh, dk, dv, scale); /* retired: the default */
        gpu_attention_set_nondet(gt_ctx_, 1);
        bwd_down(rn, NULL, in, glse, gseg, B, T, nh, dk, dv, scale);
        if (fused && T <= 128)
            bwd_down(r10, "10", in, glse, gseg, B, T, nh, dk, dv, scale);
        gpu_attention_set_nondet(gt_ctx_, 0);
        int same12 = 1, same15 = 1, same1u = 1, same1n = 1, samen10 = 1;
        for (int x = 0; x < 3 && !test_failed_; x++) {
            size_t by = n[x] * sizeof(float);
            same12 &= !memcmp(r1[x], r2[x], by), same15 &= !memcmp(r1[x], r5[x], by);
            same1u &= !memcmp(r1[x], ru[x], by);
            same1n &= !memcmp(r1[x], rn[x], by);
            samen10 &= !r10[x] || !memcmp(rn[x], r10[x], by);
        }
        CHECKF(same12 && same15, "B=%d T=%d %d/%d docs %d: deterministic runs differ (again "
               "%d, the default's candidate by name %d)", B, T, dk, dv, docs, !same12, !same15);
        CHECKF(same1u, "B=%d T=%d %d/%d docs %d: a retired DSV3_ATTN_BWD (3) is not the default",
               B, T, dk, dv, docs);
        CHECKF(fused || same1n, "B=%d T=%d %d/%d docs %d: nondet changed a call the fused "
               "backward does not take", B, T, dk, dv, docs);
        CHECKF(samen10, "B=%d T=%d docs: the nondet default is not candidate 10", B, T);
        if (fused && !test_failed_) { /* against lib/ops */
            float *ro = gt_zeros(nv), *att = gt_zeros((size_t)B * nh * T * T);
            float *rd[3] = {gt_zeros(nq), gt_zeros(nq), gt_zeros(nv)};
            attention_forward_seg(ro, att, q, k, v, seg, B, T, nh, dk, dv, scale);
            attention_backward_seg(rd[0], rd[1], rd[2], dout, att, q, k, v, seg, B, T, nh, dk,
                                   dv, scale);
            double c = gt_relerr(rn[0], rd[0], nq), d = gt_relerr(rn[1], rd[1], nq);
            double f = gt_relerr(rn[2], rd[2], nv);
            wq = c > wq ? c : wq, wk = d > wk ? d : wk, wv = f > wv ? f : wv;
            CHECKF(c <= BF16_BOUND && d <= BF16_BOUND && f <= BF16_BOUND,
                   "nondet default, documents, B=%d T=%d: dq %.2e dk %.2e dv %.2e", B, T, c, d, f);
            free(ro), free(att), free(rd[0]), free(rd[1]), free(rd[2]);
        }
        for (int x = 0; x < 3; x++)
            free(r1[x]), free(r2[x]), free(r5[x]), free(ru[x]), free(rn[x]), free(r10[x]);
        free(q), free(k), free(v), free(dout), free(seg);
        gt_reset(mark);
    }
    gt_stat("attention nondet default (documents) dq", wq, BF16_BOUND);
    gt_stat("attention nondet default (documents) dk", wk, BF16_BOUND);
    gt_stat("attention nondet default (documents) dv", wv, BF16_BOUND);
}

struct att_job {
    int B, T, nh, dk, dv, bwd;
    gpu_bf16 *q, *k, *v, *o, *dout, *dq, *dk_, *dv_;
    float *lse;
    int32_t *seg; /* documents (device), NULL: causal only */
};

static int att_run(void *arg, dsv3_err *e)
{
    struct att_job *j = arg;
    float scale = 1.0f / sqrtf((float)j->dk);
    if (!j->bwd)
        return gpu_attention_fwd_seg(gt_ctx_, j->o, j->lse, j->q, j->k, j->v, j->seg, j->B,
                                     j->T, j->nh, j->dk, j->dv, scale, e);
    return gpu_attention_bwd_seg(gt_ctx_, j->dq, j->dk_, j->dv_, j->dout, j->o, j->lse, j->q,
                                 j->k, j->v, j->seg, j->B, j->T, j->nh, j->dk, j->dv, scale, e);
}

struct gemm_ceiling {
    gpu_bf16 *a, *b, *c;
};

static int ceiling_run(void *arg, dsv3_err *e)
{
    struct gemm_ceiling *g = arg;
    return gpu_linear_fwd(gt_ctx_, g->c, g->a, g->b, 8192, 8192, 8192, 0.0f, e);
}

static void bench_attention(void)
{
    GT_NEED_GPU();
    if (!gt_bench())
        SKIP("set DSV3_GPU_BENCH=1");
    dsv3_err e;
    /* DSV3_ATTN_ONCE=1: the default kernels once on each shape, nothing timed (for ncu) */
    const int once = getenv("DSV3_ATTN_ONCE") != NULL;
    size_t n8 = (size_t)8192 * 8192;
    struct gemm_ceiling g = {gb_random_bf(n8, 1), gb_random_bf(n8, 1), gb_random_bf(n8, 1)};
    REQUIRE(g.a && g.b && g.c);
    float cms = once ? 1.0f : gb_time(ceiling_run, &g, 10);
    double ceil = 2.0 * n8 * 8192 / (cms * 1e-3) / 1e12;
    gpu_free(g.a), gpu_free(g.b), gpu_free(g.c);
    /* docs: packed documents of 1 to 2048 tokens (uniform; mean ~1000, about four a
     * sequence), the FLOPs then those of the visible pairs only */
    static const struct { const char *name; int B, T, nh, dk, dv, docs; } sh[] = {
        {"V3 MLA B=1 T=4096 nh=128 192/128", 1, 4096, 128, 192, 128, 0},
        {"1B-MoE B=8 T=4096 nh=16 96/64", 8, 4096, 16, 96, 64, 0},
        {"1B-MoE docs B=8 T=4096 nh=16 96/64", 8, 4096, 16, 96, 64, 1},
    };
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        struct att_job j = {.B = sh[s].B, .T = sh[s].T, .nh = sh[s].nh, .dk = sh[s].dk,
                            .dv = sh[s].dv, .bwd = 0, .seg = NULL};
        size_t nq = (size_t)j.B * j.T * j.nh * j.dk, nv = (size_t)j.B * j.T * j.nh * j.dv;
        j.q = gb_random_bf(nq, 1), j.k = gb_random_bf(nq, 1), j.v = gb_random_bf(nv, 1);
        j.dout = gb_random_bf(nv, 1), j.o = gb_random_bf(nv, 1);
        j.dq = gpu_malloc(nq * 2, &e), j.dk_ = gpu_malloc(nq * 2, &e), j.dv_ = gpu_malloc(nv * 2, &e);
        j.lse = gpu_malloc((size_t)j.B * j.nh * j.T * 4, &e);
        REQUIRE(j.q && j.k && j.v && j.dout && j.o && j.dq && j.dk_ && j.dv_ && j.lse);
        /* causal: T(T+1)/2 score pairs, 2 FLOPs per multiply-add, dk for QK^T, dv for PV;
         * backward counted as 2.5 x forward (FlashAttention-2's convention) */
        double pairs = j.B * (j.T * (j.T + 1.0) / 2);
        if (sh[s].docs) {
            int32_t *hs = malloc((size_t)j.B * j.T * 4);
            REQUIRE(hs);
            pairs = 0;
            int32_t doc = 0;
            for (int b = 0; b < j.B; b++)
                for (int t = 0, left = 0, len = 0; t <= j.T; t++) {
                    if (t == j.T || left == 0) { /* a document of len tokens ends */
                        pairs += len * (len + 1.0) / 2;
                        if (t == j.T)
                            break;
                        doc++;
                        left = 1 + (int)(test_rand() % 2048);
                        len = 0;
                    }
                    hs[(size_t)b * j.T + t] = doc;
                    left--, len++;
                }
            j.seg = gt_up(hs, (size_t)j.B * j.T * 4);
            free(hs);
            REQUIRE(j.seg);
        }
        double fwd = 2.0 * j.nh * pairs * (j.dk + j.dv);
        if (once) { /* one launch of each default kernel, for a profiler */
            j.bwd = 0;
            CHECKF(att_run(&j, &e) == 0, "%s", e.msg);
            j.bwd = 1;
            CHECKF(att_run(&j, &e) == 0, "%s", e.msg);
            gpu_free(j.q), gpu_free(j.k), gpu_free(j.v), gpu_free(j.dout), gpu_free(j.o);
            gpu_free(j.dq), gpu_free(j.dk_), gpu_free(j.dv_), gpu_free(j.lse);
            continue;
        }
        /* variant 0: the default (wgmma on sm_90); 1: the mma.sync kernels, 3: the
         * pipelined wgmma forward, 4 and 5: the warp-specialised one, for comparison;
         * DSV3_ATTN_BENCH_DEFAULT=1: the default kernels only; DSV3_ATTN_BENCH_VARS="0 4":
         * those variants, in that order */
        int vars[8] = {1, 3, 4, 5, 0}, nvars = 5;
        const char *ev = getenv("DSV3_ATTN_BENCH_VARS");
        if (getenv("DSV3_ATTN_BENCH_DEFAULT"))
            vars[0] = 0, nvars = 1;
        else if (ev && *ev) {
            nvars = 0;
            for (char *p = (char *)ev, *q; nvars < 8; p = q) {
                long x = strtol(p, &q, 10);
                if (q == p)
                    break;
                vars[nvars++] = (int)x;
            }
        }
        for (int vi = 0; vi < nvars; vi++) {
            const int var = vars[vi];
            gpu_attention_set_variant(gt_ctx_, var);
            j.bwd = 0;
            float ms = gb_time(att_run, &j, 10);
            j.bwd = 1;
            float bms = gb_time(att_run, &j, 10);
            CHECK(ms > 0 && bms > 0);
            char tag[32] = "";
            if (var == 1)
                snprintf(tag, sizeof tag, "mma.sync ");
            else if (var != 0)
                snprintf(tag, sizeof tag, "variant %d ", var);
            printf("# bench attn fwd %s%-32s %8.3f ms %7.1f TFLOP/s %5.1f%% of ceiling\n", tag,
                   sh[s].name, ms, fwd / (ms * 1e-3) / 1e12, 100 * fwd / (ms * 1e-3) / 1e12 / ceil);
            printf("# bench attn bwd %s%-32s %8.3f ms %7.1f TFLOP/s %5.1f%% of ceiling\n", tag,
                   sh[s].name, bms, 2.5 * fwd / (bms * 1e-3) / 1e12,
                   100 * 2.5 * fwd / (bms * 1e-3) / 1e12 / ceil);
        }
        gpu_free(j.q), gpu_free(j.k), gpu_free(j.v), gpu_free(j.dout), gpu_free(j.o);
        gpu_free(j.dq), gpu_free(j.dk_), gpu_free(j.dv_), gpu_free(j.lse);
    }
    printf("# bench %-36s %8.3f ms %7.1f TFLOP/s (the ceiling)\n", "gemm 8192^3 bf16", cms, ceil);
}

int main(void)
{
    test_seed();
    if (!getenv("DSV3_ATTN_ONCE")) {
        RUN(attention_matches_cpu);
        RUN(attention_segments_match_cpu);
        RUN(attention_ws_matches_default);
        RUN(attention_fused_bwd_match_cpu);
        RUN(attention_bwd_cands_match_cpu);
        RUN(attention_ws_bwd_match);
        RUN(attention_nondet_pick);
    }
    RUN(bench_attention);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
