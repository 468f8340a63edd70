/* dsv3-tok: byte-level BPE from the shell: train, encode, decode, import, export, info. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "../lib/bpe.h"
#include "../lib/bpeio.h"
#include "../lib/bpetrain.h"
#include "../lib/cli.h"
#include "../lib/docin.h"
#include "../lib/progress.h"
#include "../lib/shard.h"
#include "../lib/tokenc.h"

static const cli_program PROG = {
    "dsv3-tok",
    "Usage: dsv3-tok COMMAND [OPTION]... [FILE]...\n"
    "Byte-level BPE tokenizers (docs/tokenizer-format.md): learn, apply, convert.\n"
    "\n"
    "Commands:\n"
    "  train -o TOK [FILE]...    learn a vocabulary from text, lines or JSONL\n"
    "  encode -t TOK [FILE]...   documents to a document-stream shard (standard output)\n"
    "  decode -t TOK [FILE]      a shard, or lines of token ids, back to text\n"
    "  import -o TOK FILE        from HF tokenizer.json or a tiktoken rank file\n"
    "  export -t TOK -o FILE     to HF tokenizer.json (--to hf) or tiktoken (--to tiktoken)\n"
    "  info TOK                  sizes, special tokens and pre-tokenizer of a tokenizer\n"
    "\n"
    "Input (train, encode):\n"
    "  -i, --input=MODE       auto (default), text (a file is a document), lines (a line is\n"
    "                         a document), jsonl (a JSON object per line); auto takes jsonl\n"
    "                         for *.jsonl and input starting with '{', else text\n"
    "  -f, --field=NAME       jsonl: the string field holding the document (default text)\n"
    "      --skip-bad         jsonl: skip bad records, count them, report at the end\n"
    "  -j, --threads=N        worker threads (default: all processors)\n"
    "\n"
    "train:\n"
    "  -v, --vocab-size=N     ids below the added special tokens: the lead specials, 256\n"
    "                         bytes and the merges (default 128000, as DeepSeek-V3)\n"
    "      --merges=N         learn N merges (instead of --vocab-size)\n"
    "  -p, --pattern=P        pre-tokenizer: deepseek-v3 (default), gpt2, cl100k, o200k or a\n"
    "                         PCRE2 regex (repeat for a sequence of splits)\n"
    "      --special=STR      add a special token after the learned ones (repeatable)\n"
    "      --no-default-specials  without DeepSeek-V3's BOS/EOS/PAD, FIM and chat tokens\n"
    "      --max-words=N      cap on distinct pre-tokens held in memory (rarest dropped)\n"
    "      --min-frequency=N  stop when the best pair occurs fewer than N times (default 2)\n"
    "\n"
    "encode:\n"
    "  -t, --tokenizer=TOK    the tokenizer file\n"
    "  -o, --output=PATH      where the shard goes (default '-', standard output)\n"
    "      --bos, --eos       begin/end every document with the BOS/EOS token\n"
    "      --allow-special    special-token strings in the text become special tokens\n"
    "                         (default: they are encoded as the plain text they are)\n"
    "      --split-combined=P split punctuation+line-break pieces in two with probability P\n"
    "      --seed=N           seed for --split-combined (default 0)\n"
    "      --ids              print each document's ids as a line of text instead\n"
    "  -e, --text=STRING      encode STRING as the only document\n"
    "      --stats            after encoding, the seconds each stage worked and waited\n"
    "\n"
    "decode:\n"
    "      --from=KIND        auto (default), shard or ids (whitespace-separated, a line\n"
    "                         per document)\n"
    "      --sep=STR          written after each document (C escapes \\n \\t \\0 \\\\;\n"
    "                         default: nothing)\n"
    "      --skip-special     leave special tokens out\n"
    "\n"
    "import / export:\n"
    "      --from=FORMAT      import: hf or tiktoken (default: hf for *.json)\n"
    "      --to=FORMAT        export: hf (default) or tiktoken\n"
    "  -p, --pattern=P        tiktoken import: gpt2, cl100k, o200k, deepseek-v3 or regexes\n"
    "      --special=STR=ID   tiktoken import: a special token (default: the named\n"
    "                         encoding's; none with --no-default-specials)\n"
    "      --bos=STR, --eos=STR, --pad=STR  which special tokens have these roles\n"
    "\n"
    "      --progress         show progress on stderr even when it is not a terminal\n"
    "      --quiet            no progress, no summary\n"
    "      --help             this help\n"
    "      --version          the version\n"
    "\n"
    "FILE '-' is standard input. Exit status: 0 ok, 1 failure, 2 usage error.\n"
    "See dsv3-tok(1).\n",
};

enum {
    OPT_MERGES = 0x2000, OPT_SPECIAL, OPT_NO_DEFAULT_SPECIALS, OPT_MAX_WORDS, OPT_MIN_FREQ,
    OPT_BOS, OPT_EOS, OPT_ALLOW_SPECIAL, OPT_SPLIT_COMBINED, OPT_SEED, OPT_IDS, OPT_FROM,
    OPT_TO, OPT_SEP, OPT_SKIP_SPECIAL, OPT_SKIP_BAD, OPT_PAD, OPT_STATS,
};

typedef struct options {
    cli_common common;
    const char *tok, *output, *field, *from, *to, *text, *sep;
    const char *bos_s, *eos_s, *pad_s;
    docin_mode input;
    int threads, bos, eos, min_freq_set, allow_special, ids, skip_special, skip_bad, no_default_specials;
    int stats;
    uint64_t vocab, merges, max_words, min_freq, seed;
    double split_combined;
    const char *patterns[PRETOK_MAX_PATTERNS];
    size_t n_patterns;
    const char *specials[256];
    size_t n_specials;
} options;

static void parse_options(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"input", required_argument, NULL, 'i'},
        {"field", required_argument, NULL, 'f'},
        {"skip-bad", no_argument, NULL, OPT_SKIP_BAD},
        {"threads", required_argument, NULL, 'j'},
        {"vocab-size", required_argument, NULL, 'v'},
        {"merges", required_argument, NULL, OPT_MERGES},
        {"pattern", required_argument, NULL, 'p'},
        {"special", required_argument, NULL, OPT_SPECIAL},
        {"no-default-specials", no_argument, NULL, OPT_NO_DEFAULT_SPECIALS},
        {"max-words", required_argument, NULL, OPT_MAX_WORDS},
        {"min-frequency", required_argument, NULL, OPT_MIN_FREQ},
        {"tokenizer", required_argument, NULL, 't'},
        {"output", required_argument, NULL, 'o'},
        {"bos", optional_argument, NULL, OPT_BOS},
        {"eos", optional_argument, NULL, OPT_EOS},
        {"pad", required_argument, NULL, OPT_PAD},
        {"allow-special", no_argument, NULL, OPT_ALLOW_SPECIAL},
        {"split-combined", required_argument, NULL, OPT_SPLIT_COMBINED},
        {"seed", required_argument, NULL, OPT_SEED},
        {"ids", no_argument, NULL, OPT_IDS},
        {"text", required_argument, NULL, 'e'},
        {"from", required_argument, NULL, OPT_FROM},
        {"to", required_argument, NULL, OPT_TO},
        {"sep", required_argument, NULL, OPT_SEP},
        {"skip-special", no_argument, NULL, OPT_SKIP_SPECIAL},
        {"stats", no_argument, NULL, OPT_STATS},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    dsv3_err e;
    uint64_t v;
    int c;
    while ((c = getopt_long(argc, argv, "i:f:j:v:p:t:o:e:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &o->common))
            continue;
        switch (c) {
        case 'i':
            if (docin_mode_parse(optarg, &o->input))
                cli_usage(&PROG, "--input: expected auto, text, lines or jsonl, got '%s'",
                          optarg);
            break;
        case 'f': o->field = optarg; break;
        case OPT_SKIP_BAD: o->skip_bad = 1; break;
        case 'j':
            if (cli_parse_u64("--threads", optarg, 1, 256, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->threads = (int)v;
            break;
        case 'v':
            if (cli_parse_u64("--vocab-size", optarg, 1, 1u << 30, &o->vocab, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_MERGES:
            if (cli_parse_u64("--merges", optarg, 0, 1u << 30, &o->merges, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->vocab = 0;
            break;
        case 'p':
            if (o->n_patterns == PRETOK_MAX_PATTERNS)
                cli_usage(&PROG, "--pattern: at most %d", PRETOK_MAX_PATTERNS);
            o->patterns[o->n_patterns++] = optarg;
            break;
        case OPT_SPECIAL:
            if (o->n_specials == 256)
                cli_usage(&PROG, "--special: at most 256");
            o->specials[o->n_specials++] = optarg;
            break;
        case OPT_NO_DEFAULT_SPECIALS: o->no_default_specials = 1; break;
        case OPT_MAX_WORDS:
            if (cli_parse_u64("--max-words", optarg, 1000, UINT64_MAX, &o->max_words, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_MIN_FREQ:
            if (cli_parse_u64("--min-frequency", optarg, 0, UINT64_MAX, &o->min_freq, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->min_freq_set = 1;
            break;
        case 't': o->tok = optarg; break;
        case 'o': o->output = optarg; break;
        case OPT_BOS: o->bos = 1; o->bos_s = optarg; break;
        case OPT_EOS: o->eos = 1; o->eos_s = optarg; break;
        case OPT_PAD: o->pad_s = optarg; break;
        case OPT_ALLOW_SPECIAL: o->allow_special = 1; break;
        case OPT_SPLIT_COMBINED:
            if (cli_parse_double("--split-combined", optarg, 0, 1, &o->split_combined, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_SEED:
            if (cli_parse_u64("--seed", optarg, 0, UINT64_MAX, &o->seed, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_IDS: o->ids = 1; break;
        case 'e': o->text = optarg; break;
        case OPT_FROM: o->from = optarg; break;
        case OPT_TO: o->to = optarg; break;
        case OPT_SEP: o->sep = optarg; break;
        case OPT_SKIP_SPECIAL: o->skip_special = 1; break;
        case OPT_STATS: o->stats = 1; break;
        default: cli_usage(&PROG, "unexpected option");
        }
    }
}

static int default_threads(const options *o)
{
    if (o->threads)
        return o->threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

/* The pre-tokenizer named by --pattern: one built-in name or a sequence of regexes. */
static size_t resolve_patterns(const options *o, const char *dflt, const char *const **out)
{
    if (o->n_patterns == 0) {
        size_t n = pretok_builtin(dflt, out);
        return n;
    }
    if (o->n_patterns == 1) {
        size_t n = pretok_builtin(o->patterns[0], out);
        if (n)
            return n;
    }
    *out = o->patterns;
    return o->n_patterns;
}

static bpe *load_tok(const options *o)
{
    if (!o->tok)
        cli_usage(&PROG, "missing -t TOKENIZER");
    bpe *b;
    dsv3_err e;
    if (bpe_load(&b, o->tok, &e))
        cli_fail(&PROG, &e);
    return b;
}

/* ---- train ---- */

#define FW "\xef\xbd\x9c"      /* U+FF5C FULLWIDTH VERTICAL LINE, as in DeepSeek's tokens */
#define SP "\xe2\x96\x81"      /* U+2581 LOWER ONE EIGHTH BLOCK, their word separator */
static const char *const DS_LEAD[] = {"<" FW "begin" SP "of" SP "sentence" FW ">",
                                      "<" FW "end" SP "of" SP "sentence" FW ">",
                                      "<" FW SP "pad" SP FW ">"};
static const char *const DS_TRAIL[] = {"<" FW "fim" SP "hole" FW ">", "<" FW "fim" SP "begin" FW ">",
                                       "<" FW "fim" SP "end" FW ">", "<" FW "User" FW ">",
                                       "<" FW "Assistant" FW ">"};

static void on_merge(void *ctx, uint32_t done)
{
    progress_update(ctx, done);
}

static int cmd_train(int nfiles, char **files, options *o)
{
    if (!o->output)
        cli_usage(&PROG, "train needs -o TOKENIZER");
    const char *trail[256 + 5];
    size_t nt = 0, nl = o->no_default_specials ? 0 : 3;
    if (!o->no_default_specials)
        for (size_t i = 0; i < 5; i++)
            trail[nt++] = DS_TRAIL[i];
    for (size_t i = 0; i < o->n_specials; i++)
        trail[nt++] = o->specials[i];
    uint64_t merges = o->merges;
    if (!merges) {
        uint64_t v = o->vocab ? o->vocab : 128000;
        if (v < nl + 256)
            cli_usage(&PROG, "--vocab-size %" PRIu64 " leaves no room for the 256 bytes", v);
        merges = v - nl - 256;
    }
    bpetrain_opts to = {
        .n_merges = (uint32_t)merges, .lead = DS_LEAD, .n_lead = nl, .trail = trail,
        .n_trail = nt, .bos = nl ? 0 : BPE_NONE, .eos = nl ? 1 : BPE_NONE,
        .pad = nl ? 2 : BPE_NONE, .max_words = o->max_words,
        .min_frequency = o->min_freq_set ? o->min_freq : 2, .threads = default_threads(o),
    };
    to.n_patterns = resolve_patterns(o, "deepseek-v3", &to.patterns);
    progress pr;   /* the count line first, then the merges line, through on_merge */
    to.on_merge = on_merge;
    to.ctx = &pr;
    bpetrain *t;
    docin *d;
    dsv3_err e;
    if (bpetrain_new(&t, &to, &e) ||
        docin_open(&d, files, (size_t)nfiles, o->input, o->field, o->skip_bad, &e))
        cli_fail(&PROG, &e);
    docin_set_pieces(d, 4u << 20);   /* memory bounded whatever the size of one file */
    docin_set_threads(d, default_threads(o));
    double t0 = progress_now();
    progress_start(&pr, o->common.progress, "count", "B", 0);
    const uint8_t *const *docs;
    const size_t *lens;
    long n;
    uint64_t ndocs = 0;
    while ((n = docin_next(d, 16u << 20, &docs, &lens, &e)) > 0) {
        if (bpetrain_count(t, docs, lens, (size_t)n, &e))
            cli_fail(&PROG, &e);
        ndocs += (uint64_t)n;
        progress_update(&pr, docin_bytes(d));
    }
    progress_finish(&pr);
    if (n < 0)
        cli_fail(&PROG, &e);
    double t1 = progress_now();
    progress_start(&pr, o->common.progress, "merges", "merges", merges);
    bpe *b;
    if (bpetrain_finish(t, &b, &e))
        cli_fail(&PROG, &e);
    progress_finish(&pr);
    if (bpe_save(b, o->output, &e))
        cli_fail(&PROG, &e);
    const bpetrain_stats *st = bpetrain_get_stats(t);
    if (!o->common.quiet) {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        double t2 = progress_now();
        fprintf(stderr,
                "%s: %" PRIu64 " documents or pieces, %.1f MB in %.1f s (%.1f MB/s); %" PRIu64
                " distinct pre-tokens (%" PRIu64 " dropped by --max-words); %u merges in "
                "%.1f s (%.0f merges/s); tables %.1f MiB, peak RSS %.1f MiB; vocabulary %u\n",
                PROG.name, ndocs, (double)st->bytes / 1e6, t1 - t0,
                t1 > t0 ? (double)st->bytes / 1e6 / (t1 - t0) : 0.0, st->words, st->pruned,
                st->merges, t2 - t1, t2 > t1 ? st->merges / (t2 - t1) : 0.0,
                (double)st->peak_bytes / (1 << 20), (double)ru.ru_maxrss / 1024,
                bpe_vocab_size(b));
        if (docin_skipped(d))
            fprintf(stderr, "%s: skipped %" PRIu64 " bad records\n", PROG.name,
                    docin_skipped(d));
    }
    docin_close(d);
    bpetrain_free(t);
    bpe_free(b);
    return 0;
}

/* ---- encode ---- */

static int cmd_encode(int nfiles, char **files, options *o)
{
    if (o->ids && o->output && strcmp(o->output, "-") != 0)
        cli_usage(&PROG, "--ids prints to standard output: leave out -o");
    bpe *b = load_tok(o);
    dsv3_err e;
    if (o->bos && bpe_bos(b) == BPE_NONE)
        cli_failf(&PROG, "%s: the tokenizer has no BOS token", o->tok);
    if (o->eos && bpe_eos(b) == BPE_NONE)
        cli_failf(&PROG, "%s: the tokenizer has no EOS token", o->tok);
    int threads = default_threads(o);
    shard_writer *w = NULL;
    if (!o->ids) {
        if (!o->output && isatty(1))
            cli_usage(&PROG, "refusing to write a binary shard to a terminal (use -o or --ids)");
        shard_params sp;
        shard_params_default(&sp, SHARD_DOCS);
        sp.vocab_size = bpe_vocab_size(b);
        sp.tokenizer_id = bpe_id(b);
        /* compression is about a tenth of encoding's work (docs/PERF.md) */
        sp.threads = threads < 4 ? 1 : threads / 4;
        if (shard_writer_open(&w, o->output ? o->output : "-", &sp, &e))
            cli_fail(&PROG, &e);
    }
    docin *d;
    if ((o->text ? docin_open_mem(&d, o->text, strlen(o->text), &e)
                 : docin_open(&d, files, (size_t)nfiles, o->input, o->field, o->skip_bad, &e)))
        cli_fail(&PROG, &e);
    tokenc_opts to = {.threads = threads, .enc = {o->allow_special, o->split_combined, o->seed},
                      .bos = o->bos, .eos = o->eos, .skip_bad = o->skip_bad};
    progress pr;
    progress_start(&pr, o->common.progress, "encode", "B", 0);
    tokenc_stats st;
    int rc = tokenc_run(b, d, &to, w, stdout, &pr, &st, &e);
    progress_finish(&pr);
    if (rc) {
        shard_writer_abort(w);
        cli_fail(&PROG, &e);
    }
    double compress_s = 0;
    if (w) {   /* the last chunk is compressed by close: its time is not in the stats */
        compress_s = shard_writer_compress_seconds(w);
        if (shard_writer_close(w, &e))
            cli_fail(&PROG, &e);
    }
    if (o->ids && fflush(stdout) != 0)
        cli_failf(&PROG, "<stdout>: write failed");
    if (!o->common.quiet && !o->ids)
        fprintf(stderr, "%s: %" PRIu64 " documents, %" PRIu64 " bytes, %" PRIu64
                " tokens (%.2f bytes/token), %.1f MB/s\n", PROG.name, st.docs, st.bytes,
                st.tokens, st.tokens ? (double)st.bytes / (double)st.tokens : 0.0,
                st.wall > 0 ? st.bytes / 1e6 / st.wall : 0.0);
    if (o->stats)   /* where the time went: thread-seconds of each stage */
        fprintf(stderr, "%s: stats: wall %.3f s; read %.3f s (waiting for a free slot %.3f s); "
                "encode %.3f s on %d threads (idle %.3f s); write %.3f s (waiting for "
                "encoded slots %.3f s); compress %.3f s on %d threads\n", PROG.name, st.wall,
                st.read, st.read_wait, st.encode, threads, st.encode_wait, st.sink,
                st.sink_wait, compress_s, o->ids ? 0 : threads < 4 ? 1 : threads / 4);
    if (docin_skipped(d) && !o->common.quiet)
        fprintf(stderr, "%s: skipped %" PRIu64 " bad records\n", PROG.name, docin_skipped(d));
    docin_close(d);
    bpe_free(b);
    return 0;
}

/* ---- decode ---- */

static size_t unescape(const char *s, char *out)
{
    size_t n = 0;
    for (; *s; s++) {
        if (*s != '\\' || !s[1]) {
            out[n++] = *s;
            continue;
        }
        s++;
        out[n++] = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s == '0' ? '\0' : *s == 'r' ? '\r' : *s;
    }
    return n;
}

static int emit(const bpe *b, const uint32_t *ids, size_t n, const options *o, const char *sep,
                size_t nsep, bpe_bytes *buf, dsv3_err *e)
{
    buf->n = 0;
    if (bpe_decode(b, ids, n, o->skip_special, buf, e))
        return -1;
    if ((buf->n && fwrite(buf->v, 1, buf->n, stdout) != buf->n) ||
        (nsep && fwrite(sep, 1, nsep, stdout) != nsep))
        return err_set(e, "<stdout>: write failed");
    return 0;
}

static int cmd_decode(int nfiles, char **files, options *o)
{
    if (nfiles > 1)
        cli_usage(&PROG, "decode takes one FILE");
    bpe *b = load_tok(o);
    const char *path = nfiles ? files[0] : "-";
    int is_stdin = strcmp(path, "-") == 0;
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    const char *name = is_stdin ? "<stdin>" : path;
    if (!f)
        cli_failf(&PROG, "%s: cannot open: %m", path);
    char sep[256] = "";
    size_t nsep = o->sep ? unescape(o->sep, sep) : 0;
    int shard;
    if (!o->from || strcmp(o->from, "auto") == 0) {
        int c = getc(f);   /* "DSV3SHRD" starts with 'D'; ids never do */
        shard = c == 'D';
        if (c != EOF)
            ungetc(c, f);
    } else if (strcmp(o->from, "shard") == 0 || strcmp(o->from, "ids") == 0) {
        shard = strcmp(o->from, "shard") == 0;
    } else {
        cli_usage(&PROG, "--from: expected auto, shard or ids, got '%s'", o->from);
    }
    dsv3_err e;
    bpe_bytes buf = {0};
    int rc = 0;
    if (shard) {
        shard_reader *r;
        if (shard_open_stream(&r, f, name, !is_stdin, &e))
            cli_fail(&PROG, &e);
        const shard_info *in = shard_get_info(r);
        if (in->tokenizer_id && in->tokenizer_id != bpe_id(b) && !o->common.quiet)
            fprintf(stderr, "%s: warning: %s was made by tokenizer %016" PRIx64 ", not %s (%016"
                    PRIx64 ")\n", PROG.name, name, in->tokenizer_id, o->tok, bpe_id(b));
        shard_record rec;
        while ((rc = shard_next(r, &rec, &e)) == 1)
            if (emit(b, rec.tokens, rec.n_tokens, o, sep, nsep, &buf, &e)) {
                err_prefix(&e, "%s: record %" PRIu64, name, rec.index);
                rc = -1;
                break;
            }
        shard_close(r);
    } else {
        char *line = NULL;
        size_t cap = 0;
        bpe_ids ids = {0};
        uint64_t lineno = 0;
        ssize_t len;
        while (rc == 0 && (len = getline(&line, &cap, f)) >= 0) {
            lineno++;
            ids.n = 0;
            char *s = line, *end;
            for (;;) {
                while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == ',')
                    s++;
                if (!*s)
                    break;
                unsigned long long v = strtoull(s, &end, 10);
                if (end == s || v > UINT32_MAX || *s == '-') {
                    rc = err_set(&e, "expected a token id (%s, line %" PRIu64 ", column %zu)",
                                 name, lineno, (size_t)(s - line) + 1);
                    break;
                }
                if (bpe_ids_push(&ids, (uint32_t)v))
                    rc = err_set(&e, "out of memory");
                s = end;
            }
            if (rc == 0 && emit(b, ids.v, ids.n, o, sep, nsep, &buf, &e))
                rc = err_prefix(&e, "%s, line %" PRIu64, name, lineno);
        }
        free(line);
        bpe_ids_free(&ids);
        if (!is_stdin)
            fclose(f);
    }
    bpe_bytes_free(&buf);
    bpe_free(b);
    if (fflush(stdout) != 0)
        cli_failf(&PROG, "<stdout>: write failed");
    if (rc < 0)
        cli_fail(&PROG, &e);
    return 0;
}

/* ---- import, export, info ---- */

static int cmd_import(int nfiles, char **files, options *o)
{
    if (nfiles != 1)
        cli_usage(&PROG, "import takes one FILE");
    if (!o->output)
        cli_usage(&PROG, "import needs -o TOKENIZER");
    const char *path = files[0];
    size_t pl = strlen(path);
    const char *from = o->from ? o->from : pl >= 5 && strcmp(path + pl - 5, ".json") == 0
                                               ? "hf" : "tiktoken";
    bpe *b;
    dsv3_err e;
    if (strcmp(from, "hf") == 0) {
        if (bpeio_import_hf(&b, path, o->bos_s, o->eos_s, o->pad_s, &e))
            cli_fail(&PROG, &e);
    } else if (strcmp(from, "tiktoken") == 0) {
        if (o->n_patterns == 0)
            cli_usage(&PROG, "a tiktoken file holds no pattern: give --pattern");
        const char *const *pats;
        size_t np = resolve_patterns(o, NULL, &pats);
        bpeio_special sp[256];
        const bpeio_special *spp = sp;
        size_t ns = 0;
        for (size_t i = 0; i < o->n_specials; i++) {
            char *eq = strrchr(o->specials[i], '=');
            uint64_t id;
            if (!eq || eq == o->specials[i] ||
                cli_parse_u64("--special", eq + 1, 0, (1u << 30) - 1, &id, &e))
                cli_usage(&PROG, "--special: expected STR=ID, got '%s'", o->specials[i]);
            *eq = '\0';
            sp[ns++] = (bpeio_special){o->specials[i], (uint32_t)id};
        }
        if (ns == 0 && o->n_patterns == 1 && !o->no_default_specials)
            ns = bpeio_tiktoken_specials(o->patterns[0], &spp);
        if (bpeio_import_tiktoken(&b, path, pats, np, spp, ns, o->bos_s, o->eos_s, o->pad_s, &e))
            cli_fail(&PROG, &e);
    } else {
        cli_usage(&PROG, "--from: expected hf or tiktoken, got '%s'", from);
    }
    if (bpe_save(b, o->output, &e))
        cli_fail(&PROG, &e);
    if (!o->common.quiet)
        fprintf(stderr, "%s: %s: %u ids, %u merges\n", PROG.name, o->output, bpe_vocab_size(b),
                bpe_n_merges(b));
    bpe_free(b);
    return 0;
}

static int cmd_export(options *o)
{
    if (!o->output)
        cli_usage(&PROG, "export needs -o FILE");
    bpe *b = load_tok(o);
    dsv3_err e;
    const char *to = o->to ? o->to : "hf";
    int rc;
    if (strcmp(to, "hf") == 0)
        rc = bpeio_export_hf(b, o->output, &e);
    else if (strcmp(to, "tiktoken") == 0)
        rc = bpeio_export_tiktoken(b, o->output, &e);
    else
        cli_usage(&PROG, "--to: expected hf or tiktoken, got '%s'", to);
    if (rc)
        cli_fail(&PROG, &e);
    if (strcmp(to, "tiktoken") == 0 && !o->common.quiet)
        for (uint32_t id = 0; id < bpe_vocab_size(b); id++)
            if (bpe_token_kind(b, id) == BPE_SPECIAL) {
                size_t len;
                const uint8_t *s = bpe_token(b, id, &len);
                fprintf(stderr, "%s: special token (not in the file) %.*s=%u\n", PROG.name,
                        (int)len, s, id);
            }
    bpe_free(b);
    return 0;
}

static void print_token(const bpe *b, const char *label, uint32_t id)
{
    if (id == BPE_NONE) {
        printf("%-13s none\n", label);
        return;
    }
    size_t len;
    const uint8_t *s = bpe_token(b, id, &len);
    printf("%-13s %u %.*s\n", label, id, (int)len, s);
}

static int cmd_info(int nfiles, char **files, options *o)
{
    if (nfiles != 1)
        cli_usage(&PROG, "info takes one TOKENIZER");
    o->tok = files[0];
    bpe *b = load_tok(o);
    uint32_t counts[5] = {0};
    for (uint32_t id = 0; id < bpe_vocab_size(b); id++)
        counts[bpe_token_kind(b, id)]++;
    printf("file:         %s\n", files[0]);
    printf("format:       dsv3 tokenizer version %d\n", BPE_VERSION);
    printf("id:           %016" PRIx64 "\n", bpe_id(b));
    printf("vocab_size:   %u (bytes %u, merged %u, plain %u, special %u, unused %u)\n",
           bpe_vocab_size(b), counts[BPE_BYTE], counts[BPE_MERGED], counts[BPE_PLAIN],
           counts[BPE_SPECIAL], counts[BPE_UNUSED]);
    printf("merges:       %u\n", bpe_n_merges(b));
    printf("whole_piece:  %s\n", bpe_flags(b) & BPE_FLAG_WHOLE_PIECE ? "yes" : "no");
    print_token(b, "bos:", bpe_bos(b));
    print_token(b, "eos:", bpe_eos(b));
    print_token(b, "pad:", bpe_pad(b));
    for (uint32_t id = 0; id < bpe_vocab_size(b); id++)
        if (bpe_token_kind(b, id) == BPE_SPECIAL)
            print_token(b, "special:", id);
    const pretok *pt = bpe_pretok(b);
    for (size_t i = 0; i < pretok_count(pt); i++) {
        printf("pattern %zu:    ", i + 1);
        for (const char *c = pretok_pattern(pt, i); *c; c++)   /* \r \n shown as escapes */
            if (*c == '\r' || *c == '\n' || *c == '\t')
                printf("\\%c", *c == '\r' ? 'r' : *c == '\n' ? 'n' : 't');
            else
                putchar(*c);
        putchar('\n');
    }
    bpe_free(b);
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    options o = {0};
    if (argc < 2)
        cli_usage(&PROG, "missing command (train, encode, decode, import, export or info)");
    const char *cmd = argv[1];
    if (cmd[0] == '-') {
        parse_options(argc, argv, &o);
        cli_usage(&PROG, "missing command (train, encode, decode, import, export or info)");
    }
    parse_options(argc - 1, argv + 1, &o);
    int nfiles = argc - 1 - optind;
    char **files = argv + 1 + optind;
    if (strcmp(cmd, "train") == 0)
        return cmd_train(nfiles, files, &o);
    if (strcmp(cmd, "encode") == 0)
        return cmd_encode(nfiles, files, &o);
    if (strcmp(cmd, "decode") == 0)
        return cmd_decode(nfiles, files, &o);
    if (strcmp(cmd, "import") == 0)
        return cmd_import(nfiles, files, &o);
    if (strcmp(cmd, "export") == 0)
        return cmd_export(&o);
    if (strcmp(cmd, "info") == 0)
        return cmd_info(nfiles, files, &o);
    cli_usage(&PROG, "unknown command '%s' (train, encode, decode, import, export or info)", cmd);
}
