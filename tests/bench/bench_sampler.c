/* bench_sampler: lib/sampler's draw on the host, microseconds a token, for docs/PERF.md:
 * sampler_sample over a whole vocabulary (what the CPU engine, a prompt's first token and
 * DSV3_SAMPLE_FULL=1 run) with dsv3-sample's defaults (llama.cpp's: temperature 0.8, top-k
 * 40, top-p 0.95, min-p 0.05), with --repeat-penalty 1.1 over a window of 64, and with top-k
 * off (then top-p 0.95 and min-p decide); then sampler_sample_top from the K largest (the GPU
 * engine's sampled steps). Logits "flat": uniform in [-2, 2) (top-p then keeps most of the
 * vocabulary); "peaked": 12 u^16 - 2 (a few dozen ids hold most of the mass, as a trained
 * model's); fixed seed. Usage: bench_sampler [V [REPS]] (129280, 200). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "../../lib/sampler.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int by_rank(const void *a, const void *b)
{
    const sampler_cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int main(int argc, char **argv)
{
    int V = argc > 1 ? atoi(argv[1]) : 129280, reps = argc > 2 ? atoi(argv[2]) : 200;
    if (V < 64 || reps < 1) {
        fprintf(stderr, "usage: bench_sampler [V [REPS]]\n");
        return 2;
    }
    float *l = malloc((size_t)V * sizeof *l);
    sampler_cand *all = malloc((size_t)V * sizeof *all);
    int32_t hist[64];
    if (!l || !all)
        return 1;
    for (int peaked = 0; peaked < 2; peaked++) {
    uint64_t x = 12345;
    for (int v = 0; v < V; v++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        double u = (x >> 11) * 0x1p-53;
        l[v] = (float)(peaked ? 12 * pow(u, 16) - 2 : u * 4 - 2);
        all[v] = (sampler_cand){v, l[v], 0};
    }
    qsort(all, (size_t)V, sizeof *all, by_rank);
    for (int i = 0; i < 64; i++)
        hist[i] = all[(i * 7) % 200].id;  /* a window among the top tokens */
    struct {
        const char *name;
        double penalty;
        int top_k;
    } runs[] = {{"defaults", 1.0, 40}, {"repeat-penalty 1.1, last 64", 1.1, 40},
                {"top-k off", 1.0, 0}};
    for (int k = 0; k < 3; k++) {
        sampler_params p;
        sampler_params_default(&p);
        p.repeat_penalty = runs[k].penalty;
        p.top_k = runs[k].top_k;
        sampler s;
        if (sampler_init(&s, &p, V, NULL))
            return 1;
        long sum = 0;
        double t0 = now();
        for (int r = 0; r < reps; r++)
            sum += sampler_sample(&s, l, hist, 64);
        double full = (now() - t0) / reps * 1e6;
        int need = sampler_top_need(&s, 64);
        double top = 0;
        if (need) {
            t0 = now();
            for (int r = 0; r < reps; r++)
                sum += sampler_sample_top(&s, all, need, hist, 64);
            top = (now() - t0) / reps * 1e6;
        }
        printf("V %d, %s logits, %s: sampler_sample %.1f us a token; from the %d largest "
               "%.2f us%s (%ld)\n", V, peaked ? "peaked" : "flat", runs[k].name, full, need, top,
               need ? "" : " (needs every logit)", sum);
        sampler_free(&s);
    }
    }
    free(l);
    free(all);
    return 0;
}
