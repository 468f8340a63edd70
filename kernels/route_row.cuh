/* route_row.cuh: the DeepSeek-V3 router for one token by one warp (sigmoid scores, bias for
 * the choice only, group-limited top-k with a group scored by its two best, weights
 * normalised and scaled), shared by training's router_kernel (kernels/moe.cu) and the decode
 * engine's fused router (kernels/ginfer_k.cu): one copy, so both make the same choices with
 * the same operations in the same order as lib/ops. route_row32, batch-1 decode's form for at
 * most 32 experts, ranks instead of taking rounds and gives the same bits
 * (tests/gpu/test_ginfer_route). */
#ifndef DSV3_ROUTE_ROW_CUH
#define DSV3_ROUTE_ROW_CUH

#include <math.h>
#include <stdint.h>

/* Warp-wide argmax over (valid, value, index): larger value wins, equal values go to the
 * lower index, invalid entries lose; every lane gets the winner. */
__device__ __forceinline__ void route_argmax(int &valid, float &v, int &i)
{
    for (int o = 16; o > 0; o >>= 1) {
        int ov = __shfl_xor_sync(0xffffffffu, valid, o);
        float ovl = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov && (!valid || ovl > v || (ovl == v && oi < i))) {
            valid = 1;
            v = ovl;
            i = oi;
        }
    }
}

/* Group g's score from the biased choices c: the sum of its two best, or its one expert's
 * choice in a group of one (lib/ops sums at most the group's size). */
__device__ __forceinline__ float route_group_score(const float *c, int g, int per)
{
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int x = g * per; x < (g + 1) * per; x++) {
        if (c[x] > b1) {
            b2 = b1;
            b1 = c[x];
        } else if (c[x] > b2) {
            b2 = c[x];
        }
    }
    return per > 1 ? b1 + b2 : b1;
}

/* Row n's top-k experts (idx) and weights (w) from its router logits, the sigmoid scores kept
 * in s (the backward's); choice and taken: the warp's [E] shared scratch. The logits are read
 * through L2 (in the decode engine other blocks of the same grid wrote them). */
static __device__ void route_row(int32_t *idx, float *w, float *s, const float *logits,
                                 const float *bias, int n, int E, int G, int TG, int K,
                                 int norm, float scale, float *choice, unsigned char *taken)
{
    int lane = threadIdx.x & 31;
    const float *l = logits + (long)n * E;
    float *sr = s + (long)n * E;
    for (int x = lane; x < E; x += 32) {
        float sv = 1.0f / (1.0f + expf(-__ldcg(l + x)));
        sr[x] = sv;
        choice[x] = sv + (bias ? bias[x] : 0.0f);
        taken[x] = 0;
    }
    __syncwarp();
    int per = E / G;
    float gs = lane < G ? route_group_score(choice, lane, per) : 0.0f;
    unsigned keep = 0;
    for (int r = 0; r < TG; r++) {
        int valid = lane < G && !((keep >> lane) & 1);
        float v = gs;
        int i = lane;
        route_argmax(valid, v, i);
        keep |= 1u << i;
    }
    float wsum = 0, mine = 0;
    for (int r = 0; r < K; r++) {
        int valid = 0, i = 0;
        float v = -INFINITY;
        for (int x = lane; x < E; x += 32)
            if (((keep >> (x / per)) & 1) && !taken[x] && (!valid || choice[x] > v)) {
                valid = 1;
                v = choice[x];
                i = x;
            }
        route_argmax(valid, v, i);
        if (lane == 0)
            taken[i] = 1;
        __syncwarp();
        float sv = sr[i];
        wsum += sv;
        if (lane == r) {
            mine = sv;
            idx[(long)n * K + r] = i;
        }
    }
    if (lane < K)
        w[(long)n * K + lane] = norm ? mine / (wsum + 1e-20f) * scale : mine * scale;
    __syncwarp();
}

/* Whether (v, i) comes before (u, j) in route_argmax's order: larger value first, equal values
 * lower index first. */
__device__ __forceinline__ bool route_before(float v, int i, float u, int j)
{
    return v > u || (v == u && i < j);
}

/* The groups kept (bit g: group g), ranked by their scores from the biased choices sc (group
 * g: sc[g per, (g + 1) per)) in route_argmax's order, each lane counting the groups before
 * its own over svr (the warp's scratch, holding the scores; NaN past G: before no one). */
__device__ __forceinline__ unsigned route_kept_groups(const float *sc, float *svr, int G, int TG,
                                                      int per)
{
    int lane = threadIdx.x & 31;
    float gs = lane < G ? route_group_score(sc, lane, per) : 0.0f;
    svr[lane] = lane < G ? gs : __int_as_float(0x7fffffff);
    __syncwarp();
    int grank = 0;
#pragma unroll
    for (int h = 0; h < 32; h++) {
        if (h >= G)  /* few groups (4 or 8): stop there */
            break;
        grank += route_before(svr[h], h, gs, lane);
    }
    return __ballot_sync(0xffffffffu, lane < G && grank < TG);
}

/* The chosen experts in order (ir[r], their scores svr[r], r < K, in the warp's shared
 * scratch) out as row n's idx and weights, the scores summed in choice order as route_row
 * sums them. */
__device__ __forceinline__ void route_rows_out(int32_t *idx, float *w, int n, int K, int norm,
                                               float scale, const float *svr, const int *ir)
{
    int lane = threadIdx.x & 31;
    float wsum = 0;
#pragma unroll
    for (int r = 0; r < 32; r++)
        if (r < K)
            wsum += svr[r];
    if (lane < K) {
        float mine = svr[lane];
        idx[(long)n * K + lane] = ir[lane];
        w[(long)n * K + lane] = norm ? mine / (wsum + 1e-20f) * scale : mine * scale;
    }
    __syncwarp();
}

/* route_row for E <= 32, one expert a lane (lane x: its logit l and bias bx, 0 without one):
 * the groups and then the experts are ranked in route_argmax's order, each lane counting
 * those before it with one round of shuffles, instead of TG + K dependent rounds of
 * route_argmax. The same choices in the same order, the weights summed in that order: route_row's
 * outputs bitwise (for logits that are not NaN). Returns the lane's rank among the candidates
 * (>= K: not chosen) and leaves the chosen experts in ir[K] (shared); sc, svr: the warp's [32]
 * shared scratch. The loops run over all 32 lanes, unrolled, with a lane's group and the
 * kept experts as bit masks: the shuffles of a loop are independent, and no division is left
 * in them (a division by the group size in each step of a loop over the experts, and the
 * loops' runtime bounds, made this one warp's chain ~9,800 cycles, 5 us, of the 1b-moe
 * router's 7.7: DSV3_GINFER_CLOCK, docs/KERNELS.md). */
static __device__ int route_row32(int32_t *idx, float *w, float *s, float l, float bx, int n,
                                  int E, int G, int TG, int K, int norm, float scale, float *sc,
                                  float *svr, int *ir)
{
    int lane = threadIdx.x & 31, per = E / G, grp = lane / per;
    float sv = 0, c = 0;
    if (lane < E) {
        sv = 1.0f / (1.0f + expf(-l));
        s[(long)n * E + lane] = sv;
        c = sv + bx;
        sc[lane] = c;
    }
    __syncwarp();
    /* Ranks from shared memory: every lane reads all 32 values (broadcast loads, issued
     * together), entries that must not count set to NaN (no comparison with NaN is true, so
     * they count for no one: exact whatever the scores), and a lane is never before itself.
     * (With one shuffle a value, ptxas chained each shuffle to the compare before it: ~25
     * cycles a step, 32 steps a loop.) svr holds the group scores until the ranks are read. */
    unsigned keep = route_kept_groups(sc, svr, G, TG, per);
    bool cand = lane < E && ((keep >> grp) & 1);
    sc[lane] = cand ? c : __int_as_float(0x7fffffff);  /* the kept groups' experts */
    __syncwarp();
    int rank = 0;
#pragma unroll
    for (int y = 0; y < 32; y++)
        rank += route_before(sc[y], y, c, lane);
    __syncwarp();  /* every lane's reads of svr done before its rows are written below */
    if (!cand)
        rank = 32;
    if (rank < K) {
        svr[rank] = sv;
        ir[rank] = lane;
    }
    __syncwarp();
    route_rows_out(idx, w, n, K, norm, scale, svr, ir);
    return rank;
}

/* route_row32 for E <= 64, two experts a lane (lane x: experts x and 32 + x, their logits l
 * and biases bx): the same ranks by the same comparisons, each lane counting over the 64
 * values in shared memory for each of its two; rank[j] (>= K: not chosen) for bucket_row64.
 * sc, svr: the warp's [64] shared scratch, ir [64]. With every group kept (TG == G: route_row
 * keeps all G groups whatever their scores), the groups' scores are not formed: a group of 64
 * experts (n_group 1) would take one lane 64 dependent steps. */
static __device__ void route_row64(int32_t *idx, float *w, float *s, const float (&l)[2],
                                   const float (&bx)[2], int n, int E, int G, int TG, int K,
                                   int norm, float scale, float *sc, float *svr, int *ir,
                                   int (&rank)[2])
{
    const unsigned full = 0xffffffffu;
    int lane = threadIdx.x & 31, per = E / G;
    float sv[2] = {0, 0}, c[2] = {0, 0};
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int x = lane + 32 * j;
        if (x < E) {
            sv[j] = 1.0f / (1.0f + expf(-l[j]));
            s[(long)n * E + x] = sv[j];
            c[j] = sv[j] + bx[j];
            sc[x] = c[j];
        }
    }
    __syncwarp();
    unsigned keep = G >= 32 ? full : (1u << G) - 1;
    if (TG < G)
        keep = route_kept_groups(sc, svr, G, TG, per);
    bool cand[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int x = lane + 32 * j;
        cand[j] = x < E && ((keep >> (x / per)) & 1);
    }
    __syncwarp();  /* the group scores' reads of sc done */
#pragma unroll
    for (int j = 0; j < 2; j++) {
        sc[lane + 32 * j] = cand[j] ? c[j] : __int_as_float(0x7fffffff);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 2; j++) {
        int x = lane + 32 * j, r = 0;
#pragma unroll
        for (int y = 0; y < 64; y++)
            r += route_before(sc[y], y, c[j], x);
        rank[j] = cand[j] ? r : 64;
    }
    __syncwarp();  /* every lane's reads of sc and svr done before the rows are written */
#pragma unroll
    for (int j = 0; j < 2; j++)
        if (rank[j] < K) {
            svr[rank[j]] = sv[j];
            ir[rank[j]] = lane + 32 * j;
        }
    __syncwarp();
    route_rows_out(idx, w, n, K, norm, scale, svr, ir);
}

#endif
