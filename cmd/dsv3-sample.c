/* dsv3-sample: a model from the shell. So far --score: per-token log-probabilities and the
 * mean loss of token sequences (shards, or text with -t) as JSONL. Generation is to come. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/gpu.h"
#include "../lib/bpe.h"
#include "../lib/cli.h"
#include "../lib/docin.h"
#include "../lib/model.h"
#include "../lib/ops.h"
#include "../lib/outfile.h"
#include "../lib/progress.h"
#include "../lib/sample.h"
#include "../lib/shard.h"

static const cli_program PROG = {
    "dsv3-sample",
    "Usage: dsv3-sample --score -m DIR [OPTION]... [FILE]...\n"
    "Score token sequences with a model: for each document, the log-probability of every\n"
    "token after the ones before it, and the mean loss, one JSON object a line:\n"
    "  {\"doc\":D,\"offset\":O,\"tokens\":[...],\"logprobs\":[...],\"loss\":X,\"n\":K}\n"
    "FILEs are shards (documents or packed sequences; - or none: standard input), or with\n"
    "-t text documents (text, lines or JSONL) encoded with that tokenizer.\n"
    "Generation (without --score) is to come.\n"
    "\n"
    "Options:\n"
    "      --score           score (the only mode so far)\n"
    "  -m, --model=DIR       checkpoint folder (config.json, safetensors; sharded or not)\n"
    "  -t, --tokenizer=FILE  inputs are text; encode them with this dsv3 tokenizer\n"
    "  -i, --input=MODE      with -t: auto (default), text (a file is a document), lines\n"
    "                        (a line is a document), jsonl (a JSON object per line)\n"
    "  -f, --field=NAME      with -t and jsonl: the document's string field (default text)\n"
    "      --bos             with -t: begin every document with the tokenizer's BOS token\n"
    "  -L, --window=N        score at most N tokens at a time; longer documents go in\n"
    "                        consecutive windows, one object each (default: the config's\n"
    "                        max_position_embeddings)\n"
    "  -o, --output=FILE     write the JSONL there (atomically) instead of standard output\n"
    "      --threads=N       CPU threads (default: all; results do not depend on it)\n"
    "      --device=cpu|cuda where the model runs (default cpu; cuda: bf16 on GPU 0)\n"
    "      --quiet           no summary on standard error\n"
    "      --progress        show progress even when standard error is not a terminal\n"
    "      --help            this help\n"
    "      --version         the version\n"
    "\n"
    "Exit status: 0 ok, 1 a failure (unreadable model or input, token outside the\n"
    "vocabulary), 2 usage error.\n",
};

enum { OPT_SCORE = 0x100, OPT_BOS, OPT_THREADS, OPT_DEVICE };

typedef struct options {
    cli_common common;
    int score, bos, cuda;
    const char *model, *tok, *output, *field;
    docin_mode mode;
    uint64_t window, threads;
} options;

typedef struct run {
    sample_scorer *sc;
    FILE *out;
    progress pr;
    uint64_t docs, tokens, count;
    double sum;
} run;

static int score_one(run *r, const uint32_t *ids, uint64_t n, dsv3_err *e)
{
    if (sample_score_doc(r->sc, r->docs, ids, n, r->out, &r->sum, &r->count, e))
        return -1;
    r->docs++;
    r->tokens += n;
    progress_update(&r->pr, r->tokens);
    return 0;
}

static int score_shards(run *r, char **files, int n, dsv3_err *e)
{
    char *stdin_only[] = {"-"};
    if (!n) {
        files = stdin_only;
        n = 1;
    }
    for (int i = 0; i < n; i++) {
        shard_reader *rd;
        if (shard_open(&rd, files[i], e))
            return -1;
        shard_record rec;
        int got;
        while ((got = shard_next(rd, &rec, e)) == 1)
            if (score_one(r, rec.tokens, rec.n_tokens, e)) {
                got = -1;
                break;
            }
        shard_close(rd);
        if (got < 0)
            return -1;
    }
    return 0;
}

static int score_text(run *r, const options *o, char **files, int n, dsv3_err *e)
{
    bpe *b;
    if (bpe_load(&b, o->tok, e))
        return -1;
    bpe_encoder *enc = NULL;
    docin *d = NULL;
    bpe_ids ids = {0};
    int rc = bpe_encoder_new(&enc, b, e);
    if (!rc && o->bos && bpe_bos(b) == BPE_NONE)
        rc = err_set(e, "%s: --bos, but the tokenizer has no BOS token", o->tok);
    if (!rc)
        rc = docin_open(&d, files, (size_t)n, o->mode, o->field, 0, e);
    bpe_encode_opts eo = {0};
    while (!rc) {
        const uint8_t *const *docs;
        const size_t *lens;
        long got = docin_next(d, 1 << 20, &docs, &lens, e);
        if (got <= 0) {
            rc = (int)got;
            break;
        }
        for (long i = 0; i < got && !rc; i++) {
            ids.n = 0;
            if (o->bos)
                rc = bpe_ids_push(&ids, bpe_bos(b)) ? err_set(e, "out of memory") : 0;
            if (!rc)
                rc = bpe_encode(enc, docs[i], lens[i], &eo, &ids, e);
            if (!rc)
                rc = score_one(r, ids.v, ids.n, e);
        }
    }
    bpe_ids_free(&ids);
    docin_close(d);
    bpe_encoder_free(enc);
    bpe_free(b);
    return rc;
}

static void parse(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"score", no_argument, NULL, OPT_SCORE},
        {"model", required_argument, NULL, 'm'},
        {"tokenizer", required_argument, NULL, 't'},
        {"input", required_argument, NULL, 'i'},
        {"field", required_argument, NULL, 'f'},
        {"bos", no_argument, NULL, OPT_BOS},
        {"window", required_argument, NULL, 'L'},
        {"output", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"device", required_argument, NULL, OPT_DEVICE},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof *o);
    o->field = "text";
    o->mode = DOCIN_AUTO;
    int c;
    dsv3_err e;
    while ((c = getopt_long(argc, argv, "m:t:L:o:i:f:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &o->common))
            continue;
        switch (c) {
        case OPT_SCORE: o->score = 1; break;
        case 'm': o->model = optarg; break;
        case 't': o->tok = optarg; break;
        case 'i':
            if (docin_mode_parse(optarg, &o->mode))
                cli_usage(&PROG, "--input: '%s' is not auto, text, lines or jsonl", optarg);
            break;
        case 'f': o->field = optarg; break;
        case OPT_BOS: o->bos = 1; break;
        case 'L':
            if (cli_parse_u64("--window", optarg, 1, 1 << 20, &o->window, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case 'o': o->output = optarg; break;
        case OPT_THREADS:
            if (cli_parse_u64("--threads", optarg, 1, 1024, &o->threads, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_DEVICE:
            if (strcmp(optarg, "cpu") && strcmp(optarg, "cuda"))
                cli_usage(&PROG, "--device: expected cpu or cuda, got '%s'", optarg);
            o->cuda = !strcmp(optarg, "cuda");
            break;
        default: cli_usage(&PROG, "unexpected option");
        }
    }
    if (!o->score)
        cli_usage(&PROG, "generation is not written yet; use --score");
    if (!o->model)
        cli_usage(&PROG, "--score needs a model (-m DIR)");
    if (!o->tok && (o->bos || o->mode != DOCIN_AUTO))
        cli_usage(&PROG, "--bos and --input need a tokenizer (-t)");
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    if (o.threads)
        ops_set_threads((int)o.threads);
    dsv3_err e;
    dsv3_model m;
    /* Scoring needs only the main model: the MTP modules are not loaded. */
    if (model_load_flags(&m, o.model, MODEL_LOAD_NO_MTP, &e))
        cli_fail(&PROG, &e);
    run r = {0};
    if (sample_scorer_new(&r.sc, &m, (int)o.window, &e))
        cli_fail(&PROG, &e);
    if (o.cuda && gpu_count() <= 0)
        cli_failf(&PROG, "--device cuda: no GPU found%s; use --device cpu",
                  gpu_compiled() ? "" : " (this dsv3 was built without CUDA)");
    if (o.cuda && sample_scorer_use_gpu(r.sc, 0, &e))
        cli_fail(&PROG, &e);
    outfile of;
    if (outfile_open(&of, o.output ? o.output : "-", &e))
        cli_fail(&PROG, &e);
    r.out = of.f;
    progress_start(&r.pr, o.common.progress, "score", "tok", 0);
    double t0 = progress_now();
    int rc = o.tok ? score_text(&r, &o, argv + optind, argc - optind, &e)
                   : score_shards(&r, argv + optind, argc - optind, &e);
    progress_finish(&r.pr);
    if (!rc && (fflush(r.out) || ferror(r.out)))
        rc = err_errno(&e, "%s", outfile_name(&of));
    if (rc) {
        outfile_abort(&of);
        cli_fail(&PROG, &e);
    }
    if (o.output && outfile_commit(&of, &e))
        cli_fail(&PROG, &e);
    if (!o.common.quiet) {
        double dt = progress_now() - t0;
        fprintf(stderr, "dsv3-sample: %llu documents, %llu predictions, mean loss %.6f "
                "(perplexity %.3f), %.0f tokens/s\n", (unsigned long long)r.docs,
                (unsigned long long)r.count, r.count ? r.sum / r.count : 0.0,
                r.count ? exp(r.sum / r.count) : 0.0, dt > 0 ? r.tokens / dt : 0.0);
    }
    sample_scorer_free(r.sc);
    model_free(&m);
    return 0;
}
