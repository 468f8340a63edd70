/* GPU test of kernels/layers: RMSNorm, RoPE, SwiGLU and embedding, forward and backward,
 * and kernels/mla (the bf16 add, MLA's key/value assembly and its transpose: exact, against
 * a CPU composition with the same fp32 sum order),
 * against lib/ops on fresh random inputs of ragged shapes; the embedding gradient also
 * bitwise equal across two runs (no atomics). */
#include "../../kernels/layers.h"
#include "../../kernels/mla.h"
#include "../../lib/ops.h"
#include "gpu_test.h"

static void rmsnorm_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    /* D <= 1024 and D % 8 == 0 take the warp-a-row kernels (one, two and four 8-value chunks
     * a lane; rows not multiples of the 8-row block, more rows than the backward's grid
     * holds), the others the block-a-row kernels */
    static const int sh[][2] = {{1, 8},    {7, 100},   {130, 1024}, {33, 7168}, {300, 64},
                                {517, 256}, {1000, 384}, {2500, 1024}, {9, 2048}};
    double wf = 0, wr = 0, wdx = 0, wdw = 0, wdx_re = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], D = sh[s][1];
        size_t n = (size_t)N * D, mark = gpu_arena_mark(gt_ctx_);
        float *x = gt_rand_bf(n, 2), *w = gt_rand_bf((size_t)D, 1), *dy = gt_rand_bf(n, 1);
        float *dx0 = gt_rand_bf(n, 1), *dw0 = gt_rand_bf((size_t)D, 1);
        gpu_bf16 *gx = gt_up_bf(x, n), *gw = gt_up_bf(w, (size_t)D), *gdy = gt_up_bf(dy, n);
        gpu_bf16 *gout = gt_poisoned(n * 2), *gdx = gt_poisoned(n * 2), *gdx2 = gt_up_bf(dx0, n);
        float *grstd = gt_poisoned((size_t)N * 4), *gdw = gt_up(dw0, (size_t)D * 4);
        REQUIRE(gx && gw && gdy && gout && gdx && gdx2 && grstd && gdw);
        CHECKF(gpu_rmsnorm_fwd(gt_ctx_, gout, grstd, gx, gw, N, D, 1e-6f, &e) == 0, "%s", e.msg);
        CHECKF(gpu_rmsnorm_bwd(gt_ctx_, gdx, 0.0f, gdw, gdy, gx, gw, grstd, N, D, 1e-6f, &e) == 0,
               "%s", e.msg);
        /* recomputing rstd, adding into an existing gradient; the weight gradient from the
         * recomputed rstd too (gdw2: from zero, compared with gdw's increment below) */
        float *z = gt_zeros((size_t)D), *gdw2 = gt_up(z, (size_t)D * 4);
        free(z);
        REQUIRE(gdw2);
        CHECKF(gpu_rmsnorm_bwd(gt_ctx_, gdx2, 1.0f, gdw2, gdy, gx, gw, NULL, N, D, 1e-6f, &e) == 0,
               "%s", e.msg);
        float *dw2 = gt_down_f(gdw2, (size_t)D);
        float *out = gt_down_bf(gout, n), *rstd = gt_down_f(grstd, (size_t)N);
        float *dx = gt_down_bf(gdx, n), *dx2 = gt_down_bf(gdx2, n);
        float *dw = gt_down_f(gdw, (size_t)D);
        float *rout = gt_zeros(n), *rrstd = gt_zeros((size_t)N), *rdx = gt_zeros(n);
        float *rdw = malloc((size_t)D * 4), *rdx2 = malloc(n * 4);
        memcpy(rdw, dw0, (size_t)D * 4);
        memcpy(rdx2, dx0, n * 4);
        rmsnorm_forward(rout, rrstd, x, w, N, D, 1e-6f);
        rmsnorm_backward(rdx, rdw, dy, x, w, rrstd, N, D);
        rmsnorm_backward(rdx2, NULL, dy, x, w, rrstd, N, D);
        double a = gt_relerr(out, rout, n), b = gt_relerr(rstd, rrstd, (size_t)N);
        double c = gt_relerr(dx, rdx, n), d = gt_relerr(dw, rdw, (size_t)D);
        double f = gt_relerr(dx2, rdx2, n);
        for (int i = 0; i < D; i++)
            dw2[i] += dw0[i];
        double d2 = gt_relerr(dw2, rdw, (size_t)D);
        d = d2 > d ? d2 : d;
        free(dw2);
        wf = a > wf ? a : wf, wr = b > wr ? b : wr, wdx = c > wdx ? c : wdx;
        wdw = d > wdw ? d : wdw, wdx_re = f > wdx_re ? f : wdx_re;
        CHECKF(a <= BF16_BOUND && b <= F32_BOUND && c <= BF16_BOUND && d <= F32_BOUND &&
                   f <= BF16_BOUND,
               "N=%d D=%d: out %.2e rstd %.2e dx %.2e dw %.2e dx(recompute,+=) %.2e", N, D, a, b,
               c, d, f);
        free(x), free(w), free(dy), free(dx0), free(dw0), free(out), free(rstd), free(dx),
            free(dx2), free(dw), free(rout), free(rrstd), free(rdx), free(rdw), free(rdx2);
        gt_reset(mark);
    }
    gt_stat("rmsnorm fwd", wf, BF16_BOUND);
    gt_stat("rmsnorm rstd", wr, F32_BOUND);
    gt_stat("rmsnorm bwd dx", wdx, BF16_BOUND);
    gt_stat("rmsnorm bwd dw (fp32 +=)", wdw, F32_BOUND);
    gt_stat("rmsnorm bwd dx recompute, beta=1", wdx_re, BF16_BOUND);
}

static void rope_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    /* B sequences of T tokens, nh heads of 192 values whose last 64 are rotated (MLA q). */
    static const int sh[][4] = {{1, 5, 1, 32}, {2, 37, 3, 64}, {1, 200, 16, 64}, {3, 9, 2, 8}};
    double worst[2] = {0, 0};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++)
        for (int il = 0; il <= 1; il++) {
            int B = sh[s][0], T = sh[s][1], nh = sh[s][2], d = sh[s][3], half = d / 2;
            int row = 128 + d, count = B * T * nh;
            size_t n = (size_t)count * row, mark = gpu_arena_mark(gt_ctx_);
            double inv[64];
            for (int j = 0; j < half; j++)
                inv[j] = pow(10000.0, -2.0 * j / d) * (j < half / 2 ? 0.25 : 1.0);
            float *ct = malloc((size_t)T * half * 4), *st = malloc((size_t)T * half * 4);
            rope_tables(ct, st, inv, T, half, 1.2);
            int *pos = malloc((size_t)B * T * sizeof(int));
            for (int i = 0; i < B * T; i++)
                pos[i] = i % T;
            float *x = gt_rand_bf(n, 1);
            gpu_bf16 *gx = gt_up_bf(x, n), *gd = gt_up_bf(x, n);
            float *gct = gt_up(ct, (size_t)T * half * 4), *gst = gt_up(st, (size_t)T * half * 4);
            int *gpos = gt_up(pos, (size_t)B * T * sizeof(int));
            REQUIRE(gx && gd && gct && gst && gpos);
            CHECKF(gpu_rope_fwd(gt_ctx_, gx + 128, count, row, nh, gpos, gct, gst, half, il, &e) ==
                       0, "%s", e.msg);
            CHECKF(gpu_rope_bwd(gt_ctx_, gd + 128, count, row, nh, gpos, gct, gst, half, il, &e) ==
                       0, "%s", e.msg);
            float *ox = gt_down_bf(gx, n), *od = gt_down_bf(gd, n);
            float *rx = malloc(n * 4), *rd = malloc(n * 4);
            memcpy(rx, x, n * 4);
            memcpy(rd, x, n * 4);
            rope_forward(rx + 128, count, row, nh, pos, ct, st, half, il);
            rope_backward(rd + 128, count, row, nh, pos, ct, st, half, il);
            double a = gt_relerr(ox, rx, n), b = gt_relerr(od, rd, n);
            worst[0] = a > worst[0] ? a : worst[0];
            worst[1] = b > worst[1] ? b : worst[1];
            CHECKF(a <= BF16_BOUND && b <= BF16_BOUND, "B=%d T=%d nh=%d d=%d il=%d: %.2e %.2e",
                   B, T, nh, d, il, a, b);
            free(ct), free(st), free(pos), free(x), free(ox), free(od), free(rx), free(rd);
            gt_reset(mark);
        }
    gt_stat("rope fwd (both layouts)", worst[0], BF16_BOUND);
    gt_stat("rope bwd (both layouts)", worst[1], BF16_BOUND);
}

static void swiglu_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][2] = {{1, 1}, {3, 7}, {129, 1408}, {64, 2048}};
    double worst[3] = {0, 0, 0};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int R = sh[s][0], C = sh[s][1], ld = 2 * C;
        size_t n = (size_t)R * C, mark = gpu_arena_mark(gt_ctx_);
        float *gu = gt_rand_bf(n * 2, 4), *dh = gt_rand_bf(n, 1);
        float *g = malloc(n * 4), *u = malloc(n * 4);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < C; j++) {
                g[(size_t)r * C + j] = gu[(size_t)r * ld + j];
                u[(size_t)r * C + j] = gu[(size_t)r * ld + C + j];
            }
        gpu_bf16 *ggu = gt_up_bf(gu, n * 2), *gdh = gt_up_bf(dh, n);
        gpu_bf16 *gh = gt_poisoned(n * 2), *gdgu = gt_poisoned(n * 4);
        REQUIRE(ggu && gdh && gh && gdgu);
        CHECKF(gpu_swiglu_fwd(gt_ctx_, gh, ggu, ggu + C, R, C, ld, &e) == 0, "%s", e.msg);
        CHECKF(gpu_swiglu_bwd(gt_ctx_, gdgu, gdgu + C, gdh, ggu, ggu + C, R, C, ld, &e) == 0,
               "%s", e.msg);
        float *h = gt_down_bf(gh, n), *dgu = gt_down_bf(gdgu, n * 2);
        float *rh = gt_zeros(n), *rdg = gt_zeros(n), *rdu = gt_zeros(n);
        float *dg = malloc(n * 4), *du = malloc(n * 4);
        for (int r = 0; r < R; r++)
            for (int j = 0; j < C; j++) {
                dg[(size_t)r * C + j] = dgu[(size_t)r * ld + j];
                du[(size_t)r * C + j] = dgu[(size_t)r * ld + C + j];
            }
        swiglu_forward(rh, g, u, (int64_t)n);
        swiglu_backward(rdg, rdu, dh, g, u, (int64_t)n);
        double a = gt_relerr(h, rh, n), b = gt_relerr(dg, rdg, n), c = gt_relerr(du, rdu, n);
        worst[0] = a > worst[0] ? a : worst[0];
        worst[1] = b > worst[1] ? b : worst[1];
        worst[2] = c > worst[2] ? c : worst[2];
        CHECKF(a <= BF16_BOUND && b <= BF16_BOUND && c <= BF16_BOUND, "R=%d C=%d: %.2e %.2e %.2e",
               R, C, a, b, c);
        free(gu), free(dh), free(g), free(u), free(h), free(dgu), free(rh), free(rdg),
            free(rdu), free(dg), free(du);
        gt_reset(mark);
    }
    gt_stat("swiglu fwd (fused gate|up)", worst[0], BF16_BOUND);
    gt_stat("swiglu bwd d_gate", worst[1], BF16_BOUND);
    gt_stat("swiglu bwd d_up", worst[2], BF16_BOUND);
}

static void embedding_matches_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    static const int sh[][3] = {{1, 8, 10}, {500, 72, 1000}, {4096, 256, 129280}};
    double worst_f = 0, worst_b = 0;
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], H = sh[s][1], V = sh[s][2];
        size_t mark = gpu_arena_mark(gt_ctx_);
        int32_t *ids = malloc((size_t)N * 4);
        for (int i = 0; i < N; i++) /* half the tokens from 40 ids: many repeats */
            ids[i] = (int32_t)(test_rand() % 2 ? test_rand() % (V < 40 ? V : 40)
                                               : test_rand() % (uint64_t)V);
        float *table = gt_rand_bf((size_t)V * H, 1), *dy = gt_rand_bf((size_t)N * H, 1);
        float *dt0 = gt_rand_bf((size_t)V * H, 1);
        gpu_bf16 *gt = gt_up_bf(table, (size_t)V * H), *gdy = gt_up_bf(dy, (size_t)N * H);
        gpu_bf16 *gout = gt_poisoned((size_t)N * H * 2);
        int32_t *gids = gt_up(ids, (size_t)N * 4);
        float *gdt = gt_up(dt0, (size_t)V * H * 4), *gdt2 = gt_up(dt0, (size_t)V * H * 4);
        REQUIRE(gt && gdy && gout && gids && gdt && gdt2);
        CHECKF(gpu_embedding_fwd(gt_ctx_, gout, gt, gids, N, H, &e) == 0, "%s", e.msg);
        CHECKF(gpu_embedding_bwd(gt_ctx_, gdt, gdy, gids, N, H, V, &e) == 0, "%s", e.msg);
        CHECKF(gpu_embedding_bwd(gt_ctx_, gdt2, gdy, gids, N, H, V, &e) == 0, "%s", e.msg);
        float *out = gt_down_bf(gout, (size_t)N * H), *dt = gt_down_f(gdt, (size_t)V * H);
        float *dt2 = gt_down_f(gdt2, (size_t)V * H);
        float *rout = gt_zeros((size_t)N * H), *rdt = malloc((size_t)V * H * 4);
        memcpy(rdt, dt0, (size_t)V * H * 4);
        embedding_forward(rout, table, ids, N, H);
        embedding_backward(rdt, dy, ids, N, H);
        double a = gt_relerr(out, rout, (size_t)N * H), b = gt_relerr(dt, rdt, (size_t)V * H);
        worst_f = a > worst_f ? a : worst_f;
        worst_b = b > worst_b ? b : worst_b;
        CHECKF(a == 0, "N=%d: the lookup is a copy, error %.2e", N, a);
        CHECKF(b <= F32_BOUND, "N=%d H=%d V=%d: d_table %.2e", N, H, V, b);
        CHECKF(memcmp(dt, dt2, (size_t)V * H * 4) == 0, "N=%d: two runs differ", N);
        free(ids), free(table), free(dy), free(dt0), free(out), free(dt), free(dt2),
            free(rout), free(rdt);
        gt_reset(mark);
    }
    gt_stat("embedding fwd (exact)", worst_f, 0);
    gt_stat("embedding bwd (fp32 +=, determ.)", worst_b, F32_BOUND);
}

/* Mismatching elements of two float arrays (NaN from a poisoned, unwritten element counts). */
static size_t mismatches(const float *a, const float *b, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += !(a[i] == b[i]);
    return bad;
}

static void mla_moves_match_cpu(void)
{
    GT_NEED_GPU();
    dsv3_err e;
    size_t bad_add = 0, bad_fwd = 0, bad_bwd = 0;
    /* the add: 8-value chunks, a ragged length, a base off the 16-byte grid */
    static const int64_t an[] = {1000, 1003, 8, 1};
    for (size_t s = 0; s < 2 * sizeof an / sizeof an[0]; s++) {
        int64_t n = an[s / 2];
        int off = (int)(s & 1);
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *a = gt_rand_bf((size_t)n + 1, 2), *b = gt_rand_bf((size_t)n + 1, 2);
        gpu_bf16 *ga = gt_up_bf(a, (size_t)n + 1), *gb = gt_up_bf(b, (size_t)n + 1),
                 *go = gt_poisoned(((size_t)n + 1) * 2);
        REQUIRE(ga && gb && go);
        CHECKF(gpu_add_bf16(gt_ctx_, go + off, ga + off, gb + off, n, &e) == 0, "%s", e.msg);
        float *o = gt_down_bf(go + off, (size_t)n), *r = malloc((size_t)n * 4);
        for (int64_t i = 0; i < n; i++)
            r[i] = gpu_bf2f(gpu_f2bf(a[i + off] + b[i + off]));
        bad_add += mismatches(o, r, (size_t)n);
        free(a), free(b), free(o), free(r);
        gt_reset(mark);
    }
    /* N, nh, nope, rope, dv, kv: 8-value segments (the 1B-MoE's), and ragged ones */
    static const int sh[][6] = {{64, 16, 64, 32, 64, 256}, {37, 3, 16, 8, 24, 32},
                                {5, 2, 6, 4, 5, 7}, {1, 1, 8, 8, 8, 8}};
    for (size_t s = 0; s < sizeof sh / sizeof sh[0]; s++) {
        int N = sh[s][0], nh = sh[s][1], nope = sh[s][2], rope = sh[s][3], dv = sh[s][4],
            kv = sh[s][5], qk = nope + rope;
        size_t nkvb = (size_t)N * nh * (nope + dv), nkva = (size_t)N * (kv + rope);
        size_t nk = (size_t)N * nh * qk, nv = (size_t)N * nh * dv;
        size_t mark = gpu_arena_mark(gt_ctx_);
        float *kvb = gt_rand_bf(nkvb, 1), *kva = gt_rand_bf(nkva, 1), *dk = gt_rand_bf(nk, 1),
              *dv_ = gt_rand_bf(nv, 1);
        gpu_bf16 *gkvb = gt_up_bf(kvb, nkvb), *gkva = gt_up_bf(kva, nkva),
                 *gdk = gt_up_bf(dk, nk), *gdv = gt_up_bf(dv_, nv);
        gpu_bf16 *gk = gt_poisoned(nk * 2), *gv = gt_poisoned(nv * 2),
                 *gdkvb = gt_poisoned(nkvb * 2), *gdkva = gt_poisoned(nkva * 2);
        REQUIRE(gkvb && gkva && gdk && gdv && gk && gv && gdkvb && gdkva);
        CHECKF(gpu_mla_assemble(gt_ctx_, gk, gv, gkvb, gkva, N, nh, nope, rope, dv, kv, &e) == 0 &&
                   gpu_mla_assemble_bwd(gt_ctx_, gdkvb, gdkva, gdk, gdv, N, nh, nope, rope, dv,
                                        kv, &e) == 0,
               "%s", e.msg);
        float *k = gt_down_bf(gk, nk), *v = gt_down_bf(gv, nv), *dkvb = gt_down_bf(gdkvb, nkvb),
              *dkva = gt_down_bf(gdkva, nkva);
        float *rk = malloc(nk * 4), *rv = malloc(nv * 4), *rdkvb = malloc(nkvb * 4);
        for (int n = 0; n < N; n++)
            for (int h = 0; h < nh; h++) {
                size_t t = (size_t)n * nh + h;
                for (int j = 0; j < qk; j++)
                    rk[t * qk + j] = j < nope ? kvb[t * (nope + dv) + j]
                                              : kva[(size_t)n * (kv + rope) + kv + j - nope];
                for (int j = 0; j < dv; j++)
                    rv[t * dv + j] = kvb[t * (nope + dv) + nope + j];
                for (int j = 0; j < nope + dv; j++)
                    rdkvb[t * (nope + dv) + j] = j < nope ? dk[t * qk + j] : dv_[t * dv + j - nope];
            }
        bad_fwd += mismatches(k, rk, nk) + mismatches(v, rv, nv);
        bad_bwd += mismatches(dkvb, rdkvb, nkvb);
        for (int n = 0; n < N; n++)
            for (int r = 0; r < rope; r++) {
                float sum = 0;
                for (int h = 0; h < nh; h++)
                    sum += dk[((size_t)n * nh + h) * qk + nope + r];
                float want = gpu_bf2f(gpu_f2bf(sum)), got = dkva[(size_t)n * (kv + rope) + kv + r];
                bad_bwd += !(want == got);
            }
        CHECKF(bad_fwd == 0 && bad_bwd == 0, "N=%d nh=%d %d/%d/%d kv %d: %zu fwd, %zu bwd mismatches",
               N, nh, nope, rope, dv, kv, bad_fwd, bad_bwd);
        free(kvb), free(kva), free(dk), free(dv_), free(k), free(v), free(dkvb), free(dkva);
        free(rk), free(rv), free(rdkvb);
        gt_reset(mark);
    }
    CHECKF(bad_add == 0, "add: %zu mismatches", bad_add);
    gt_stat("bf16 add (exact)", (double)bad_add, 0);
    gt_stat("mla assemble k, v (exact)", (double)bad_fwd, 0);
    gt_stat("mla assemble bwd (exact)", (double)bad_bwd, 0);
}

int main(void)
{
    test_seed();
    RUN(rmsnorm_matches_cpu);
    RUN(rope_matches_cpu);
    RUN(swiglu_matches_cpu);
    RUN(embedding_matches_cpu);
    RUN(mla_moves_match_cpu);
    if (gt_ctx_)
        gpu_ctx_destroy(gt_ctx_);
    TEST_EXIT();
}
