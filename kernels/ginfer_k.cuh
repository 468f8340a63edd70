/* ginfer_k: the kernels of kernels/ginfer (C++ only): launchers on a stream, each returning 0
 * or -1 with a message. Weights are bf16 or, with wf32, fp32 (void pointers); activations
 * fp32; the cache bf16 or, with cf32, fp32. All pointers are device memory. Every row's
 * results are summed in an order that does not depend on the other rows or on N. */
#ifndef DSV3_GINFER_K_CUH
#define DSV3_GINFER_K_CUH

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/err.h"
#include "../lib/sampler_draw.h"

/* Programmatic dependent launch (PDL, Hopper: compute capability 9.0 and up), on unless
 * DSV3_GINFER_PDL=0 (gk_pdl_on; also off while profiling): every kernel here (and
 * kernels/ginfer's MTP and FP8 ones) is launched with gk_launch, which lets the
 * driver start it while the kernel before it in the stream is still running (stream capture
 * keeps the edge in the decode graphs). Each kernel then does, in this order:
 * 1. what needs nothing the kernels before it write: an L2 prefetch of the weights (or cache
 *    rows) the block is about to read (gk_prefetch_l2: a hint, it changes no value); its
 *    addresses come from the launch's arguments and from memory only host copies write (the
 *    rows' slots and positions) or, for the expert down-projection, the bucketing two
 *    launches back (done before this launch could start, see grouped_prefetch); kernels
 *    with nothing worth it (embedding, bucketing, gathers) skip this step;
 * 2. gk_pdl_wait (griddepcontrol.wait): until the kernel before has finished and its writes
 *    are visible; no kernel reads an activation or writes anything before it;
 * 3. gk_pdl_launch (griddepcontrol.launch_dependents): the next kernel may be scheduled and
 *    do its step 1 while this one works: right after the wait (GK_PDL_EARLY: the next
 *    kernel's prefetch has this one's whole run to overlap), or once the block's main loads
 *    are done (GK_PDL_LATE: the next kernel's blocks and prefetches do not compete with
 *    them). By default each launch kind takes the early trigger but the attention's three
 *    (gk_pdl_kind_late); DSV3_GINFER_PDL=1 the late one everywhere, 2 the early one
 *    everywhere. Always after the wait: at most one kernel ahead, so the prefetches in
 *    flight stay those of one launch. Every kernel's first parameter is its scheme
 *    (gk_launch passes it).
 * So the results are bitwise those of plain launches, and a step's chain of small kernels
 * overlaps each launch's start and its weights' first DRAM round trip with the kernel
 * before. Kernels launched the plain way (other modules') wait as usual; without PDL the
 * two instructions do nothing. The instructions exist from sm_90 (guarded: other targets
 * compile the prefetch and the waits away). */
__device__ __forceinline__ void gk_pdl_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void gk_pdl_launch()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* The scheme a launch runs (DSV3_GINFER_PDL, gk_pdl_mode and gk_pdl_kind_late), every
 * gk_launch kernel's first parameter m: when the kernel lets the next one start, and
 * whether it prefetches. */
enum {
    GK_PDL_OFF = 0,   /* plain launch: no prefetch (the wait and trigger do nothing) */
    GK_PDL_LATE = 1,  /* prefetch, wait; trigger once the block's main loads are done
                         (gk_pdl_late): the next kernel's blocks and prefetches do not
                         compete with this one's loads */
    GK_PDL_EARLY = 2, /* prefetch, wait, trigger at once: the next kernel's prefetch has
                         this one's whole run to overlap */
    GK_PDL_ENTRY = 3, /* wait and trigger at entry, no prefetch: the scheme measured slower
                         on 2026-11-27 (docs/PERF.md), for comparison */
};

/* The wait; the trigger too under the early and entry schemes. */
__device__ __forceinline__ void gk_pdl_enter(int m)
{
    gk_pdl_wait();
    if (m >= GK_PDL_EARLY)
        gk_pdl_launch();
}

/* Timing only (DSV3_GINFER_CLOCK=1; kernels/ginfer.cu clock_report): a kernel's phases as
 * thread 0 of its first block sees them, summed over launches into clk (one kernel's
 * GK_CLK_N slots; NULL: nothing): gk_clk(clk, i, k) adds the SM cycles since the last mark
 * in k to slot i and marks; gk_clk_end counts the launch and adds the cycles and the
 * global-timer nanoseconds since gk_clk_start (to convert cycles to time). The atomics are
 * one thread's, a few a launch: the timed phases barely move. */
#define GK_CLK_N 16
enum { GK_CLK_CYC = GK_CLK_N - 3, GK_CLK_NS = GK_CLK_N - 2, GK_CLK_CNT = GK_CLK_N - 1 };
struct gk_clock {
    long long t, c0, n0;
};

__device__ __forceinline__ bool gk_clk_on(const unsigned long long *clk)
{
    return clk && threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
}

__device__ __forceinline__ long long gk_globaltimer()
{
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void gk_clk_start(const unsigned long long *clk, gk_clock &k)
{
    if (gk_clk_on(clk)) {
        k.t = k.c0 = clock64();
        k.n0 = gk_globaltimer();
    }
}

__device__ __forceinline__ void gk_clk(unsigned long long *clk, int i, gk_clock &k)
{
    if (gk_clk_on(clk)) {
        long long n = clock64();
        atomicAdd(clk + i, (unsigned long long)(n - k.t));
        k.t = n;
    }
}

__device__ __forceinline__ void gk_clk_end(unsigned long long *clk, gk_clock &k)
{
    if (gk_clk_on(clk)) {
        long long c = clock64(), n = gk_globaltimer();
        atomicAdd(clk + GK_CLK_CYC, (unsigned long long)(c - k.c0));
        atomicAdd(clk + GK_CLK_NS, (unsigned long long)(n - k.n0));
        atomicAdd(clk + GK_CLK_CNT, 1ull);
    }
}

/* The late scheme's trigger: where a kernel's main loads are done (any warp's call counts
 * for its block; a block that exits before it counts as well). */
__device__ __forceinline__ void gk_pdl_late(int m)
{
    if (m == GK_PDL_LATE)
        gk_pdl_launch();
}

/* Whether this launch prefetches before its wait. */
__device__ __forceinline__ bool gk_pdl_pf(int m)
{
    return m == GK_PDL_LATE || m == GK_PDL_EARLY;
}

/* The most bytes a block prefetches into L2 before its wait. A block prefetches only what
 * it reads itself, and only blocks resident during the kernel before do so ahead of time:
 * at most 132 SMs x 8 blocks x 32 KB = 34 MB, under the L2 (50 MB H100, 60 MB H200). */
#define GK_PF_BLOCK (32 * 1024)

/* One thread's asynchronous L2 prefetch of the 16-byte aligned bytes inside [p, p + bytes)
 * (cp.async.bulk.prefetch: the copy engine fetches them, the thread goes on at once). */
__device__ __forceinline__ void gk_prefetch_l2(const void *p, size_t bytes)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    size_t g = __cvta_generic_to_global(p);  /* the instruction takes a global address */
    size_t a = (g + 15) & ~(size_t)15, b = (g + bytes) & ~(size_t)15;
    if (b > a)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a), "r"((unsigned)(b - a))
                     : "memory");
#else
    (void)p;
    (void)bytes;
#endif
}

/* One thread's L2 prefetch of the 128-byte line holding p (small things: FP8 row scales). */
__device__ __forceinline__ void gk_prefetch_line(const void *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)) : "memory");
#else
    (void)p;
#endif
}

/* A warp's NW weight rows of I values (a warp a row, NWARP warps a block), prefetched by its
 * lane 0: each row's first GK_PF_BLOCK / (NWARP * NW) bytes (the whole row at 1b-moe's
 * sizes; of a long row the part its loads take first). */
template <int NWARP, int NW, typename W>
__device__ __forceinline__ void gk_prefetch_rows(int m, const W *const *w, int I)
{
    const size_t cap = GK_PF_BLOCK / (NWARP * NW), row = (size_t)I * sizeof(W);
    if (gk_pdl_pf(m) && (threadIdx.x & 31) == 0)
#pragma unroll
        for (int a = 0; a < NW; a++)
            gk_prefetch_l2(w[a], row < cap ? row : cap);
}

/* The scheme of gk_launch's launches: off with DSV3_GINFER_PDL=0, on a device before compute
 * capability 9.0, and while kernels/ginfer profiles its launches (DSV3_GINFER_PROFILE: an
 * event after every launch keeps them apart anyway, and the capture then puts event nodes
 * between kernel nodes); else DSV3_GINFER_PDL=1 the late trigger, 3 the entry scheme, and
 * unset or anything else the early one (with the kinds of gk_pdl_kind_late late). Read at
 * each launch: a decode graph keeps what held at its capture, when the engine was made.
 * The schemes' history (docs/PERF.md): on an H100 in the sixth session the late trigger
 * decoded 1b-moe at 1,083 tokens/s against 957 early (953 plain); on the H200 the early one
 * was faster or slower by turns as the kernels changed, until the fourteenth session found
 * that what it lost was in the attention's three launches: early but those, 570 us a 1b-moe
 * step against 618 late and 603 early everywhere (small: 214, 238, 206). */
static inline int gk_pdl_mode()
{
    const char *v = getenv("DSV3_GINFER_PDL"), *p = getenv("DSV3_GINFER_PROFILE");
    int dev, major = 0;
    if ((v && !strcmp(v, "0")) || (p && *p && strcmp(p, "0")))
        return GK_PDL_OFF;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        major < 9)
        return GK_PDL_OFF;
    return v && !strcmp(v, "1") ? GK_PDL_LATE : v && !strcmp(v, "3") ? GK_PDL_ENTRY : GK_PDL_EARLY;
}

/* The launch kinds that keep the late trigger under the early scheme (a comma-separated
 * list): DSV3_GINFER_PDL_LATE when set (empty: none), else none with DSV3_GINFER_PDL=2 and
 * by default the attention's launches: the q_lat GEMV that writes the cache row ("kvw"),
 * the parts ("attn") and the uv GEMV with the combine ("uvc"). Their blocks are the
 * heaviest of a step (the parts: 104-128 registers a thread and 56 KB of shared memory; the
 * uv GEMV: 255 registers), and started early beside the launch before they slowed the
 * step (fourteenth session, docs/PERF.md). */
#define GK_PDL_LATE_KINDS "attn,kvw,uvc"
static inline const char *gk_pdl_late_kinds()
{
    const char *l = getenv("DSV3_GINFER_PDL_LATE"), *v = getenv("DSV3_GINFER_PDL");
    if (l)
        return l;
    return v && !strcmp(v, "2") ? "" : GK_PDL_LATE_KINDS;
}

/* Whether the comma-separated list v names kind (NULL or empty: no). */
static inline int gk_kind_listed(const char *v, const char *kind)
{
    size_t n = kind ? strlen(kind) : 0;
    if (!n)
        return 0;
    for (const char *p = v; (p = strstr(p, kind)) != NULL; p += n)
        if ((p == v || p[-1] == ',') && (p[n] == ',' || !p[n]))
            return 1;
    return 0;
}

/* Whether launches of kind (a short name: "gemv", "norm", "qb", "kvw", "attn", "uvc",
 * "route", "up", "down"; NULL for the others) keep the late trigger under the early scheme. */
static inline int gk_pdl_kind_late(const char *kind)
{
    return gk_kind_listed(gk_pdl_late_kinds(), kind);
}

static inline int gk_pdl_on()
{
    return gk_pdl_mode() != GK_PDL_OFF;
}

/* DSV3_GINFER_CARVEOUT=N (0-100): every launch here asks for a shared memory carveout of N
 * percent of the most an SM has (the rest is L1), so that all kernels of a step share one
 * L1/shared split. The reason to try it: an SM is understood to hold blocks of two kernels
 * only when their splits agree, so with the driver's own choice per kernel (the default,
 * -1 here) a kernel whose needs differ from its predecessor's (the attention's 110 KB
 * against the GEMVs' none) cannot start its blocks on the SMs the predecessor still runs
 * on, and under PDL its blocks then go where SMs free up first, maybe several to an SM
 * (a suspected cause of the slower PDL steps of docs/PERF.md, 2026-11-27; not measured).
 * An experiment for the device (scripts/bench-sample.sh ENVS=...); unset, empty or out of
 * range: no preference. */
static inline int gk_carveout()
{
    const char *v = getenv("DSV3_GINFER_CARVEOUT");
    char *end;
    long n = v && *v ? strtol(v, &end, 10) : -1;
    return v && *v && !*end && n >= 0 && n <= 100 ? (int)n : -1;
}

/* Launches kernel k (its first parameter the scheme, gk_pdl_mode's, or the late trigger for
 * a kind gk_pdl_kind_late lists; args the others). */
template <typename... KArgs, typename... Args>
static inline void gk_launch_as(const char *kind, void (*k)(int, KArgs...), dim3 grid,
                                dim3 block, size_t smem, cudaStream_t s, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[2];
    unsigned n = 0;
    int m = gk_pdl_mode();
    if (m == GK_PDL_EARLY && gk_pdl_kind_late(kind))
        m = GK_PDL_LATE;
    if (m != GK_PDL_OFF) {
        at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    int c = gk_carveout();
    if (c >= 0) {
        at[n].id = cudaLaunchAttributePreferredSharedMemoryCarveout;
        at[n++].val.sharedMemCarveout = (unsigned)c;
    }
    cfg.attrs = at;
    cfg.numAttrs = n;
    cudaLaunchKernelEx(&cfg, k, m, (KArgs)args...);
}

template <typename... KArgs, typename... Args>
static inline void gk_launch(void (*k)(int, KArgs...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t s, Args... args)
{
    gk_launch_as(NULL, k, grid, block, smem, s, args...);
}

/* A MoE layer's output not yet summed , for gk_add_norm to take
 * as its delta: delta[n] = sum_k rw[n*K+k] * ye[spos[n*K+k]] (k in order), + ys[n] when ys. */
typedef struct gk_moe_out {
    const float *ye, *rw, *ys;
    const int *spos;
    int K;
} gk_moe_out;

/* x[N,H] = table[ids[n]]. */
int gk_embed(cudaStream_t s, float *x, const void *table, int wf32, const int32_t *ids, int N,
             int H, dsv3_err *e);
/* x += the MoE output mo describes (mo or its ye may be NULL), then x += delta (may be NULL),
 * then out = w * x * rstd(x) per row of D (rows of x ldx apart, of out and delta D apart). */
int gk_add_norm(cudaStream_t s, float *x, int ldx, const float *delta, const gk_moe_out *mo,
                const float *w, float *out, int N, int D, float eps, dsv3_err *e);
/* For b < batch: y[b][n][o] = sum_i x[b][n][i] w[b][o][i], with row n of x at
 * x + b*xbs + n*ldx, weight row o at w + b*wbs + o*I, y at y + b*ybs + n*ldy + o.
 * I a multiple of 8; x rows 16-byte aligned. */
int gk_gemv(cudaStream_t s, const float *x, long ldx, long xbs, const void *w, int wf32, long wbs,
            float *y, long ldy, long ybs, int N, int I, int O, int batch, dsv3_err *e);
/* One GEMV of x [N, I] with w [O, I] (batch 1) whose first O1 outputs go to y1 (rows ldy1
 * apart) and the rest to y2 (rows ldy2 apart): two products of one input (q's and kv_a's
 * rows stored together) in one launch, each output bitwise gk_gemv's. */
int gk_gemv_two(cudaStream_t s, const float *x, long ldx, const void *w, int wf32, float *y1,
                long ldy1, int O1, float *y2, long ldy2, int N, int I, int O, dsv3_err *e);
/* gk_gemv (batch 1) of the rows gk_add_norm(x, ldx, delta, mo, nw, eps) would write to its
 * out (I = D values a row), without that launch: each block normalises the rows itself
 * (bitwise gk_add_norm's values, its T-thread sums emulated); x is not updated (a later
 * gk_add_norm adds delta and mo again). gk_gemv_norm_fits: whether it takes N rows of I
 * values (decode-sized N, rows that fit its shared memory); else use gk_add_norm + gk_gemv. */
int gk_gemv_norm(cudaStream_t s, const float *x, int ldx, const float *delta,
                 const gk_moe_out *mo, const float *nw, float eps, const void *w, int wf32,
                 float *y, long ldy, int N, int I, int O, dsv3_err *e);
int gk_gemv_norm_fits(int N, int I);
/* The router in one launch: logits[N, E] = x[N, H] . router[E, H] (fp32, gk_gemv's sums),
 * then kernels/moe.cu's gpu_router_fwd (idx, rw, rs from the logits, the same operations)
 * and gk_moe_bucket(idx, N*K, K, E, ns, ...) done by the grid's last block (count: one
 * counter, zeroed once before the first call; each call leaves it zero). one: where
 * gk_route1_fits, one cluster of blocks with the rows in registers does it all instead
 * (bitwise the same outputs; the batch-1 decode's router). clk: DSV3_GINFER_CLOCK's
 * counters (NULL: none). */
int gk_route(cudaStream_t s, const float *x, const float *router, const float *bias,
             float *logits, float *rs, float *rw, int32_t *idx, int N, int H, int E, int G,
             int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
             unsigned *count, int one, unsigned long long *clk, dsv3_err *e);
int gk_route1_fits(int N, int H, int E);
/* Whether gk_route1_norm takes the shape (one row, H <= 1024, E <= 32). */
int gk_route1_norm_fits(int N, int H, int E);
/* The post-attention add_norm (x += delta, xn = norm(x) with weight nw, eps: add_norm_k's
 * values bitwise) and gk_route's one-cluster router of xn, in one launch, where
 * gk_route1_norm_fits. */
int gk_route1_norm(cudaStream_t s, float *x, const float *delta, const float *nw, float eps,
                   float *xn, const float *router, const float *bias, float *logits, float *rs,
                   float *rw, int32_t *idx, int N, int H, int E, int G, int TG, int K, int norm,
                   float scale, int ns, int *off, int *order, int *spos, unsigned long long *clk,
                   dsv3_err *e);
/* From kva[N, kv+rope] (rows ldkva apart): c_kv = norm(kva[:kv]) (weight w), k_pe =
 * rope(kva[kv:]), stored at cache + (slot[n]*n_ctx + pos[n]) * (kv+rope) (one layer's
 * cache); and RoPE (lib/ops rope_forward) on the q_pe part (from nope) of every head of
 * q[N, nh, qk] in place. */
int gk_kv_write(cudaStream_t s, const float *kva, int ldkva, const float *w, void *cache, int cf32,
                const int *slot, const int *pos, int N, int kv, int rope, int n_ctx,
                const float *cos_t, const float *sin_t, int interleave, float eps, float *q,
                int nh, int qk, int nope, dsv3_err *e);
/* One row (batch-1 decode without q_lora): q [nh qk] and kv_a [W] from x [I] with their bf16
 * weights stored together (w [nh qk + W, I], q's rows then kv_a's: gk_gemv_two's outputs,
 * bitwise), and q_lat[h] = W_uk[h]^T q_nope[h] (ukT [nh][kv][nope] bf16, qlat [nh][kv]:
 * gk_gemv_kvw's GEMV, bitwise) in one launch. The cache row and q_pe's rotation are left to
 * gk_attn_parts with a gk_kv_new. gk_gemv_lat_fits: the shapes it takes (nope 128, kv 512,
 * I <= 2048) and DSV3_GINFER_QLAT. pf (may be NULL): the layer's cache (rows of W values of
 * csz bytes, n_ctx a slot) whose rows before pos[0] of slot[0] the launch prefetches into
 * L2 for the attention after it (a hint; DSV3_GINFER_QLAT_PF=0: not, to compare). */
typedef struct gk_lat_pf {
    const void *cache;
    const int *slot, *pos;
    int n_ctx, csz;
} gk_lat_pf;
int gk_gemv_lat(cudaStream_t s, const float *x, const void *w, int I, int nh, int qk, int nope,
                int W, float *q, float *kva, const void *ukT, int kv, float *qlat,
                const gk_lat_pf *pf, dsv3_err *e);
int gk_gemv_lat_fits(int N, int I, int nh, int qk, int nope, int W, int kv);
/* gk_gemv (batched) and gk_kv_write (kva ... nope; the cache of the weights' type) in one
 * launch: the kv_write is one more row of blocks, so N <= the GEMV's blocks a batch entry,
 * (O + 7) / 8 (gk_gemv_kvw_fits); x must not read what kv_write writes (the q_lat GEMV reads
 * q's nope parts, kv_write rotates its pe parts). Results as the two launches'. */
int gk_gemv_kvw(cudaStream_t s, const float *x, long ldx, long xbs, const void *w, int wf32,
                long wbs, float *y, long ldy, long ybs, int N, int I, int O, int batch,
                const float *kva, int ldkva, const float *nw, void *cache, const int *slot,
                const int *pos, int kv, int rope, int n_ctx, const float *cos_t,
                const float *sin_t, int interleave, float eps, float *q, int nh, int qk,
                int nope, dsv3_err *e);
int gk_gemv_kvw_fits(int N, int O);
/* Buckets the NK expert choices idx[NK] by expert (stable): off[E+1], order[sorted] = a,
 * spos[a] = sorted position. E <= 1024. With ns > 0 a group E follows (the shared expert run
 * as one more group): off[E+1] = NK + ns, its rows NK + n take input row n (order = n*K).
 * Then, G = E + (ns > 0) groups: off[G+1] = how many groups have rows, off[G+2..] which
 * (off holds 2E + 4 values). */
int gk_moe_bucket(cudaStream_t s, const int32_t *idx, int NK, int K, int E, int ns, int *off,
                  int *order, int *spos, dsv3_err *e);
/* Gate-up-SwiGLU over groups: group g's weights w1 + g*w1_stride ([2F, H]: gate rows then up
 * rows). With order: group g owns sorted rows off[g]..off[g+1]-1, whose input is
 * x[order[j] / K]; h row j (sorted) = silu(gate) * up; only the groups off lists as having
 * rows run, at most maxact of them (blocks for the others would only exit). Without: one
 * group of N rows, h[n] from x[n]. rows_hint: the most rows a group can have (the tile). */
int gk_ffn_up(cudaStream_t s, const float *x, const void *w1, int wf32, long w1_stride, float *h,
              const int *order, const int *off, int K, int groups, int maxact, int N,
              int rows_hint, int H, int F, int one, dsv3_err *e);
/* Down projection over the same groups: y row j = w2_g [H, F] . h row j.
 * one: with off and N == 1, the one-row kernel (grouped1_k: one round trip after the wait
 * before the weights, bitwise the same values) for gk_ffn_up at one >= 1, gk_ffn_down at
 * one >= 2. */
int gk_ffn_down(cudaStream_t s, const float *h, const void *w2, int wf32, long w2_stride,
                float *y, const int *off, int groups, int maxact, int N, int rows_hint, int F,
                int H, int one, dsv3_err *e);
/* The fused "msum" decode launch: gk_ffn_down over the routed groups (and the shared group E
 * when ns) for N decode rows, each row's outputs weighted and summed into x[N, H] in place
 * as gk_add_norm would add them (bitwise): x[n] += sum_k rw[n,k] * w2_{idx[n,k]} . h[spos[n,k]]
 * (+ w2_E . h[N*K + n]). Each weight row is read once a row (the grouped launch reads it once
 * a group), so only decode-sized N take it (gk_down_sum_fits). */
int gk_down_sum(cudaStream_t s, float *x, const float *h, const void *w2, int wf32,
                long w2_stride, const int32_t *idx, const int *spos, const float *rw, int N,
                int K, int E, int ns, int F, int H, dsv3_err *e);
int gk_down_sum_fits(int N, int K);
/* out[k] = x[rows[k]] for k < n (rows of D floats). */
int gk_gather_rows(cudaStream_t s, float *out, const float *x, const int *rows, int n, int D,
                   dsv3_err *e);

/* The next decode step's inputs, made on the device by a step's argmax (ginfer_greedy_submit:
 * no upload waits for the host): in, the step's input rows [4][stride] (ids, slots,
 * positions, ring places); spare, the padding rows' slot; host, mapped pinned memory
 * [places][cap] that gets each row's id at its ring place. */
typedef struct gk_feed {
    int32_t *in;
    int stride, spare;
    int32_t *host;
    int places, cap;
} gk_feed;

/* Each row's greedy choice among logits[N, V]: out[n] = the id of row n's largest logit, ids
 * with ban[v] != 0 (ban may be NULL) taken as -inf, ties to the lowest id (as a serial scan
 * with ">" from id 0 finds it; -0 equal to +0).
 * With feed (or NULL), row n's id also goes to host[place * cap + n], place = in[3 stride +
 * n], and the row becomes the next step's: in[n] = its id, its position in[2 stride + n] one
 * further unless its slot in[stride + n] is spare, its place the next (mod places). Written
 * after every launch before this one has finished (each waits for the one before it), so
 * the graph's own reads of its inputs are done. */
int gk_argmax(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban,
              void *scratch, int cap, int32_t *out, const gk_feed *feed, dsv3_err *e);
/* The K largest logits of each row (a sampled step's candidates, lib/sampler's
 * sampler_sample_top): best[n][0..K) = (id, logit) of row n's K largest, largest first, ties
 * to the lower id (-0 equal to +0), banned ids (ban[v] != 0, ban may be NULL) as -inf;
 * K <= gk_topk_max(V) (256 up to V = 524288). Not a PDL launch (it runs after a decode
 * graph). The scratch (gk_topk_scratch(cap, V, K') bytes for up to cap rows and K <= K') is
 * zeroed once before the first call; each call leaves it ready for the next. */
enum { GK_TOPK_MAX = 256 };
typedef struct gk_cand {
    int32_t id;
    float logit;
} gk_cand;
int gk_topk(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban, int K,
            void *scratch, int cap, gk_cand *best, dsv3_err *e);
/* gk_topk's candidates drawn from on the device instead of written out, at the end of a
 * decode graph in place of gk_argmax: row n's draw[n] (lib/sampler_draw: greedy, or top-k,
 * top-p, min-p, temperature and the draw from its random state, which moves on) from its
 * draw[n].top_k <= K largest logits (K: the scratch's room a row), bit for bit lib/sampler's
 * sampler_draw_top on them; the id then feeds the next step as gk_argmax's feed does.
 * clk (DSV3_GINFER_CLOCK, or NULL): the phases of block 0's part and of row 0's last block. */
int gk_topk_draw(cudaStream_t s, const float *logits, int N, int V, const uint8_t *ban, int K,
                 void *scratch, int cap, gk_cand *best, sampler_draw *draw,
                 const gk_feed *feed, unsigned long long *clk, dsv3_err *e);
size_t gk_topk_scratch(int cap, int V, int K);
int gk_topk_max(int V);
/* Bytes of gk_argmax's scratch for up to cap rows: zeroed once before the first call (each
 * call leaves it ready for the next, whatever its N). */
size_t gk_argmax_scratch(int cap);

/* decode_attn.cu: absorbed MLA attention over one layer's latent cache.
 * qlat[N, nh, kv] (q_nope through W_uk), q[N, nh, qk] (q_pe at nope..qk, rotated); row n
 * sees positions 0..pos[n] of slot slot[n]. Each sequence is cut into nsplit parts; part
 * results (max, sum, weighted latents: pm, pl [N*nh*nsplit], pacc [N*nh*nsplit*kv]) are
 * combined into olat[N, nh, kv]. The split count changes the rounding, so callers keep it
 * fixed for a given n_ctx. gk_attn_setup (outside any capture) allows the shared memory. */
int gk_attn_setup(int cf32, int nh, int kv, int rope, dsv3_err *e);
int gk_attn(cudaStream_t s, float *olat, float *pm, float *pl, float *pacc, const float *qlat,
            const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
            const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit, float scale,
            unsigned *count, dsv3_err *e);
/* count NULL: the combine is a second launch; else the parts are combined inside the split
 * kernel by each (row, head group)'s last block to finish (count: gk_attn_counts(N, nh)
 * bytes of counters, zeroed once before the first call; each call leaves them zero), with
 * the same sums in the same order. */
size_t gk_attn_counts(int N, int nh);
/* The newest cache row's inputs for one-row attention parts that form it themselves (after
 * gk_gemv_lat, which leaves the cache row and q_pe's rotation to them): kva [kv + rope]
 * (kv_a's output), the latent's norm weight w, the rotation tables, interleave and eps as
 * gk_kv_write takes them. */
typedef struct gk_kv_new {
    const float *kva, *w, *cos_t, *sin_t;
    int interleave;
    float eps;
} gk_kv_new;
/* gk_attn's parts only (pm, pl, pacc), left for gk_gemv_uvc to combine. nr NULL: the cache
 * holds the newest row and q_pe is rotated (gk_kv_write or gk_gemv_kvw before); else (one
 * row, every part one chunk: gk_attn_new_fits) the part holding the newest position forms
 * that row from nr as gk_kv_write would (the same bits) and writes it to the cache, and
 * every part rotates its heads' q_pe as it loads them (q is not written). */
int gk_attn_parts(cudaStream_t s, float *pm, float *pl, float *pacc, const float *qlat,
                  const float *q, int qk, int nope, const void *cache, int cf32, const int *slot,
                  const int *pos, int N, int nh, int kv, int rope, int n_ctx, int nsplit,
                  float scale, const gk_kv_new *nr, unsigned long long *clk, dsv3_err *e);
int gk_attn_new_fits(int N, int kv, int rope, int n_ctx, int nsplit);
/* The fused "uvc" decode launch: the batched GEMV y[n, b] = W_b . olat[n, b] (gk_gemv with
 * x = olat: rows ldx apart, heads xbs = I apart; batch = heads) where each block first
 * combines its head's attention parts (gk_attn_parts' pm, pl, pacc of nsplit parts) for the
 * N rows into shared memory, as gk_attn's combine would write olat: the combine's launch is
 * saved and no single block combines many heads. Decode-sized N only (gk_gemv_uvc_fits). */
int gk_gemv_uvc(cudaStream_t s, const float *pm, const float *pl, const float *pacc,
                int nsplit, const void *w, int wf32, long wbs, float *y, long ldy, long ybs,
                int N, int I, int O, int batch, unsigned long long *clk, dsv3_err *e);
int gk_gemv_uvc_fits(int N, int I);
/* gk_route with the post-attention norm inside (the fused "post" decode launch): the rows it
 * routes are those gk_add_norm(x, H, delta, mo, nw, eps) would write to xn; every block
 * normalises them itself, the last block also writes x (the sums) and xn (the normed rows)
 * as that add_norm would, for the experts after it: the norm's launch is saved.
 * gk_route_norm_fits: decode-sized N whose rows fit shared memory. */
int gk_route_norm(cudaStream_t s, float *x, const float *delta, const gk_moe_out *mo,
                  const float *nw, float eps, float *xn, const float *router, const float *bias,
                  float *logits, float *rs, float *rw, int32_t *idx, int N, int H, int E, int G,
                  int TG, int K, int norm, float scale, int ns, int *off, int *order, int *spos,
                  unsigned *count, dsv3_err *e);
int gk_route_norm_fits(int N, int H, int E);

#endif
