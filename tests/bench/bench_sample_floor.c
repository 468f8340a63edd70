/* bench_sample_floor: the memory-bandwidth floor of decoding on this machine. Measures memcpy
 * bandwidth (best of 8 copies of a 256 MiB buffer, on 1 thread and on every processor, each
 * thread its own part), then prints, for a batch of B sequences at an average context position
 * P, the bytes one decode step must read (float32 weights: everything but the routed experts
 * once, plus the routed experts B rows are expected to touch under uniform routing,
 * E (1 - (1 - K/E)^B) per MoE layer; plus every row's latent cache up to P) and the tokens/s
 * that reading them at the measured bandwidth allows. Run by scripts/bench-sample.sh.
 * With a fourth argument "gpu": the floor of kernels/ginfer on GPU 0 instead: bf16 weights
 * (the routers fp32) and bf16 cache, over the device-to-device copy bandwidth measured
 * here (kernels/gpu: 1 GiB, read + written, median of 20).
 * With "gpu-fp8": the same for the engine under DSV3_GINFER_FP8=1 on an FP8 checkpoint
 * (kernels/ginfer_fp8.cuh): the projections, dense MLPs and experts at 1 byte a weight plus
 * their fp32 scales (one per 128 weights of a row: 1/32 byte a weight); kv_b, the embedding
 * row and the head stay bf16, the routers fp32.
 * Usage: bench_sample_floor CONFIG.json B P [gpu|gpu-fp8]. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../kernels/gpu.h"
#include "../../lib/config.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double copy_bw(char *dst, const char *src, size_t n, int threaded)
{
    double best = 1e30;
    for (int r = 0; r < 8; r++) {
        double t0 = now();
#pragma omp parallel if (threaded)
        {
#ifdef _OPENMP
            extern int omp_get_thread_num(void), omp_get_num_threads(void);
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
            int t = 0, nt = 1;
#endif
            size_t lo = n / nt * t, hi = t == nt - 1 ? n : n / nt * (t + 1);
            memcpy(dst + lo, src + lo, hi - lo);
        }
        double dt = now() - t0;
        if (dt < best)
            best = dt;
    }
    return 2.0 * n / best;  /* bytes read plus bytes written, as STREAM's Copy counts */
}

/* The bytes one decode step of kernels/ginfer reads: bf16 weights but the fp32 routers; fp8:
 * the FP8 slots at 1 + 1/32 bytes a weight (see the header). */
static int gpu_floor(dsv3_config *c, double B, double P, int fp8)
{
    dsv3_err e;
    double gbs;
    if (gpu_copy_bandwidth(0, (size_t)1 << 30, 20, &gbs, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    config_counts k;
    config_count_params(c, &k);
    double E = c->n_routed_experts, K = c->num_experts_per_tok;
    double expert = 3.0 * c->hidden_size * c->moe_intermediate_size;
    int moe_layers = c->num_hidden_layers - c->first_k_dense_replace;
    double routed_one = moe_layers * K * expert;
    double touched = E > 0 ? E * (1 - pow(1 - K / E, B)) : 0;
    double routers = (double)moe_layers * E * c->hidden_size;
    double params = (double)k.active - routed_one + moe_layers * touched * expert;
    double weights = 2 * params + 2 * routers;
    if (fp8) {
        double kvb = (double)c->num_hidden_layers * c->num_attention_heads *
                     (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank;
        double keep = (double)k.lm_head + c->hidden_size + kvb;  /* bf16: head, embed row, kv_b */
        if (c->q_lora_rank % 128)  /* q_b's rows not in 128s: the engine keeps it bf16 */
            keep += (double)c->num_hidden_layers * c->num_attention_heads *
                    (c->qk_nope_head_dim + c->qk_rope_head_dim) * c->q_lora_rank;
        weights = (1 + 1.0 / 32) * (params - keep - routers) + 2 * keep + 4 * routers;
    }
    double cache = B * P * c->num_hidden_layers * (c->kv_lora_rank + c->qk_rope_head_dim) * 2.0;
    double step = (weights + cache) / (gbs * 1e9);
    printf("device copy %.1f GB/s%s; batch %.0f at position %.0f: weights %.1f MB + cache %.2f MB "
           "a step, floor %.1f tokens/s\n", gbs, fp8 ? " (fp8 weights)" : "", B, P,
           weights / 1e6, cache / 1e6, B / step);
    config_free(c);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: bench_sample_floor CONFIG.json B P [gpu|gpu-fp8]\n");
        return 2;
    }
    dsv3_config c;
    dsv3_err e;
    if (config_load(&c, argv[1], &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    double B = atof(argv[2]), P = atof(argv[3]);
    if (argc > 4 && (!strcmp(argv[4], "gpu") || !strcmp(argv[4], "gpu-fp8")))
        return gpu_floor(&c, B, P, !strcmp(argv[4], "gpu-fp8"));
    size_t n = (size_t)256 << 20;
    char *a = malloc(n), *b = malloc(n);
    if (!a || !b)
        return 1;
    memset(a, 1, n);
    memset(b, 2, n);
    double bw1 = copy_bw(b, a, n, 0), bwn = copy_bw(b, a, n, 1);
    double bw = bwn > bw1 ? bwn : bw1;
    config_counts k;
    config_count_params(&c, &k);
    double E = c.n_routed_experts, K = c.num_experts_per_tok;
    double expert = 3.0 * c.hidden_size * c.moe_intermediate_size;
    int moe_layers = c.num_hidden_layers - c.first_k_dense_replace;
    double routed_one = moe_layers * K * expert;
    double touched = E > 0 ? E * (1 - pow(1 - K / E, B)) : 0;
    double weights = 4 * ((double)k.active - routed_one + moe_layers * touched * expert);
    double cache = B * P * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 4.0;
    double step = (weights + cache) / bw;
    printf("memcpy %.2f GB/s (1 thread), %.2f GB/s (all threads); batch %.0f at position %.0f: "
           "weights %.1f MB + cache %.2f MB a step, floor %.1f tokens/s\n", bw1 / 1e9, bwn / 1e9,
           B, P, weights / 1e6, cache / 1e6, B / step);
    free(a);
    free(b);
    config_free(&c);
    return 0;
}
