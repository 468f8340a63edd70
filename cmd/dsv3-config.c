/* dsv3-config: check model configs, print their parameter counts, rewrite them for
 * transformers 5.x. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "../lib/ckpt.h"
#include "../lib/cli.h"
#include "../lib/config.h"

static const cli_program PROG = {
    "dsv3-config",
    "Usage: dsv3-config [OPTION]... CONFIG.json...\n"
    "Check DeepSeek-V3 model configs (HF config.json) and print their parameter counts:\n"
    "total and activated per token, without and with the MTP modules.\n"
    "\n"
    "Options:\n"
    "  -o, --output=PATH   write the (single) config back in the spelling transformers 5.x\n"
    "                      reads (rope_parameters) and 4.x reads (rope_scaling); unknown\n"
    "                      fields are kept\n"
    "      --init=DIR      write a checkpoint folder for the (single) config with seeded\n"
    "                      random weights (normal, std initializer_range; norms 1): for\n"
    "                      trying the pipeline and for tests, not a trained model\n"
    "      --seed=N        the seed of --init (default 1)\n"
    "      --bf16          --init writes BF16 tensors (default F32)\n"
    "      --max-shard-size=BYTES  --init writes shards of at most BYTES plus\n"
    "                      model.safetensors.index.json (suffixes k, M, G, Ki, Mi, Gi)\n"
    "      --quiet         print nothing; only the exit status tells\n"
    "      --help          this help\n"
    "      --version       the version\n"
    "\n"
    "Exit status: 0 ok, 1 a config is invalid or unreadable, 2 usage error.\n",
};

/* 1.23B, 456.7M or 89.0K: the unit people quote model sizes in. */
static const char *human(int64_t n, char *buf, size_t len)
{
    if (n >= 1000000000)
        snprintf(buf, len, "%.2fB", n / 1e9);
    else if (n >= 1000000)
        snprintf(buf, len, "%.1fM", n / 1e6);
    else
        snprintf(buf, len, "%.1fK", n / 1e3);
    return buf;
}

static void print_counts(const char *path, const dsv3_config *c)
{
    config_counts n;
    config_count_params(c, &n);
    printf("%s: layers %d (%d dense, %d MoE), hidden %d, experts %d routed + %d shared, "
           "top-%d\n", path, c->num_hidden_layers, c->first_k_dense_replace,
           c->num_hidden_layers - c->first_k_dense_replace, c->hidden_size,
           c->n_routed_experts, c->n_shared_experts, c->num_experts_per_tok);
    char a[32], b[32];
    printf("  total     %15" PRId64 "  (%s)\n", n.total, human(n.total, a, sizeof a));
    printf("  activated %15" PRId64 "  (%s)\n", n.active, human(n.active, a, sizeof a));
    if (c->num_nextn_predict_layers)
        printf("  with %d MTP module(s): total %s, activated %s\n", c->num_nextn_predict_layers,
               human(n.total + n.mtp_total, a, sizeof a),
               human(n.active + n.mtp_active, b, sizeof b));
}

enum { OPT_INIT = 0x100, OPT_SEED, OPT_BF16, OPT_SHARD };

/* --init: a random checkpoint of cfg in dir, written atomically by lib/ckpt. */
static int init_checkpoint(const dsv3_config *cfg, const char *dir, uint64_t seed,
                           const ckpt_opts *o, dsv3_err *e)
{
    dsv3_model m;
    if (model_init(&m, cfg, e))
        return -1;
    model_init_random(&m, seed, 0);
    int rc = ckpt_save(&m, dir, o, e);
    model_free(&m);
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        {"init", required_argument, NULL, OPT_INIT},
        {"seed", required_argument, NULL, OPT_SEED},
        {"bf16", no_argument, NULL, OPT_BF16},
        {"max-shard-size", required_argument, NULL, OPT_SHARD},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    cli_common common = {0};
    const char *output = NULL, *init = NULL;
    uint64_t seed = 1;
    ckpt_opts co = {0};
    dsv3_err pe;
    int c;
    while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        if (c == 'o')
            output = optarg;
        else if (c == OPT_INIT)
            init = optarg;
        else if (c == OPT_SEED) {
            if (cli_parse_u64("--seed", optarg, 0, UINT64_MAX, &seed, &pe))
                cli_usage(&PROG, "%s", pe.msg);
        } else if (c == OPT_BF16)
            co.dtype = ST_BF16;
        else if (c == OPT_SHARD) {
            if (cli_parse_u64("--max-shard-size", optarg, 1, UINT64_MAX, &co.max_shard_bytes,
                              &pe))
                cli_usage(&PROG, "%s", pe.msg);
        } else
            cli_usage(&PROG, "unexpected option");
    }
    if (optind >= argc)
        cli_usage(&PROG, "no config file given");
    if (output && argc - optind != 1)
        cli_usage(&PROG, "--output takes exactly one input config");
    if (init && argc - optind != 1)
        cli_usage(&PROG, "--init takes exactly one input config");
    for (int i = optind; i < argc; i++) {
        dsv3_config cfg;
        dsv3_err e;
        if (config_load(&cfg, argv[i], &e))
            cli_fail(&PROG, &e);
        if (!common.quiet)
            print_counts(argv[i], &cfg);
        if (output && config_save(&cfg, output, &e))
            cli_fail(&PROG, &e);
        if (init && init_checkpoint(&cfg, init, seed, &co, &e))
            cli_fail(&PROG, &e);
        config_free(&cfg);
    }
    return 0;
}
