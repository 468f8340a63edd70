/* greedy_ids: greedy generation from token ids through lib/infer, for scripts/ref-hf-generate.py
 * (the comparison with transformers' generate()). Prints the N generated ids on one line.
 * Usage: greedy_ids MODEL_DIR cpu|cuda|cuda-fp32 N ID... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../lib/infer.h"
#include "../../lib/model.h"

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: greedy_ids MODEL_DIR cpu|cuda|cuda-fp32 N ID...\n");
        return 2;
    }
    int N = atoi(argv[3]), P = argc - 4;
    int32_t *ids = malloc((size_t)(P + N) * sizeof *ids);
    for (int i = 0; i < P; i++)
        ids[i] = (int32_t)atoi(argv[4 + i]);
    dsv3_model m;
    dsv3_err e;
    infer *f = NULL;
    if (model_load_flags(&m, argv[1], MODEL_LOAD_NO_MTP, &e)) {
        fprintf(stderr, "greedy_ids: %s\n", e.msg);
        return 1;
    }
    int gpu = !strncmp(argv[2], "cuda", 4), exact = !strcmp(argv[2], "cuda-fp32");
    int rc = gpu ? infer_new_gpu(&f, &m, P + N + 1, 1, 0, exact, &e)
                 : infer_new(&f, &m, P + N + 1, 1, &e);
    int V = m.cfg.vocab_size, z = 0;
    float *lg = malloc((size_t)V * sizeof *lg);
    if (!rc)
        rc = infer_prefill(f, 0, ids, P, lg, &e);
    for (int s = 0; s < N && !rc; s++) {
        int b = 0;
        for (int v = 1; v < V; v++)
            if (lg[v] > lg[b])
                b = v;
        ids[P + s] = b;
        printf("%s%d", s ? " " : "", b);
        if (s + 1 < N)
            rc = infer_forward(f, 1, &z, &ids[P + s], NULL, lg, &e);
    }
    printf("\n");
    if (rc)
        fprintf(stderr, "greedy_ids: %s\n", e.msg);
    infer_free(f);
    model_free(&m);
    free(lg);
    free(ids);
    return rc ? 1 : 0;
}
