/* dsv3-config: check model configs, print their parameter counts, rewrite them for
 * transformers 5.x. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

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

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    cli_common common = {0};
    const char *output = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        if (c == 'o')
            output = optarg;
        else
            cli_usage(&PROG, "unexpected option");
    }
    if (optind >= argc)
        cli_usage(&PROG, "no config file given");
    if (output && argc - optind != 1)
        cli_usage(&PROG, "--output takes exactly one input config");
    for (int i = optind; i < argc; i++) {
        dsv3_config cfg;
        dsv3_err e;
        if (config_load(&cfg, argv[i], &e))
            cli_fail(&PROG, &e);
        if (!common.quiet)
            print_counts(argv[i], &cfg);
        if (output && config_save(&cfg, output, &e))
            cli_fail(&PROG, &e);
        config_free(&cfg);
    }
    return 0;
}
