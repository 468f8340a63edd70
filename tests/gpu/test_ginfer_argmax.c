/* GPU test of the decode graphs' greedy choice (kernels/ginfer_k.cu gk_argmax through
 * ginfer_argmax_run) against the host's rule (lib/sampler's: the largest logit, banned ids
 * left out, ties to the lowest id) on fresh random rows: vocabularies of the configs
 * (129280) and edge sizes (1, fewer than the blocks a row, not a multiple of anything, more
 * than one pass of a block's loads), 1 to 8 rows, logits random, drawn from three values
 * (ties everywhere, the lowest id must win), zeros of both signs, with no ban, a random third
 * banned, all but one banned and all banned (id 0, as the host's rule). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/ginfer.h"
#include "gpu_test.h"

static int32_t host_argmax(const float *x, int V, const uint8_t *ban)
{
    int32_t b = 0;
    float bv = ban && ban[0] ? -INFINITY : x[0];
    for (int v = 1; v < V; v++)
        if (!(ban && ban[v]) && x[v] > bv) {
            bv = x[v];
            b = v;
        }
    return b;
}

/* mode 0 random, 1 three levels (ties), 2 zeros of both signs with a few -1 */
static float draw(int mode)
{
    if (mode == 0)
        return gt_uniform(8.0f);
    if (mode == 1)
        return (float)(test_rand() % 3);
    return test_rand() % 7 == 0 ? -1.0f : (test_rand() & 1 ? -0.0f : 0.0f);
}

static void test_argmax_equals_host(void)
{
    GT_NEED_GPU();
    static const int Vs[] = {129280, 1, 5, 127, 1000, 32771, 131075, 300001};
    static const int Ns[] = {1, 3, 8};
    int cases = 0, same = 0;
    for (size_t vi = 0; vi < sizeof Vs / sizeof *Vs; vi++)
        for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++)
            for (int mode = 0; mode < 3; mode++)
                for (int bm = 0; bm < 4; bm++) {
                    int V = Vs[vi], N = Ns[ni];
                    float *x = malloc((size_t)N * V * sizeof(float));
                    uint8_t *ban = malloc((size_t)V);
                    int32_t *out = malloc((size_t)N * sizeof(int32_t));
                    for (size_t i = 0; i < (size_t)N * V; i++)
                        x[i] = draw(mode);
                    int keep = (int)(test_rand() % (unsigned)V);
                    for (int v = 0; v < V; v++)
                        ban[v] = bm == 1 ? test_rand() % 3 == 0 : bm == 2 ? v != keep : bm == 3;
                    dsv3_err e;
                    int rc = ginfer_argmax_run(x, N, V, bm ? ban : NULL, out, &e);
                    CHECKF(!rc, "%s", rc ? e.msg : "");
                    for (int r = 0; r < N && !rc; r++) {
                        int32_t h = host_argmax(x + (size_t)r * V, V, bm ? ban : NULL);
                        cases++;
                        same += out[r] == h;
                        CHECKF(out[r] == h, "V %d N %d row %d mode %d ban %d: device id %d, host %d",
                               V, N, r, mode, bm, out[r], h);
                    }
                    free(x), free(ban), free(out);
                }
    printf("# stat argmax: %d of %d rows the host's id\n", same, cases);
}

int main(void)
{
    test_seed();
    RUN(test_argmax_equals_host);
    TEST_EXIT();
}
