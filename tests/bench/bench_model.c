/* bench_model: time of one forward and one backward of the CPU model on 1 thread and on
 * THREADS threads (default: every processor), same random weights and ids, and whether
 * the two runs' logits and gradients are bitwise equal. Run by scripts/bench-model.sh.
 * Usage: bench_model CONFIG.json B T [REPS] [THREADS]. Output: one line per thread count. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../lib/model.h"
#include "../../lib/ops.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: bench_model CONFIG.json B T [REPS] [THREADS]\n");
        return 2;
    }
    dsv3_config c;
    dsv3_err e;
    if (config_load(&c, argv[1], &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    int B = atoi(argv[2]), T = atoi(argv[3]), reps = argc > 4 ? atoi(argv[4]) : 3;
    int many = argc > 5 ? atoi(argv[5]) : 0;
    c.num_nextn_predict_layers = 0;
    dsv3_model m;
    if (model_init(&m, &c, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    model_init_random(&m, 1, 0);
    int N = B * T;
    int32_t *ids = malloc((size_t)N * 4), *tg = malloc((size_t)N * 4);
    uint64_t s = 42;
    for (int n = 0; n < N; n++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        ids[n] = (int32_t)((s >> 33) % (uint64_t)c.vocab_size);
    }
    for (int n = 0; n < N; n++)
        tg[n] = n % T + 1 < T ? ids[n + 1] : -100;
    model_acts *a = model_acts_new(&m, B, T, &e);
    if (!a) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    float *ref = malloc(m.n_params * 4);
    double fw1 = 0, bw1 = 0;
    for (int pass = 0; pass < 2; pass++) {
        ops_set_threads(pass ? many : 1);
        double fbest = 1e30, bbest = 1e30;
        float loss = 0;
        for (int r = 0; r < reps; r++) {
            double t0 = now();
            model_forward(&m, a, ids, tg, &loss, NULL);
            double t1 = now();
            model_zero_grad(&m);
            model_backward(&m, a, ids, tg, NULL);
            double t2 = now();
            fbest = t1 - t0 < fbest ? t1 - t0 : fbest;
            bbest = t2 - t1 < bbest ? t2 - t1 : bbest;
        }
        int same = 1;
        if (!pass) {
            memcpy(ref, m.grads, m.n_params * 4);
            fw1 = fbest;
            bw1 = bbest;
        } else {
            same = !memcmp(ref, m.grads, m.n_params * 4);
        }
        printf("%s B=%d T=%d threads=%d forward %.1f ms (%.0f tok/s) backward %.1f ms "
               "(%.0f tok/s) speedup fwd %.2fx bwd %.2fx loss %.6f grads %s\n",
               argv[1], B, T, ops_threads(), fbest * 1e3, N / fbest, bbest * 1e3, N / bbest,
               fw1 / fbest, bw1 / bbest, loss, same ? "bitwise equal to 1 thread" : "DIFFER");
    }
    free(ref);
    free(ids);
    free(tg);
    model_acts_free(a);
    model_free(&m);
    config_free(&c);
    return 0;
}
