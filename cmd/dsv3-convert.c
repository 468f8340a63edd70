/* dsv3-convert: checkpoint folders between dsv3, HF transformers and DeepSeek's formats,
 * and --verify. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/cli.h"
#include "../lib/convert.h"
#include "../lib/progress.h"

static const cli_program PROG = {
    "dsv3-convert",
    "Usage: dsv3-convert [OPTION]... IN_DIR -o OUT_DIR\n"
    "       dsv3-convert --verify [--checksums] DIR\n"
    "Convert a checkpoint folder (HF: dsv3's, a dsv3-train step folder, transformers',\n"
    "DeepSeek's FP8 release) tensor by tensor, or check one against its config.\n"
    "\n"
    "Options:\n"
    "  -o, --output=DIR        the folder to write (refused if it exists, unless --force)\n"
    "      --to=FORMAT         hf (default): config.json, generation_config.json and the\n"
    "                          config's tensors in model.safetensors or shards + index;\n"
    "                          deepseek: DeepSeek's inference/convert.py layout,\n"
    "                          model{i}-mp{N}.safetensors and inference-config.json\n"
    "      --dtype=TYPE        bf16 (default) or f32; FP8 input is dequantized as DeepSeek\n"
    "                          does (f32(q) * scale); with --to deepseek also 'keep'\n"
    "      --no-mtp            leave out the MTP modules (layers >= num_hidden_layers)\n"
    "      --max-shard-size=N  bytes per shard file (k, M, G, Ki, Mi, Gi; default 5G, as\n"
    "                          transformers); 0: one model.safetensors\n"
    "      --mp=N              model-parallel ranks for --to deepseek (default 1)\n"
    "  -t, --tokenizer=FILE    add tokenizer.json: a tokenizer.json is copied, a dsv3-tok\n"
    "                          file exported\n"
    "      --force             replace an existing OUT_DIR (swapped in when complete)\n"
    "  -j, --threads=N         threads (default: all processors)\n"
    "      --verify            check DIR: config, index, every tensor present with its shape\n"
    "                          and dtype, nothing extra; no output\n"
    "      --checksums         with --verify: read every tensor, check it is finite and\n"
    "                          print 'XXH3-64  dtype  shape  name' lines on stdout\n"
    "      --progress          show progress even when stderr is not a terminal\n"
    "      --quiet             no progress and no summary\n"
    "      --help              this help\n"
    "      --version           the version\n"
    "\n"
    "Output is written to a hidden folder beside OUT_DIR and renamed when complete.\n"
    "Exit status: 0 ok, 1 failure (bad input, I/O), 2 usage error.\n",
};

enum { OPT_TO = 0x2000, OPT_DTYPE, OPT_NO_MTP, OPT_MAX_SHARD, OPT_MP, OPT_FORCE, OPT_VERIFY,
       OPT_SUMS };

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        {"to", required_argument, NULL, OPT_TO},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"no-mtp", no_argument, NULL, OPT_NO_MTP},
        {"max-shard-size", required_argument, NULL, OPT_MAX_SHARD},
        {"mp", required_argument, NULL, OPT_MP},
        {"tokenizer", required_argument, NULL, 't'},
        {"force", no_argument, NULL, OPT_FORCE},
        {"threads", required_argument, NULL, 'j'},
        {"verify", no_argument, NULL, OPT_VERIFY},
        {"checksums", no_argument, NULL, OPT_SUMS},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    cli_common common = {0};
    conv_opts o = {.dtype = ST_BF16, .max_shard_bytes = 5000000000ull, .mp = 1};
    const char *out = NULL, *to = "hf", *dtype = NULL;
    int verify = 0, sums = 0, mp_set = 0;
    dsv3_err e;
    uint64_t v;
    int c;
    while ((c = getopt_long(argc, argv, "o:t:j:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        switch (c) {
        case 'o': out = optarg; break;
        case 't': o.tokenizer = optarg; break;
        case OPT_TO: to = optarg; break;
        case OPT_DTYPE: dtype = optarg; break;
        case OPT_NO_MTP: o.no_mtp = 1; break;
        case OPT_FORCE: o.force = 1; break;
        case OPT_VERIFY: verify = 1; break;
        case OPT_SUMS: sums = 1; break;
        case OPT_MAX_SHARD:
            if (cli_parse_u64("--max-shard-size", optarg, 0, UINT64_MAX, &o.max_shard_bytes, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_MP:
            if (cli_parse_u64("--mp", optarg, 1, 4096, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o.mp = (int)v;
            mp_set = 1;
            break;
        case 'j':
            if (cli_parse_u64("--threads", optarg, 1, 1024, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o.threads = (int)v;
            break;
        default: cli_usage(&PROG, "unexpected option");
        }
    }
    if (optind != argc - 1)
        cli_usage(&PROG, optind >= argc ? "no input folder given" : "one input folder only");
    const char *in = argv[optind];
    int ds = !strcmp(to, "deepseek");
    if (!ds && strcmp(to, "hf"))
        cli_usage(&PROG, "--to must be hf or deepseek, not '%s'", to);
    if (dtype && !strcmp(dtype, "f32"))
        o.dtype = ST_F32;
    else if (dtype && !strcmp(dtype, "keep") && ds)
        o.keep_dtype = 1;
    else if (dtype && strcmp(dtype, "bf16"))
        cli_usage(&PROG, "--dtype must be bf16 or f32%s, not '%s'", ds ? " or keep" : "", dtype);
    if (mp_set && !ds)
        cli_usage(&PROG, "--mp goes with --to deepseek");
    if (sums && !verify)
        cli_usage(&PROG, "--checksums goes with --verify");
    o.progress = common.quiet ? PROGRESS_OFF : common.progress;
    conv_stats st;
    if (verify) {
        if (out)
            cli_usage(&PROG, "--verify writes nothing; drop -o");
        if (convert_verify(in, sums ? stdout : NULL, o.threads, &st, &e))
            cli_fail(&PROG, &e);
        if (!common.quiet)
            fprintf(stderr, "%s: %s: ok, %d tensors in %d files, %.1f MB%s%s\n", PROG.name, in,
                    st.n_tensors, st.n_files, st.in_bytes / 1e6,
                    st.mtp_layers ? ", with MTP" : "", st.fp8 ? ", FP8" : "");
        return 0;
    }
    if (!out)
        cli_usage(&PROG, "no output folder given (-o)");
    double t0 = progress_now();
    if ((ds ? convert_deepseek : convert_hf)(in, out, &o, &st, &e))
        cli_fail(&PROG, &e);
    double dt = progress_now() - t0;
    if (!common.quiet)
        fprintf(stderr, "%s: %s: %d tensors in %d files, %.1f MB -> %.1f MB in %.2f s "
                "(%.0f MB/s read)\n", PROG.name, out, st.n_tensors, st.n_files,
                st.in_bytes / 1e6, st.out_bytes / 1e6, dt, dt > 0 ? st.in_bytes / 1e6 / dt : 0);
    return 0;
}
