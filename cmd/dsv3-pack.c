/* dsv3-pack: document streams to a folder of shuffled, packed training shards. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/bpe.h"
#include "../lib/cli.h"
#include "../lib/fim.h"
#include "../lib/pack.h"
#include "../lib/progress.h"

static const cli_program PROG = {
    "dsv3-pack",
    "Usage: dsv3-pack -o DIR {--eos-id N | -t TOKENIZER} [OPTION]... [FILE]...\n"
    "Pack document streams (dsv3-tok encode, dsv3-shard make) into a folder of shuffled\n"
    "training shards plus manifest.json, which dsv3-train reads (docs/pack-format.md).\n"
    "With no FILE, or FILE '-', read standard input.\n"
    "\n"
    "Options:\n"
    "  -o, --output=DIR       the folder to create (must not exist; appears only when complete)\n"
    "  -t, --tokenizer=FILE   the tokenizer that made the streams (dsv3-tok): supplies the EOS\n"
    "                         and FIM ids, FIM cuts fall between characters, and a stream\n"
    "                         of another tokenizer (vocabulary, id) is refused\n"
    "  -L, --seq-len=N        the trainer's context length (default 4096); every record holds\n"
    "                         N+1 tokens: N inputs and, shifted by one, N targets\n"
    "      --eos-id=N         token appended to every document (default with -t: its EOS)\n"
    "      --pad-id=N         token filling the unused tail of a record (default: the EOS id);\n"
    "                         padding is listed in the boundary shards so the loss skips it\n"
    "      --best-fit         place whole documents into records, best-fit decreasing (Ding et\n"
    "                         al. 2024); documents longer than N+1 are cut first. Default:\n"
    "                         concatenate and cut, consecutive records sharing one token\n"
    "      --dedup            drop every document whose tokens repeat an earlier one, across\n"
    "                         all inputs (XXH3-128; 32-64 bytes of memory per document)\n"
    "      --near-dedup       drop near duplicates: MinHash of token n-grams, LSH bands, one\n"
    "                         document kept per cluster (the first in input order); after\n"
    "                         --dedup. 8*BANDS+24 bytes of memory per document (136)\n"
    "      --ngram=N          tokens per n-gram of --near-dedup (default 5)\n"
    "      --bands=N          LSH bands (default 14)\n"
    "      --rows=N           hashes per band (default 8): 14 x 8 finds 92% of pairs of\n"
    "                         Jaccard similarity 0.8, 56% at 0.7, 5% at 0.5\n"
    "  -j, --threads=N        threads of --near-dedup signatures (default: all processors)\n"
    "      --log-removed      list every removed document in DIR/removed.tsv (input index,\n"
    "                         exact or near, and the index of the document kept instead)\n"
    "      --fim=RATE         share of documents rearranged for Fill-in-the-Middle in PSM order:\n"
    "                         <fim_begin> prefix <fim_hole> suffix <fim_end> middle, cut at\n"
    "                         two random token boundaries, or with -t character boundaries\n"
    "                         (the parts encoded again); DeepSeek-V3: 0.1; default 0\n"
    "      --fim-spm=RATE     share in SPM order: <fim_begin> <fim_hole> suffix <fim_end>\n"
    "                         prefix middle (default 0)\n"
    "      --fim-ids=B,H,E    the ids of <fim_begin>, <fim_hole>, <fim_end> (required with\n"
    "                         --fim or --fim-spm unless -t TOKENIZER has DeepSeek-V3's)\n"
    "      --fim-code-only    FIM only for documents flagged as code\n"
    "  -s, --seed=N           seed of the shuffle and the split (default 0)\n"
    "      --shard-tokens=N   tokens per output shard, whole records (default 256Mi)\n"
    "      --val=FRACTION     share of records set aside as val-*.shard (default 0)\n"
    "      --level=N          zstd level of the output (default 3)\n"
    "      --progress         show progress on stderr even when it is not a terminal\n"
    "      --quiet            no progress, no summary\n"
    "      --help             this help\n"
    "      --version          the version\n"
    "\n"
    "Numbers take k, M, G (1000s) and Ki, Mi, Gi (1024s). Exit status: 0 ok, 1 failure\n"
    "(nothing is left behind), 2 usage error. See dsv3-pack(1).\n",
};

enum { OPT_EOS = 0x2000, OPT_PAD, OPT_BEST_FIT, OPT_DEDUP, OPT_SHARD_TOKENS, OPT_VAL,
       OPT_LEVEL, OPT_FIM, OPT_FIM_SPM, OPT_FIM_IDS, OPT_FIM_CODE, OPT_NEAR, OPT_NGRAM,
       OPT_BANDS, OPT_ROWS, OPT_LOG_REMOVED };

static uint64_t parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max)
{
    dsv3_err e;
    uint64_t v;
    if (cli_parse_u64(opt, s, min, max, &v, &e))
        cli_usage(&PROG, "%s", e.msg);
    return v;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        {"seq-len", required_argument, NULL, 'L'},
        {"seed", required_argument, NULL, 's'},
        {"eos-id", required_argument, NULL, OPT_EOS},
        {"pad-id", required_argument, NULL, OPT_PAD},
        {"best-fit", no_argument, NULL, OPT_BEST_FIT},
        {"dedup", no_argument, NULL, OPT_DEDUP},
        {"shard-tokens", required_argument, NULL, OPT_SHARD_TOKENS},
        {"val", required_argument, NULL, OPT_VAL},
        {"level", required_argument, NULL, OPT_LEVEL},
        {"fim", required_argument, NULL, OPT_FIM},
        {"fim-spm", required_argument, NULL, OPT_FIM_SPM},
        {"fim-ids", required_argument, NULL, OPT_FIM_IDS},
        {"fim-code-only", no_argument, NULL, OPT_FIM_CODE},
        {"tokenizer", required_argument, NULL, 't'},
        {"near-dedup", no_argument, NULL, OPT_NEAR},
        {"ngram", required_argument, NULL, OPT_NGRAM},
        {"bands", required_argument, NULL, OPT_BANDS},
        {"rows", required_argument, NULL, OPT_ROWS},
        {"threads", required_argument, NULL, 'j'},
        {"log-removed", no_argument, NULL, OPT_LOG_REMOVED},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    pack_options po;
    pack_options_default(&po);
    cli_common common = {PROGRESS_AUTO, 0};
    const char *output = NULL, *tok_path = NULL;
    int have_eos = 0, have_pad = 0, have_fim_ids = 0;
    dsv3_err e;
    int c;
    while ((c = getopt_long(argc, argv, "o:L:s:t:j:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &common))
            continue;
        switch (c) {
        case 'o':
            output = optarg;
            break;
        case 'L':
            po.seq_len = (uint32_t)parse_u64("--seq-len", optarg, 1, (1u << 28) - 1);
            break;
        case 's':
            po.seed = parse_u64("--seed", optarg, 0, INT64_MAX);
            break;
        case OPT_EOS:
            po.eos_id = (uint32_t)parse_u64("--eos-id", optarg, 0, UINT32_MAX);
            have_eos = 1;
            break;
        case OPT_PAD:
            po.pad_id = (uint32_t)parse_u64("--pad-id", optarg, 0, UINT32_MAX);
            have_pad = 1;
            break;
        case OPT_BEST_FIT:
            po.best_fit = 1;
            break;
        case OPT_DEDUP:
            po.dedup = 1;
            break;
        case OPT_SHARD_TOKENS:
            po.shard_tokens = parse_u64("--shard-tokens", optarg, 1, INT64_MAX);
            break;
        case OPT_VAL:
            if (cli_parse_double("--val", optarg, 0, 0.999999, &po.val_fraction, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_LEVEL:
            po.level = (int)parse_u64("--level", optarg, 1, 22);
            break;
        case OPT_FIM:
            if (cli_parse_double("--fim", optarg, 0, 1, &po.fim_rate, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_FIM_SPM:
            if (cli_parse_double("--fim-spm", optarg, 0, 1, &po.fim_spm_rate, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_FIM_IDS: {
            char buf[96], *save = NULL, *tok;
            int n = 0;
            snprintf(buf, sizeof buf, "%s", optarg);
            for (tok = strtok_r(buf, ",", &save); tok && n < 4; tok = strtok_r(NULL, ",", &save))
                if (n++ < 3)
                    po.fim_ids[n - 1] = (uint32_t)parse_u64("--fim-ids", tok, 0, UINT32_MAX);
            if (n != 3)
                cli_usage(&PROG, "--fim-ids: expected BEGIN,HOLE,END, got '%s'", optarg);
            have_fim_ids = 1;
            break;
        }
        case OPT_FIM_CODE:
            po.fim_code_only = 1;
            break;
        case 't':
            tok_path = optarg;
            break;
        case OPT_NEAR:
            po.near_dedup = 1;
            break;
        case OPT_NGRAM:
            po.near.ngram = (uint32_t)parse_u64("--ngram", optarg, 1, 1u << 20);
            break;
        case OPT_BANDS:
            po.near.bands = (uint32_t)parse_u64("--bands", optarg, 1, MINHASH_MAX_HASHES);
            break;
        case OPT_ROWS:
            po.near.rows = (uint32_t)parse_u64("--rows", optarg, 1, MINHASH_MAX_HASHES);
            break;
        case 'j':
            po.near.threads = (int)parse_u64("--threads", optarg, 1, 256);
            break;
        case OPT_LOG_REMOVED:
            po.log_removed = 1;
            break;
        default:
            cli_usage(&PROG, "unexpected option");
        }
    }
    if (!output)
        cli_usage(&PROG, "missing --output DIR");
    if (!have_eos && !tok_path)
        cli_usage(&PROG, "missing --eos-id N (the end-of-document token) or -t TOKENIZER");
    int fim = po.fim_rate > 0 || po.fim_spm_rate > 0;
    if (fim && !have_fim_ids && !tok_path)
        cli_usage(&PROG, "--fim and --fim-spm need --fim-ids BEGIN,HOLE,END or -t TOKENIZER");
    if ((uint64_t)po.near.bands * po.near.rows > MINHASH_MAX_HASHES)
        cli_usage(&PROG, "--bands %u x --rows %u exceed %u hashes", po.near.bands,
                  po.near.rows, MINHASH_MAX_HASHES);
    if (po.fim_rate + po.fim_spm_rate > 1)
        cli_usage(&PROG, "--fim %g plus --fim-spm %g exceed 1", po.fim_rate, po.fim_spm_rate);
    bpe *tok = NULL;
    if (tok_path) {
        if (bpe_load(&tok, tok_path, &e))
            cli_fail(&PROG, &e);
        po.tok = tok;
        po.tok_name = tok_path;
        if (!have_eos && (po.eos_id = bpe_eos(tok)) == BPE_NONE) {
            err_set(&e, "%s: the tokenizer has no end-of-sentence token; give --eos-id",
                    tok_path);
            cli_fail(&PROG, &e);
        }
        uint32_t ids[3];
        fim_token_ids(tok, ids);
        for (int i = 0; fim && !have_fim_ids && i < 3; i++)
            if (ids[i] == BPE_NONE) {
                err_set(&e, "%s: the tokenizer has no %s token for FIM; give --fim-ids",
                        tok_path, FIM_TOKEN_NAMES[i]);
                cli_fail(&PROG, &e);
            }
        if (!have_fim_ids)
            memcpy(po.fim_ids, ids, sizeof ids);
    }
    if (!have_pad)
        po.pad_id = po.eos_id;

    /* The command line goes into the manifest, so a folder says how it was made. */
    size_t len = 1;
    for (int i = 0; i < argc; i++)
        len += strlen(argv[i]) + 1;
    char *line = calloc(1, len);
    for (int i = 0; line && i < argc; i++) {
        if (i)
            strcat(line, " ");
        strcat(line, argv[i]);
    }

    progress pr;
    progress_start(&pr, common.quiet ? PROGRESS_OFF : common.progress, "dsv3-pack: read",
                   "tokens", 0);
    po.progress = &pr;
    pack *p;
    if (pack_new(&p, &po, &e))
        cli_fail(&PROG, &e);
    int rc = 0;
    if (optind == argc)
        rc = pack_add_input(p, "-", &e);
    for (int i = optind; rc == 0 && i < argc; i++)
        rc = pack_add_input(p, argv[i], &e);
    progress_finish(&pr);
    if (rc == 0)
        rc = pack_write(p, output, line, &e);
    free(line);
    if (rc) {
        pack_free(p);
        bpe_free(tok);
        cli_fail(&PROG, &e);
    }
    const pack_counts *k = pack_get_counts(p);
    if (!common.quiet) {
        double t = progress_now() - pr.t_start;
        fprintf(stderr,
                "dsv3-pack: %" PRIu64 " documents (%" PRIu64 " tokens) from %" PRIu64
                " input(s)",
                k->input_docs, k->input_tokens, k->inputs);
        if (po.dedup)
            fprintf(stderr, "; dedup removed %" PRIu64 " documents (%" PRIu64 " tokens)",
                    k->dup_docs, k->dup_tokens);
        if (po.near_dedup)
            fprintf(stderr, "; near-dedup removed %" PRIu64 " documents (%" PRIu64
                    " tokens) from %" PRIu64 " clusters, %" PRIu64 " band collisions, "
                    "%.2f s (%.2f s CPU: %.0f documents/s per core)",
                    k->near_docs, k->near_tokens, k->near_clusters, k->near_pairs,
                    k->near_seconds, k->near_cpu_seconds, k->near_cpu_seconds > 0 ?
                    (double)(k->input_docs - k->dup_docs) / k->near_cpu_seconds : 0.0);
        if (po.fim_rate > 0 || po.fim_spm_rate > 0)
            fprintf(stderr, "; FIM rearranged %" PRIu64 " (PSM) and %" PRIu64 " (SPM)",
                    k->fim_psm, k->fim_spm);
        fprintf(stderr,
                "\ndsv3-pack: %" PRIu64 " records of %u+1 tokens (%" PRIu64 " train in %" PRIu64
                " shards, %" PRIu64 " val), %" PRIu64 " padding tokens (%.2f%%), %" PRIu64
                " documents split, %.1f s, %.1f M tokens/s\n",
                k->sequences, po.seq_len, k->train_sequences, k->train_shards,
                k->val_sequences, k->pad_tokens,
                100.0 * (double)k->pad_tokens / (double)(k->sequences * (po.seq_len + 1ull)),
                k->split_docs, t, t > 0 ? 1e-6 * (double)k->input_tokens / t : 0.0);
    }
    pack_free(p);
    bpe_free(tok);
    return 0;
}
