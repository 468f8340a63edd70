/* dsv3-sample: a model from the shell: generation from a prompt (streamed), --chat,
 * --batch (JSONL in, JSONL out, continuous batching) and --score (per-token log-probs and
 * the mean loss of token sequences as JSONL). Parses arguments and calls lib/sample. */
#include <math.h>
#include <time.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/gpu.h"
#include "../lib/bpe.h"
#include "../lib/cli.h"
#include "../lib/docin.h"
#include "../lib/infer.h"
#include "../lib/model.h"
#include "../lib/ops.h"
#include "../lib/outfile.h"
#include "../lib/progress.h"
#include "../lib/sample.h"
#include "../lib/sampler.h"
#include "../lib/shard.h"

static const cli_program PROG = {
    "dsv3-sample",
    "Usage: dsv3-sample -m DIR -t TOKENIZER [-p PROMPT | -f FILE] [OPTION]...\n"
    "  or:  dsv3-sample --chat -m DIR -t TOKENIZER [OPTION]...\n"
    "  or:  dsv3-sample --batch -m DIR -t TOKENIZER [OPTION]... < requests.jsonl\n"
    "  or:  dsv3-sample --score -m DIR [OPTION]... [FILE]...\n"
    "Generate text with a model, on the GPU when there is one (else the CPU). The prompt (-p, -f, or standard input) is\n"
    "processed in one pass, then tokens are sampled one at a time and the text streams to\n"
    "standard output; statistics go to standard error at the end.\n"
    "--chat: DeepSeek-V3's chat template; each line of standard input is a user turn, each\n"
    "answer ends at the end-of-sentence token. --batch: one JSON object a line,\n"
    "  {\"prompt\":...,\"n_predict\":N,\"temperature\":T,\"top_k\":K,\"top_p\":P,\"min_p\":M,\n"
    "   \"repeat_penalty\":R,\"seed\":S,\"stop\":[...]} (all but prompt optional), answered\n"
    "in input order by {\"index\":I,\"text\":...,\"tokens\":N,\"stop_reason\":\"eos|stop|length|ctx\"};\n"
    "--parallel sequences are decoded together, a finished one's slot refilled at once.\n"
    "--score: for each document, the log-probability of every token after the ones before\n"
    "it and the mean loss, one JSON object a line:\n"
    "  {\"doc\":D,\"offset\":O,\"tokens\":[...],\"logprobs\":[...],\"loss\":X,\"n\":K}\n"
    "FILEs are shards (- or none: standard input), or with -t text documents.\n"
    "\n"
    "Options:\n"
    "  -m, --model=DIR       checkpoint folder (config.json, safetensors; sharded or not)\n"
    "  -t, --tokenizer=FILE  dsv3 tokenizer (needed to generate; with --score: inputs are\n"
    "                        text encoded with it)\n"
    "  -p, --prompt=TEXT     the prompt (special-token strings in it become tokens)\n"
    "  -f, --file=FILE       the prompt from a file (--batch: the requests)\n"
    "  -n, --n-predict=N     generate at most N tokens (default -1: until EOS or the\n"
    "                        context is full)\n"
    "  -c, --ctx=N           context length: prompt and generated tokens (default the\n"
    "                        config's max_position_embeddings, at most 4096)\n"
    "      --temp=T          temperature (default 0.8; 0: greedy)\n"
    "      --top-k=K         keep the K most likely tokens (default 40; 0: off)\n"
    "      --top-p=P         keep the smallest set of mass P (default 0.95; 1: off)\n"
    "      --min-p=P         keep tokens at least P times the most likely (default 0.05)\n"
    "      --repeat-penalty=R  penalise tokens of the last --repeat-last-n (default 1: off)\n"
    "      --repeat-last-n=N   tokens the penalty looks back on (default 64; -1: all)\n"
    "      --seed=N          random seed (default: from the clock, printed at the end)\n"
    "      --stop=STRING     stop when STRING appears; it is not printed (repeatable)\n"
    "      --no-bos          do not begin prompts with the tokenizer's BOS token\n"
    "      --ignore-eos      go on past the end-of-sequence token (for benchmarks)\n"
    "      --mtp             speculative decoding with the model's MTP module (CPU and\n"
    "                        GPU): it drafts the next token, the main model checks it in the\n"
    "                        same forward; the output is the same as without --mtp;\n"
    "                        acceptance rate in the statistics\n"
    "      --chat            chat: lines of standard input are user turns\n"
    "      --system=TEXT     with --chat: the system prompt\n"
    "      --batch           JSONL requests on standard input (or -f), JSONL results out\n"
    "      --parallel=N      with --batch: sequences decoded together (default 8)\n"
    "      --score           score token sequences\n"
    "  -i, --input=MODE      --score with -t: auto (default), text, lines, jsonl\n"
    "      --field=NAME      --score with -t and jsonl: the string field (default text)\n"
    "      --bos             --score with -t: begin every document with BOS\n"
    "  -L, --window=N        --score: at most N tokens at a time (default: the config's\n"
    "                        max_position_embeddings)\n"
    "  -o, --output=FILE     --score: write the JSONL there (atomically)\n"
    "      --threads=N       CPU threads (default: all; results do not depend on it)\n"
    "      --device=cpu|cuda where to run: generation defaults to cuda (bf16 on GPU 0)\n"
    "                        when a GPU is present and this build has CUDA, else cpu;\n"
    "                        --score defaults to cpu\n"
    "      --quiet           no statistics on standard error\n"
    "      --progress        show progress even when standard error is not a terminal\n"
    "      --help            this help\n"
    "      --version         the version\n"
    "\n"
    "Exit status: 0 ok, 1 a failure (unreadable model or input, bad request line, prompt\n"
    "longer than the context), 2 usage error.\n",
};

enum {
    OPT_SCORE = 0x100, OPT_BOS, OPT_THREADS, OPT_FIELD, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_MINP,
    OPT_RPEN, OPT_RLAST, OPT_SEED, OPT_STOP, OPT_NOBOS, OPT_CHAT, OPT_SYSTEM, OPT_BATCH,
    OPT_PARALLEL, OPT_IGNORE_EOS, OPT_DEVICE, OPT_MTP,
};

typedef struct options {
    cli_common common;
    int score, bos, chat, batch, no_bos, have_seed, ignore_eos;
    int device;  /* -1: not given, 0: cpu, 1: cuda */
    const char *model, *tok, *output, *field, *prompt, *file, *system;
    docin_mode mode;
    uint64_t window, threads, ctx, parallel;
    sample_defaults d;
    char **stops;
    int n_stops;
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

static void add_stop(options *o, const char *s)
{
    char **v = realloc(o->stops, (size_t)(o->n_stops + 2) * sizeof *v);
    if (!v)
        cli_failf(&PROG, "out of memory");
    v[o->n_stops++] = (char *)s;
    v[o->n_stops] = NULL;
    o->stops = v;
}

static double dbl(const char *opt, double lo, double hi)
{
    double v;
    dsv3_err e;
    if (cli_parse_double(opt, optarg, lo, hi, &v, &e))
        cli_usage(&PROG, "%s", e.msg);
    return v;
}

/* A signed integer option in [lo, hi] (-1 allowed where lo is -1). */
static long integer(const char *opt, long lo, long hi)
{
    char *end;
    long v = strtol(optarg, &end, 10);
    if (!*optarg || *end || v < lo || v > hi)
        cli_usage(&PROG, "%s: '%s' is not an integer in [%ld, %ld]", opt, optarg, lo, hi);
    return v;
}

static void parse(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"score", no_argument, NULL, OPT_SCORE},
        {"model", required_argument, NULL, 'm'},
        {"tokenizer", required_argument, NULL, 't'},
        {"prompt", required_argument, NULL, 'p'},
        {"file", required_argument, NULL, 'f'},
        {"n-predict", required_argument, NULL, 'n'},
        {"ctx", required_argument, NULL, 'c'},
        {"temp", required_argument, NULL, OPT_TEMP},
        {"top-k", required_argument, NULL, OPT_TOPK},
        {"top-p", required_argument, NULL, OPT_TOPP},
        {"min-p", required_argument, NULL, OPT_MINP},
        {"repeat-penalty", required_argument, NULL, OPT_RPEN},
        {"repeat-last-n", required_argument, NULL, OPT_RLAST},
        {"seed", required_argument, NULL, OPT_SEED},
        {"stop", required_argument, NULL, OPT_STOP},
        {"no-bos", no_argument, NULL, OPT_NOBOS},
        {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
        {"chat", no_argument, NULL, OPT_CHAT},
        {"system", required_argument, NULL, OPT_SYSTEM},
        {"batch", no_argument, NULL, OPT_BATCH},
        {"parallel", required_argument, NULL, OPT_PARALLEL},
        {"input", required_argument, NULL, 'i'},
        {"field", required_argument, NULL, OPT_FIELD},
        {"bos", no_argument, NULL, OPT_BOS},
        {"window", required_argument, NULL, 'L'},
        {"output", required_argument, NULL, 'o'},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"mtp", no_argument, NULL, OPT_MTP},
        CLI_COMMON_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    memset(o, 0, sizeof *o);
    o->device = -1;
    o->field = "text";
    o->mode = DOCIN_AUTO;
    o->parallel = 8;
    sampler_params_default(&o->d.sp);
    o->d.n_predict = -1;
    int c;
    dsv3_err e;
    while ((c = getopt_long(argc, argv, "m:t:p:f:n:c:L:o:i:", longopts, NULL)) != -1) {
        if (cli_common_option(&PROG, c, &o->common))
            continue;
        switch (c) {
        case OPT_SCORE: o->score = 1; break;
        case 'm': o->model = optarg; break;
        case 't': o->tok = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'f': o->file = optarg; break;
        case 'n': o->d.n_predict = (int)integer("-n", -1, 1 << 30); break;
        case 'c':
            if (cli_parse_u64("--ctx", optarg, 1, 1 << 24, &o->ctx, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case OPT_TEMP: o->d.sp.temp = dbl("--temp", -1e9, 1e9); break;
        case OPT_TOPK: o->d.sp.top_k = (int)integer("--top-k", -1, 1 << 30); break;
        case OPT_TOPP: o->d.sp.top_p = dbl("--top-p", 0, 1); break;
        case OPT_MINP: o->d.sp.min_p = dbl("--min-p", 0, 1); break;
        case OPT_RPEN: o->d.sp.repeat_penalty = dbl("--repeat-penalty", 0, 1e9); break;
        case OPT_RLAST: o->d.sp.repeat_last_n = (int)integer("--repeat-last-n", -1, 1 << 30); break;
        case OPT_SEED: {
            uint64_t v;
            if (cli_parse_u64("--seed", optarg, 0, UINT64_MAX, &v, &e))
                cli_usage(&PROG, "%s", e.msg);
            o->d.sp.seed = v;
            o->have_seed = 1;
            break;
        }
        case OPT_STOP:
            if (!*optarg)
                cli_usage(&PROG, "--stop: an empty string");
            add_stop(o, optarg);
            break;
        case OPT_NOBOS: o->no_bos = 1; break;
        case OPT_IGNORE_EOS: o->ignore_eos = 1; break;
        case OPT_CHAT: o->chat = 1; break;
        case OPT_SYSTEM: o->system = optarg; break;
        case OPT_BATCH: o->batch = 1; break;
        case OPT_PARALLEL:
            if (cli_parse_u64("--parallel", optarg, 1, 4096, &o->parallel, &e))
                cli_usage(&PROG, "%s", e.msg);
            break;
        case 'i':
            if (docin_mode_parse(optarg, &o->mode))
                cli_usage(&PROG, "--input: '%s' is not auto, text, lines or jsonl", optarg);
            break;
        case OPT_FIELD: o->field = optarg; break;
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
            o->device = !strcmp(optarg, "cuda");
            break;
        case OPT_MTP: o->d.mtp = 1; break;
        default: cli_usage(&PROG, "unexpected option");
        }
    }
    if (o->score + o->chat + o->batch > 1)
        cli_usage(&PROG, "--score, --chat and --batch are different modes: choose one");
    if (!o->model)
        cli_usage(&PROG, "%s needs a model (-m DIR)", o->score ? "--score" : "generation");
    if (o->d.mtp && o->score)
        cli_usage(&PROG, "--mtp is for generation, not --score");
    if (o->score) {
        if (!o->tok && (o->bos || o->mode != DOCIN_AUTO))
            cli_usage(&PROG, "--bos and --input need a tokenizer (-t)");
        return;
    }
    if (!o->tok)
        cli_usage(&PROG, "generation needs a tokenizer (-t FILE)");
    if (optind < argc)
        cli_usage(&PROG, "unexpected argument '%s' (the prompt goes with -p)", argv[optind]);
    if (o->prompt && (o->file || o->chat || o->batch))
        cli_usage(&PROG, "-p goes with neither -f, --chat nor --batch");
    if (o->system && !o->chat)
        cli_usage(&PROG, "--system needs --chat");
    if (!o->have_seed)
        o->d.sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    o->d.stops = o->stops;
    o->d.n_stops = o->n_stops;
    o->d.bos = !o->no_bos;
    const char *ahead = getenv("DSV3_SAMPLE_AHEAD");  /* 0: decode steps wait (to compare) */
    o->d.no_ahead = ahead && !strcmp(ahead, "0");
    const char *full = getenv("DSV3_SAMPLE_FULL");  /* 1: sampled steps copy every logit */
    o->d.full_logits = full && !strcmp(full, "1");
}

/* The whole of a file (or standard input) as the prompt. */
static char *read_all(const char *path, size_t *n, dsv3_err *e)
{
    FILE *f = path ? fopen(path, "rb") : stdin;
    if (!f) {
        err_errno(e, "%s", path);
        return NULL;
    }
    bpe_bytes b = {0};
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
        bpe_bytes_append(&b, chunk, got);
    int bad = ferror(f);
    if (path)
        fclose(f);
    if (bad) {
        err_errno(e, "%s", path ? path : "standard input");
        bpe_bytes_free(&b);
        return NULL;
    }
    bpe_bytes_append(&b, "", 1);
    *n = b.n - 1;
    return (char *)b.v;
}

static void stats(const options *o, const sample_stats *st, const infer *f)
{
    if (o->common.quiet)
        return;
    fprintf(stderr, "\ndsv3-sample: prompt %llu tokens in %.3f s (%.1f tokens/s), generated %llu "
            "tokens, decode %.3f s (%.2f tokens/s), cache %.1f MiB (%d slots x %d tokens, "
            "%.1f KiB a token), device %s, seed %llu\n", (unsigned long long)st->prompt_tokens,
            st->prefill_s, st->prefill_s > 0 ? st->prompt_tokens / st->prefill_s : 0.0,
            (unsigned long long)st->gen_tokens, st->decode_s,
            st->decode_s > 0 ? st->decode_tokens / st->decode_s : 0.0,
            infer_cache_bytes(f) / 1048576.0, infer_n_slots(f), infer_n_ctx(f),
            infer_cache_bytes_per_token(f) / 1024.0, infer_device(f),
            (unsigned long long)o->d.sp.seed);
    if (o->d.mtp)
        fprintf(stderr, "dsv3-sample: mtp: %llu drafts checked, %llu accepted (acceptance rate "
                "%.1f%%), %.3f tokens a main forward\n", (unsigned long long)st->drafts,
                (unsigned long long)st->accepted,
                st->drafts ? 100.0 * st->accepted / st->drafts : 0.0,
                st->main_steps ? (double)st->decode_tokens / st->main_steps : 0.0);
    if (infer_graph_replays(f))
        fprintf(stderr, "dsv3-sample: %ld decode steps from CUDA graphs, %.3f s of device time "
                "(%.1f us a step)\n", infer_graph_replays(f), infer_graph_seconds(f),
                1e6 * infer_graph_seconds(f) / infer_graph_replays(f));
}

/* m: the model on the CPU; NULL: the GPU engine reads the folder itself (memory-mapped). */
static int generate(const options *o, const dsv3_config *cfg, dsv3_model *m, dsv3_err *e)
{
    bpe *b;
    if (bpe_load(&b, o->tok, e))
        return -1;
    int ctx = o->ctx ? (int)o->ctx : cfg->max_position_embeddings;
    if (!o->ctx && (ctx > 4096 || ctx < 1))
        ctx = 4096;
    int32_t eos = bpe_eos(b) != BPE_NONE ? (int32_t)bpe_eos(b) : cfg->eos_token_id;
    if (o->ignore_eos)
        eos = -1;
    infer *f = NULL;
    sample_stats st = {0};
    int slots = o->batch ? (int)o->parallel : 1;
    int rc;
    if (m)
        rc = infer_new(&f, m, ctx, slots, e);
    else if (o->d.mtp)  /* the GPU engine loads the MTP module for --mtp only */
        rc = infer_new_gpu_mtp(&f, NULL, o->model, ctx, slots, 0, 0, e) ? err_prefix(e, "--mtp")
                                                                         : 0;
    else
        rc = infer_new_gpu_dir(&f, o->model, ctx, slots, 0, e);
    if (!rc && o->d.mtp && infer_use_mtp(f, e))
        rc = err_prefix(e, "--mtp");
    if (!rc && o->batch) {
        FILE *in = o->file ? fopen(o->file, "r") : stdin;
        if (!in)
            rc = err_errno(e, "%s", o->file);
        else
            rc = sample_batch(f, b, in, o->file ? o->file : "standard input", &o->d, eos,
                              stdout, &st, e);
        if (in && o->file)
            fclose(in);
    } else if (!rc && o->chat) {
        rc = sample_chat(f, b, stdin, stdout, isatty(0) ? stderr : NULL, o->system, &o->d, eos,
                         &st, e);
    } else if (!rc) {
        size_t n = o->prompt ? strlen(o->prompt) : 0;
        char *text = o->prompt ? NULL : read_all(o->file, &n, e);
        bpe_ids ids = {0};
        if (!o->prompt && !text)
            rc = -1;
        if (!rc)
            rc = sample_encode_prompt(b, o->prompt ? o->prompt : text, n, o->d.bos, &ids, e);
        sample_request r = {.ids = (int32_t *)ids.v, .n_ids = (int)ids.n, .sp = o->d.sp,
                            .n_predict = o->d.n_predict, .stops = o->d.stops,
                            .n_stops = o->d.n_stops};
        sample_run_opts ro = {.eos = eos, .stream = stdout, .mtp = o->d.mtp,
                              .no_ahead = o->d.no_ahead, .full_logits = o->d.full_logits};
        if (!rc && !ids.n)
            rc = err_set(e, "an empty prompt");
        if (!rc)
            rc = sample_run(f, b, &r, 1, &ro, &st, e);
        sample_request_free(&r);
        bpe_ids_free(&ids);
        free(text);
    }
    if (!rc)
        stats(o, &st, f);
    infer_free(f);
    bpe_free(b);
    return rc;
}

int main(int argc, char **argv)
{
    options o;
    parse(argc, argv, &o);
    if (o.device < 0)
        o.device = !o.score && gpu_count() > 0;
    if (o.device == 1 && gpu_count() <= 0)
        cli_failf(&PROG, "--device cuda: no GPU found%s; use --device cpu",
                  gpu_compiled() ? "" : " (this dsv3 was built without CUDA)");
    if (o.threads)
        ops_set_threads((int)o.threads);
    dsv3_err e;
    if (!o.score && o.device == 1) {
        dsv3_config cfg;
        char path[4096];
        snprintf(path, sizeof path, "%s/config.json", o.model);
        if (config_load(&cfg, path, &e))
            cli_fail(&PROG, &e);
        int rc = generate(&o, &cfg, NULL, &e);
        config_free(&cfg);
        free(o.stops);
        if (rc)
            cli_fail(&PROG, &e);
        return 0;
    }
    dsv3_model m;
    /* Scoring and generation need only the main model: the MTP modules are loaded for --mtp
     * only. */
    if (model_load_flags(&m, o.model, o.d.mtp ? 0 : MODEL_LOAD_NO_MTP, &e))
        cli_fail(&PROG, &e);
    if (!o.score) {
        int rc = generate(&o, &m.cfg, &m, &e);
        model_free(&m);
        free(o.stops);
        if (rc)
            cli_fail(&PROG, &e);
        return 0;
    }
    run r = {0};
    if (sample_scorer_new(&r.sc, &m, (int)o.window, &e))
        cli_fail(&PROG, &e);
    if (o.device == 1 && sample_scorer_use_gpu(r.sc, 0, &e))
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
