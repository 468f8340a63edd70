/* bench_mkmodel: a checkpoint folder of random weights for the conversion benchmarks.
 * Usage: bench_mkmodel CONFIG.json OUT_DIR f32|bf16 MAX_SHARD_BYTES SEED
 * (lib/model's seeded initialisation, written by lib/ckpt; the whole model is in memory,
 * so keep the config mid-sized). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../lib/ckpt.h"

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: bench_mkmodel CONFIG OUT_DIR f32|bf16 MAX_SHARD_BYTES SEED\n");
        return 2;
    }
    dsv3_config c;
    dsv3_model m;
    dsv3_err e;
    if (config_load(&c, argv[1], &e) || model_init(&m, &c, &e)) {
        fprintf(stderr, "bench_mkmodel: %s\n", e.msg);
        return 1;
    }
    config_free(&c);
    model_init_random(&m, strtoull(argv[5], NULL, 0), 0);
    ckpt_opts o = {.dtype = strcmp(argv[3], "bf16") ? ST_F32 : ST_BF16,
                   .max_shard_bytes = strtoull(argv[4], NULL, 0)};
    if (ckpt_save(&m, argv[2], &o, &e)) {
        fprintf(stderr, "bench_mkmodel: %s\n", e.msg);
        return 1;
    }
    printf("%s: %zu parameters\n", argv[2], m.n_params);
    model_free(&m);
    return 0;
}
