/* dsv3-quant: FP8 (E4M3, 128x128 block scales) quantization of checkpoint folders in
 * DeepSeek-V3's released format, and back to BF16. */
#include <stdio.h>
#include <stdlib.h>

#include "../lib/cli.h"
#include "../lib/progress.h"
#include "../lib/quant.h"

static const cli_program PROG = {
    "dsv3-quant",
    "Usage: dsv3-quant [OPTION]... IN_DIR -o OUT_DIR\n"
    "Quantize an HF checkpoint folder to FP8 as DeepSeek-V3's release stores it: the linear\n"
    "weights of attention and MLPs (experts and MTP block included) in F8_E4M3 with one F32\n"
    "weight_scale_inv per 128x128 block (block amax / 448); embeddings, norms, router,\n"
    "lm_head and the MTP projection in BF16, the router's correction bias in F32; config.json\n"
    "gains quantization_config. The output keeps the input's shard files and index.\n"
    "\n"
    "Options:\n"
    "  -o, --output=DIR    the folder to write (refused if it exists, unless --force)\n"
    "      --dequant       FP8 weights back to BF16 (bf16(f32(q) * scale)); scales and\n"
    "                      quantization_config dropped, other tensors copied\n"
    "      --force         replace an existing OUT_DIR (swapped in when complete)\n"
    "  -j, --threads=N     threads for the block quantization (default: all processors)\n"
    "      --progress      show progress even when stderr is not a terminal\n"
    "      --quiet         no progress and no summary\n"
    "      --help          this help\n"
    "      --version       the version\n"
    "\n"
    "A NaN or infinity in a weight is an error naming the tensor. Output is written to a\n"
    "hidden folder beside OUT_DIR and renamed when complete.\n"
    "Exit status: 0 ok, 1 failure (bad input, I/O), 2 usage error.\n",
};

int main(int argc, char **argv)
{
    enum { OPT_DEQUANT = 0x2000, OPT_FORCE };
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, 'j'},
        {"dequant", no_argument, NULL, OPT_DEQUANT},
        {"force", no_argument, NULL, OPT_FORCE},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    cli_common common = {0};
    quant_opts o = {0};
    const char *out = NULL;
    dsv3_err e;
    uint64_t v;
    int c;
    while ((c = getopt_long(argc, argv, "o:j:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        switch (c) {
        case 'o': out = optarg; break;
        case 'j':
            if (cli_parse_u64("--threads", optarg, 1, 1024, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o.threads = (int)v;
            break;
        case OPT_DEQUANT: o.dequant = 1; break;
        case OPT_FORCE: o.force = 1; break;
        default: cli_usage(&PROG, "unexpected option");
        }
    }
    if (optind != argc - 1)
        cli_usage(&PROG, optind >= argc ? "no input folder given" : "one input folder only");
    if (!out)
        cli_usage(&PROG, "no output folder given (-o)");
    o.progress = common.quiet ? PROGRESS_OFF : common.progress;
    quant_stats st;
    double t0 = progress_now();
    if (quant_folder(argv[optind], out, &o, &st, &e))
        cli_fail(&PROG, &e);
    double dt = progress_now() - t0;
    if (!common.quiet)
        fprintf(stderr, "%s: %s: %d weights %s, %d tensors in %d files, %.1f MB -> %.1f MB "
                "in %.2f s (%.0f MB/s read)\n", PROG.name, out, st.n_quant,
                o.dequant ? "dequantized" : "quantized", st.n_tensors, st.n_files,
                st.in_bytes / 1e6, st.out_bytes / 1e6, dt, dt > 0 ? st.in_bytes / 1e6 / dt : 0);
    return 0;
}
