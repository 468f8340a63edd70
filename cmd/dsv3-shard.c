/* dsv3-shard: look inside, check and make shard files from the shell. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/cli.h"
#include "../lib/progress.h"
#include "../lib/shard.h"

static const cli_program PROG = {
    "dsv3-shard",
    "Usage: dsv3-shard COMMAND [OPTION]... [FILE]...\n"
    "Inspect, verify, dump and make dsv3 shard files (docs/formats.md).\n"
    "\n"
    "Commands:\n"
    "  info FILE...     header, counts and index of each shard (reads only the header\n"
    "                   and index of a regular file; a pipe is read through)\n"
    "  verify FILE...   read every chunk and check every checksum, count and index entry;\n"
    "                   one line per file; exit 1 if any file is damaged\n"
    "  dump FILE        records as text: one line per record, token ids separated by spaces\n"
    "  make [FILE...]   the reverse of dump: lines of token ids to a shard (or, with --bytes,\n"
    "                   each FILE's raw bytes as one document of byte tokens 0..255)\n"
    "\n"
    "Options:\n"
    "  -o, --output=PATH      make: where to write (default '-', standard output)\n"
    "  -k, --kind=KIND        make: 'docs' (default) or 'packed'\n"
    "  -L, --seq-len=N        make: tokens per packed record (needs --kind packed)\n"
    "      --vocab-size=N     make: state the vocabulary size; every id must be below it\n"
    "      --level=N          make: zstd level (default 3)\n"
    "      --chunk-tokens=N   make: tokens per chunk (default 1Mi)\n"
    "      --shuffle          make: store tokens as byte planes (smaller for ids without\n"
    "                         repeated n-grams; real BPE text compresses better without)\n"
    "      --no-shuffle       make: without the byte planes (the default)\n"
    "      --threads=N        make: zstd compression threads (default 0: none)\n"
    "      --bytes            make: inputs are files whose bytes are the tokens\n"
    "  -F, --flags            dump/make: each line starts with the record's flags and a tab\n"
    "  -r, --records=A:B      dump: only records A to B-1 (random access; either may be empty)\n"
    "      --chunks           info: list every chunk's offset, first record and first token\n"
    "      --progress         show progress on stderr even when it is not a terminal\n"
    "      --quiet            no progress, no summary\n"
    "      --help             this help\n"
    "      --version          the version\n"
    "\n"
    "FILE '-' is standard input. Exit status: 0 ok, 1 damaged or unreadable input,\n"
    "2 usage error. See dsv3-shard(1).\n",
};

typedef struct options {
    cli_common common;
    const char *output;
    shard_params params;
    int flags;
    int bytes;
    int chunks;
    uint64_t rec_from, rec_to;
    int has_range;
} options;

enum { OPT_VOCAB = 0x2000, OPT_LEVEL, OPT_CHUNK_TOKENS, OPT_NO_SHUFFLE, OPT_SHUFFLE, OPT_THREADS, OPT_BYTES,
       OPT_CHUNKS };

static void parse_range(const char *s, options *o)
{
    dsv3_err e;
    const char *colon = strchr(s, ':');
    if (!colon)
        cli_usage(&PROG, "--records: expected A:B, got '%s'", s);
    char a[64] = {0};
    size_t na = (size_t)(colon - s);
    if (na >= sizeof a)
        cli_usage(&PROG, "--records: '%s' is too long", s);
    memcpy(a, s, na);
    o->rec_from = 0;
    o->rec_to = UINT64_MAX;
    if (*a && cli_parse_u64("--records", a, 0, UINT64_MAX, &o->rec_from, &e))
        cli_usage(&PROG, "%s", e.msg);
    if (colon[1] && cli_parse_u64("--records", colon + 1, 0, UINT64_MAX, &o->rec_to, &e))
        cli_usage(&PROG, "%s", e.msg);
    if (o->rec_to < o->rec_from)
        cli_usage(&PROG, "--records: %s is an empty range backwards", s);
    o->has_range = 1;
}

static void parse_options(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"output", required_argument, NULL, 'o'},
        {"kind", required_argument, NULL, 'k'},
        {"seq-len", required_argument, NULL, 'L'},
        {"vocab-size", required_argument, NULL, OPT_VOCAB},
        {"level", required_argument, NULL, OPT_LEVEL},
        {"chunk-tokens", required_argument, NULL, OPT_CHUNK_TOKENS},
        {"no-shuffle", no_argument, NULL, OPT_NO_SHUFFLE},
        {"shuffle", no_argument, NULL, OPT_SHUFFLE},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"bytes", no_argument, NULL, OPT_BYTES},
        {"flags", no_argument, NULL, 'F'},
        {"records", required_argument, NULL, 'r'},
        {"chunks", no_argument, NULL, OPT_CHUNKS},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    dsv3_err e;
    uint64_t v;
    int c;
    while ((c = getopt_long(argc, argv, "o:k:L:Fr:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &o->common))
            continue;
        switch (c) {
        case 'o':
            o->output = optarg;
            break;
        case 'k':
            if (strcmp(optarg, "docs") == 0)
                o->params.kind = SHARD_DOCS;
            else if (strcmp(optarg, "packed") == 0)
                o->params.kind = SHARD_PACKED;
            else
                cli_usage(&PROG, "--kind: expected 'docs' or 'packed', got '%s'", optarg);
            break;
        case 'L':
            if (cli_parse_u64("--seq-len", optarg, 1, UINT32_MAX, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->params.seq_len = (uint32_t)v;
            break;
        case OPT_VOCAB:
            if (cli_parse_u64("--vocab-size", optarg, 1, UINT32_MAX, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->params.vocab_size = (uint32_t)v;
            break;
        case OPT_LEVEL:
            if (cli_parse_u64("--level", optarg, 1, 22, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->params.level = (int)v;
            break;
        case OPT_CHUNK_TOKENS:
            if (cli_parse_u64("--chunk-tokens", optarg, 1, 1u << 28, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->params.chunk_tokens = (uint32_t)v;
            break;
        case OPT_NO_SHUFFLE:
            o->params.shuffle = 0;
            break;
        case OPT_SHUFFLE:
            o->params.shuffle = 1;
            break;
        case OPT_THREADS:
            if (cli_parse_u64("--threads", optarg, 0, 256, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->params.threads = (int)v;
            break;
        case OPT_BYTES:
            o->bytes = 1;
            break;
        case 'F':
            o->flags = 1;
            break;
        case 'r':
            parse_range(optarg, o);
            break;
        case OPT_CHUNKS:
            o->chunks = 1;
            break;
        default:
            cli_usage(&PROG, "unexpected option");
        }
    }
}

/* ---- info ---- */

static void print_info(const char *path, shard_reader *r, const options *o)
{
    const shard_info *in = shard_get_info(r);
    const shard_stats *st = shard_get_stats(r);
    printf("file:         %s\n", path);
    printf("format:       dsv3 shard version %u\n", in->version);
    printf("kind:         %s\n", shard_kind_name(in->kind));
    if (in->kind == SHARD_PACKED)
        printf("seq_len:      %u\n", in->seq_len);
    printf("records:      %" PRIu64 "\n", in->n_records);
    printf("tokens:       %" PRIu64 "\n", in->n_tokens);
    printf("chunks:       %" PRIu64 "\n", in->n_chunks);
    printf("chunk_tokens: %u\n", in->chunk_tokens);
    if (in->vocab_size)
        printf("vocab_size:   %u\n", in->vocab_size);
    else
        printf("vocab_size:   not stated\n");
    if (in->tokenizer_id)
        printf("tokenizer_id: %016" PRIx64 "\n", in->tokenizer_id);
    else
        printf("tokenizer_id: not stated\n");
    printf("counts_in_header: %s\n", in->counts_known ? "yes" : "no (written to a pipe)");
    if (st->chunks)   /* read through (a pipe): the payload figures are known */
        printf("ratio:        %.3f (%" PRIu64 " bytes of tokens and ends in %" PRIu64 ")\n",
               st->bytes_compressed ? (double)st->bytes_raw / (double)st->bytes_compressed : 0.0,
               st->bytes_raw, st->bytes_compressed);
    if (o->chunks && in->index_known) {
        printf("chunk  offset  first_record  first_token\n");
        for (uint64_t c = 0; c < in->n_chunks; c++) {
            shard_chunk_entry x;
            if (shard_chunk(r, c, &x, NULL) == 0)
                printf("%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", c, x.offset,
                       x.first_record, x.first_token);
        }
    }
}

static int cmd_info(int nfiles, char **files, const options *o)
{
    int failed = 0;
    for (int i = 0; i < nfiles; i++) {
        shard_reader *r;
        dsv3_err e;
        if (shard_open(&r, files[i], &e) ||
            (!shard_get_info(r)->index_known && shard_verify(r, &e))) {
            fprintf(stderr, "%s: %s\n", PROG.name, e.msg);
            shard_close(r);
            failed = 1;
            continue;
        }
        if (i > 0)
            putchar('\n');
        print_info(files[i], r, o);
        shard_close(r);
    }
    return failed;
}

/* ---- verify ---- */

static int verify_one(const char *path, const options *o, dsv3_err *e)
{
    shard_reader *r;
    if (shard_open(&r, path, e))
        return -1;
    progress pr;
    progress_start(&pr, o->common.progress, path, "tokens", shard_get_info(r)->n_tokens);
    shard_record rec;
    int rc;
    while ((rc = shard_next(r, &rec, e)) == 1)
        progress_update(&pr, shard_get_stats(r)->tokens);
    progress_finish(&pr);
    if (rc == 0 && !o->common.quiet) {
        const shard_stats *st = shard_get_stats(r);
        double t = progress_now() - pr.t_start;
        printf("%s: ok, %" PRIu64 " records, %" PRIu64 " tokens in %" PRIu64 " chunks, ratio "
               "%.2f, %.1f MB/s of tokens\n", path, st->records, st->tokens, st->chunks,
               st->bytes_compressed ? (double)st->bytes_raw / (double)st->bytes_compressed : 0.0,
               t > 0 ? 4e-6 * (double)st->tokens / t : 0.0);
    }
    shard_close(r);
    return rc;
}

static int cmd_verify(int nfiles, char **files, const options *o)
{
    int failed = 0;
    for (int i = 0; i < nfiles; i++) {
        dsv3_err e;
        if (verify_one(files[i], o, &e)) {
            fprintf(stderr, "%s: %s\n", PROG.name, e.msg);
            failed = 1;
        }
    }
    return failed;
}

/* ---- dump ---- */

static int print_record(const shard_record *rec, int flags)
{
    if (flags)
        printf("%u\t", rec->flags);
    for (uint64_t i = 0; i < rec->n_tokens; i++)
        printf(i ? " %u" : "%u", rec->tokens[i]);
    return putchar('\n') == EOF ? -1 : 0;
}

static int cmd_dump(const char *path, const options *o)
{
    shard_reader *r;
    dsv3_err e;
    if (shard_open(&r, path, &e))
        cli_fail(&PROG, &e);
    if (o->has_range && o->rec_from > 0 && !shard_get_info(r)->index_known)
        cli_usage(&PROG, "--records with a start needs a regular file, not a pipe");
    if (o->has_range && o->rec_from > 0 && shard_seek(r, o->rec_from, &e)) {
        shard_close(r);
        cli_fail(&PROG, &e);
    }
    shard_record rec;
    int rc = 0;
    uint64_t n = 0, want = o->has_range ? o->rec_to - o->rec_from : UINT64_MAX;
    while (n < want && (rc = shard_next(r, &rec, &e)) == 1) {
        if (print_record(&rec, o->flags))
            break;
        n++;
    }
    if (n == want)
        rc = 0;
    shard_close(r);
    if (fflush(stdout) != 0)
        cli_failf(&PROG, "<stdout>: write failed: %s", strerror(errno));
    if (rc < 0)
        cli_fail(&PROG, &e);
    return 0;
}

/* ---- make ---- */

typedef struct line_reader {
    FILE *f;
    const char *name;
    char *buf;
    size_t cap;
    uint64_t line;
} line_reader;

/* One line of ids (optionally "FLAGS\t" first) into toks; the message names line and column. */
static int parse_line(const char *s, size_t len, int with_flags, uint32_t **toks, size_t *n,
                      size_t *cap, uint32_t *flags, const char *name, uint64_t line, dsv3_err *e)
{
    size_t i = 0;
    *n = 0;
    *flags = 0;
    if (with_flags) {
        const char *tab = memchr(s, '\t', len);
        char *end;
        errno = 0;
        unsigned long long f = tab ? strtoull(s, &end, 10) : 0;
        if (!tab || end != tab || errno || f > UINT32_MAX || !isdigit((unsigned char)s[0]))
            return err_set(e, "%s:%" PRIu64 ": expected FLAGS and a tab at the start of the line",
                           name, line);
        *flags = (uint32_t)f;
        i = (size_t)(tab - s) + 1;
    }
    while (i < len) {
        if (s[i] == ' ' || s[i] == '\t' || s[i] == '\r') {
            i++;
            continue;
        }
        if (!isdigit((unsigned char)s[i]))
            return err_set(e, "%s:%" PRIu64 ":%zu: expected a token id, got '%c'", name, line,
                           i + 1, s[i]);
        uint64_t v = 0;
        size_t start = i;
        while (i < len && isdigit((unsigned char)s[i])) {
            v = v * 10 + (uint64_t)(s[i] - '0');
            if (v > UINT32_MAX)
                return err_set(e, "%s:%" PRIu64 ":%zu: token id does not fit 32 bits", name,
                               line, start + 1);
            i++;
        }
        if (*n == *cap) {
            size_t nc = *cap ? 2 * *cap : 1024;
            uint32_t *q = realloc(*toks, nc * sizeof *q);
            if (!q)
                return err_set(e, "%s:%" PRIu64 ": out of memory", name, line);
            *toks = q;
            *cap = nc;
        }
        (*toks)[(*n)++] = (uint32_t)v;
    }
    return 0;
}

static int make_from_text(shard_writer *w, FILE *f, const char *name, const options *o,
                          progress *pr, uint64_t *total, dsv3_err *e)
{
    char *line = NULL;
    size_t lcap = 0, n = 0, cap = 0;
    uint32_t *toks = NULL, flags;
    uint64_t lineno = 0;
    ssize_t len;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &lcap, f)) >= 0) {
        lineno++;
        if (len > 0 && line[len - 1] == '\n')
            len--;
        rc = parse_line(line, (size_t)len, o->flags, &toks, &n, &cap, &flags, name, lineno, e);
        if (rc == 0)
            rc = shard_write_record(w, toks, n, flags, e);
        *total += n;
        progress_update(pr, *total);
    }
    if (rc == 0 && ferror(f))
        rc = err_errno(e, "%s: read failed", name);
    free(line);
    free(toks);
    return rc;
}

static int make_from_bytes(shard_writer *w, FILE *f, const char *name, progress *pr,
                           uint64_t *total, dsv3_err *e)
{
    unsigned char buf[1 << 16];
    uint32_t toks[sizeof buf];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        for (size_t i = 0; i < got; i++)
            toks[i] = buf[i];
        if (shard_write(w, toks, got, e))
            return -1;
        *total += got;
        progress_update(pr, *total);
    }
    if (ferror(f))
        return err_errno(e, "%s: read failed", name);
    return shard_end_record(w, 0, e);
}

static int cmd_make(int nfiles, char **files, const options *o)
{
    static char *stdin_only[] = {"-"};
    if (nfiles == 0) {
        files = stdin_only;
        nfiles = 1;
    }
    if (o->params.kind == SHARD_PACKED && o->params.seq_len == 0)
        cli_usage(&PROG, "--kind packed needs --seq-len");
    if (o->params.kind == SHARD_DOCS && o->params.seq_len != 0)
        cli_usage(&PROG, "--seq-len needs --kind packed");
    shard_writer *w;
    dsv3_err e;
    if (shard_writer_open(&w, o->output ? o->output : "-", &o->params, &e))
        cli_fail(&PROG, &e);
    progress pr;
    progress_start(&pr, o->common.progress, "make", "tokens", 0);
    uint64_t total = 0;
    int rc = 0;
    for (int i = 0; i < nfiles && rc == 0; i++) {
        int is_stdin = strcmp(files[i], "-") == 0;
        FILE *f = is_stdin ? stdin : fopen(files[i], "rb");
        const char *name = is_stdin ? "<stdin>" : files[i];
        if (!f) {
            rc = err_errno(&e, "%s: cannot open", files[i]);
            break;
        }
        rc = o->bytes ? make_from_bytes(w, f, name, &pr, &total, &e)
                      : make_from_text(w, f, name, o, &pr, &total, &e);
        if (!is_stdin)
            fclose(f);
    }
    progress_finish(&pr);
    if (rc) {
        shard_writer_abort(w);
        cli_fail(&PROG, &e);
    }
    if (shard_writer_close(w, &e))
        cli_fail(&PROG, &e);
    return 0;
}

int main(int argc, char **argv)
{
    options o = {0};
    shard_params_default(&o.params, SHARD_DOCS);
    if (argc < 2)
        cli_usage(&PROG, "missing command (info, verify, dump or make)");
    const char *cmd = argv[1];
    if (cmd[0] == '-') {   /* only --help and --version come before a command */
        parse_options(argc, argv, &o);
        cli_usage(&PROG, "missing command (info, verify, dump or make)");
    }
    parse_options(argc - 1, argv + 1, &o);
    int nfiles = argc - 1 - optind;
    char **files = argv + 1 + optind;
    if (strcmp(cmd, "make") == 0)
        return cmd_make(nfiles, files, &o);
    if (o.output)
        cli_usage(&PROG, "--output belongs to 'make'");
    if (strcmp(cmd, "dump") == 0) {
        if (nfiles != 1)
            cli_usage(&PROG, "dump takes one FILE");
        return cmd_dump(files[0], &o);
    }
    if (nfiles < 1)
        cli_usage(&PROG, "%s needs at least one FILE", cmd);
    if (strcmp(cmd, "info") == 0)
        return cmd_info(nfiles, files, &o);
    if (strcmp(cmd, "verify") == 0)
        return cmd_verify(nfiles, files, &o);
    cli_usage(&PROG, "unknown command '%s' (info, verify, dump or make)", cmd);
}
