/* sample_io: the ends of lib/sample's generation (see sample.h): prompts to ids, JSONL
 * batches in and out, and DeepSeek-V3's chat template over lines of input. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sample.h"

int sample_encode_prompt(const bpe *b, const char *text, size_t n, int bos, bpe_ids *out,
                         dsv3_err *e)
{
    bpe_encoder *enc;
    if (bpe_encoder_new(&enc, b, e))
        return -1;
    int rc = 0;
    if (bos && bpe_bos(b) != BPE_NONE)
        rc = bpe_ids_push(out, bpe_bos(b)) ? err_set(e, "out of memory") : 0;
    bpe_encode_opts eo = {.allow_special = 1};
    if (!rc)
        rc = bpe_encode(enc, (const uint8_t *)text, n, &eo, out, e);
    bpe_encoder_free(enc);
    return rc;
}

/* ---- batch ---- */

/* Text as a JSON string: invalid UTF-8 (a random model's byte tokens) becomes U+FFFD. */
static json_t *text_json(const uint8_t *s, size_t n)
{
    bpe_bytes o = {0};
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xC2 && c < 0xE0 ? 2 : c >= 0xE0 && c < 0xF0 ? 3
                   : c >= 0xF0 && c < 0xF5 ? 4 : 0;
        int ok = len && i + len <= n;
        for (size_t k = 1; ok && k < len; k++)
            ok = (s[i + k] & 0xC0) == 0x80;
        if (ok && len == 3)  /* no overlong forms, no surrogates */
            ok = !(c == 0xE0 && s[i + 1] < 0xA0) && !(c == 0xED && s[i + 1] >= 0xA0);
        if (ok && len == 4)
            ok = !(c == 0xF0 && s[i + 1] < 0x90) && !(c == 0xF4 && s[i + 1] >= 0x90);
        if (ok) {
            bpe_bytes_append(&o, s + i, len);
            i += len;
        } else {
            bpe_bytes_append(&o, "\xEF\xBF\xBD", 3);
            i++;
        }
    }
    json_t *j = json_stringn(o.n ? (const char *)o.v : "", o.n);
    bpe_bytes_free(&o);
    return j;
}

typedef struct batch_out {
    FILE *f;
} batch_out;

static int batch_done(void *ctx, int i, sample_request *r, dsv3_err *e)
{
    batch_out *bo = ctx;
    json_t *o = json_pack("{s:i, s:o, s:i, s:s}", "index", i, "text",
                          text_json(r->text.v, r->text.n), "tokens", r->n_gen, "stop_reason",
                          sample_stop_name(r->why));
    char *line = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    if (!line)
        return err_set(e, "out of memory");
    int bad = fputs(line, bo->f) < 0 || fputc('\n', bo->f) < 0 || fflush(bo->f);
    free(line);
    sample_request_free(r);
    return bad ? err_errno(e, "writing the results") : 0;
}

/* A number field of a request, checked against [lo, hi]; absent leaves *v. */
static int num_field(json_t *o, const char *key, double lo, double hi, int integer, double *v,
                     const char *name, long line, dsv3_err *e)
{
    json_t *x = json_object_get(o, key);
    if (!x)
        return 0;
    if (!json_is_number(x) || (integer && !json_is_integer(x)))
        return err_set(e, "%s, line %ld: \"%s\" must be %s", name, line, key,
                       integer ? "an integer" : "a number");
    double d = json_number_value(x);
    if (d < lo || d > hi)
        return err_set(e, "%s, line %ld: \"%s\" %g outside [%g, %g]", name, line, key, d, lo,
                       hi);
    *v = d;
    return 0;
}

/* Request fields beyond the prompt over r->sp's defaults; stop strings are copied into
 * *stops (owned). */
static int parse_request(json_t *o, sample_request *r, const sample_defaults *d,
                         const char *name, long line, char ***stops, dsv3_err *e)
{
    double np = d->n_predict, temp = d->sp.temp, tk = d->sp.top_k, tp = d->sp.top_p;
    double mp = d->sp.min_p, rp = d->sp.repeat_penalty;
    if (num_field(o, "n_predict", -1, 1 << 30, 1, &np, name, line, e) ||
        num_field(o, "temperature", -1e9, 1e9, 0, &temp, name, line, e) ||
        num_field(o, "top_k", -1, 1 << 30, 1, &tk, name, line, e) ||
        num_field(o, "top_p", 0, 1, 0, &tp, name, line, e) ||
        num_field(o, "min_p", 0, 1, 0, &mp, name, line, e) ||
        num_field(o, "repeat_penalty", 0, 1e9, 0, &rp, name, line, e))
        return -1;
    json_t *js = json_object_get(o, "seed");
    if (js) {
        if (!json_is_integer(js) || json_integer_value(js) < 0)
            return err_set(e, "%s, line %ld: \"seed\" must be a non-negative integer", name,
                           line);
        r->sp.seed = (uint64_t)json_integer_value(js);
    }
    r->sp.temp = temp;
    r->sp.top_k = (int)tk;
    r->sp.top_p = tp;
    r->sp.min_p = mp;
    r->sp.repeat_penalty = rp;
    r->n_predict = (int)np;
    r->stops = d->stops;
    r->n_stops = d->n_stops;
    json_t *st = json_object_get(o, "stop");
    if (!st)
        return 0;
    size_t n = json_is_array(st) ? json_array_size(st) : 1;
    if (!json_is_array(st) && !json_is_string(st))
        return err_set(e, "%s, line %ld: \"stop\" must be a string or an array of strings",
                       name, line);
    char **v = calloc(n + 1, sizeof *v);
    if (!v)
        return err_set(e, "out of memory");
    *stops = v;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_is_array(st) ? json_array_get(st, i) : st;
        if (!json_is_string(x))
            return err_set(e, "%s, line %ld: \"stop\" must be a string or an array of strings",
                           name, line);
        if (!(v[i] = strdup(json_string_value(x))))
            return err_set(e, "out of memory");
    }
    r->stops = v;
    r->n_stops = (int)n;
    return 0;
}

typedef struct batch_in {
    sample_request *r;
    char ***stops;  /* per request, owned (NULL: the defaults) */
    bpe_ids *ids;
    int n, cap;
} batch_in;

static void batch_in_free(batch_in *in)
{
    for (int i = 0; i < in->n; i++) {
        for (char **s = in->stops[i]; s && *s; s++)
            free(*s);
        free(in->stops[i]);
        bpe_ids_free(&in->ids[i]);
        sample_request_free(&in->r[i]);
    }
    free(in->r);
    free(in->stops);
    free(in->ids);
}

static int batch_add(batch_in *in, json_t *o, const bpe *b, const sample_defaults *d,
                     const char *name, long line, dsv3_err *e)
{
    if (in->n == in->cap) {
        int cap = in->cap ? 2 * in->cap : 16;
        sample_request *r = realloc(in->r, (size_t)cap * sizeof *r);
        if (r)
            in->r = r;
        char ***s = realloc(in->stops, (size_t)cap * sizeof *s);
        if (s)
            in->stops = s;
        bpe_ids *ids = realloc(in->ids, (size_t)cap * sizeof *ids);
        if (ids)
            in->ids = ids;
        if (!r || !s || !ids)
            return err_set(e, "out of memory");
        in->cap = cap;
    }
    int i = in->n++;
    sample_request *r = &in->r[i];
    memset(r, 0, sizeof *r);
    in->stops[i] = NULL;
    memset(&in->ids[i], 0, sizeof in->ids[i]);
    r->sp = d->sp;
    json_t *p = json_object_get(o, "prompt");
    if (!json_is_object(o) || !json_is_string(p))
        return err_set(e, "%s, line %ld: expected an object with a string \"prompt\"", name,
                       line);
    if (parse_request(o, r, d, name, line, &in->stops[i], e))
        return -1;
    if (sample_encode_prompt(b, json_string_value(p), json_string_length(p), d->bos,
                             &in->ids[i], e))
        return err_prefix(e, "%s, line %ld", name, line);
    if (!in->ids[i].n)
        return err_set(e, "%s, line %ld: an empty prompt", name, line);
    r->ids = (int32_t *)in->ids[i].v;
    r->n_ids = (int)in->ids[i].n;
    return 0;
}

int sample_batch(infer *f, const bpe *b, FILE *in, const char *name, const sample_defaults *d,
                 int32_t eos, FILE *out, sample_stats *st, dsv3_err *e)
{
    batch_in bi = {0};
    char *buf = NULL;
    size_t cap = 0;
    ssize_t got;
    long line = 0;
    int rc = 0;
    while (!rc && (got = getline(&buf, &cap, in)) >= 0) {
        line++;
        if (strspn(buf, " \t\r\n") == (size_t)got)
            continue;
        json_error_t je;
        json_t *o = json_loadb(buf, (size_t)got, 0, &je);
        if (!o)
            rc = err_set(e, "%s, line %ld: bad JSON: %s (column %d)", name, line, je.text,
                         je.column);
        else
            rc = batch_add(&bi, o, b, d, name, line, e);
        json_decref(o);
    }
    if (!rc && ferror(in))
        rc = err_errno(e, "%s", name);
    free(buf);
    batch_out bo = {out};
    sample_run_opts o = {.eos = eos, .done = batch_done, .ctx = &bo, .mtp = d->mtp,
                         .no_ahead = d->no_ahead, .full_logits = d->full_logits};
    if (!rc)
        rc = sample_run(f, b, bi.r, bi.n, &o, st, e);
    batch_in_free(&bi);
    return rc;
}

/* ---- chat ---- */

/* A template marker: the tokenizer's special token, else its text encoded plainly. */
static int marker(const bpe *b, bpe_encoder *enc, const char *s, bpe_ids *out, dsv3_err *e)
{
    uint32_t id = bpe_lookup_special(b, (const uint8_t *)s, strlen(s));
    if (id != BPE_NONE)
        return bpe_ids_push(out, id) ? err_set(e, "out of memory") : 0;
    bpe_encode_opts eo = {0};
    return bpe_encode(enc, (const uint8_t *)s, strlen(s), &eo, out, e);
}

#define CHAT_BOS "<｜begin▁of▁sentence｜>"
#define CHAT_EOS "<｜end▁of▁sentence｜>"
#define CHAT_USER "<｜User｜>"
#define CHAT_ASSISTANT "<｜Assistant｜>"

int sample_chat_turn(const bpe *b, int first, const char *system, const char *user,
                     bpe_ids *out, dsv3_err *e)
{
    bpe_encoder *enc;
    if (bpe_encoder_new(&enc, b, e))
        return -1;
    bpe_encode_opts eo = {0};  /* user and system text never become special tokens */
    uint32_t end = first ? bpe_bos(b) : bpe_eos(b);
    int rc = end != BPE_NONE ? (bpe_ids_push(out, end) ? err_set(e, "out of memory") : 0)
                             : marker(b, enc, first ? CHAT_BOS : CHAT_EOS, out, e);
    if (!rc && first && system)
        rc = bpe_encode(enc, (const uint8_t *)system, strlen(system), &eo, out, e);
    if (!rc)
        rc = marker(b, enc, CHAT_USER, out, e);
    if (!rc)
        rc = bpe_encode(enc, (const uint8_t *)user, strlen(user), &eo, out, e);
    if (!rc)
        rc = marker(b, enc, CHAT_ASSISTANT, out, e);
    bpe_encoder_free(enc);
    return rc;
}

int sample_chat(infer *f, const bpe *b, FILE *in, FILE *out, FILE *prompt_out,
                const char *system, const sample_defaults *d, int32_t eos, sample_stats *st,
                dsv3_err *e)
{
    char *buf = NULL;
    size_t cap = 0;
    ssize_t got;
    int rc = 0, first = 1;
    int32_t unfed = -1;  /* an answer's last token, sampled but not yet in the cache */
    infer_slot_clear(f, 0);
    sample_run_opts o = {.eos = eos, .stream = out, .keep_slot = 1, .mtp = d->mtp,
                         .no_ahead = d->no_ahead, .full_logits = d->full_logits};
    for (;;) {
        if (prompt_out) {
            fputs("> ", prompt_out);
            fflush(prompt_out);
        }
        if ((got = getline(&buf, &cap, in)) < 0)
            break;
        while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == '\r'))
            buf[--got] = 0;
        if (!got)
            continue;
        bpe_ids ids = {0};
        if (unfed >= 0)
            rc = bpe_ids_push(&ids, (uint32_t)unfed) ? err_set(e, "out of memory") : 0;
        if (!rc)
            rc = sample_chat_turn(b, first, system, buf, &ids, e);
        sample_request r = {.ids = (int32_t *)ids.v, .n_ids = (int)ids.n, .sp = d->sp,
                            .n_predict = d->n_predict, .stops = d->stops,
                            .n_stops = d->n_stops};
        if (!rc)
            rc = sample_run(f, b, &r, 1, &o, st, e);
        if (!rc && fputc('\n', out) == EOF)
            rc = err_errno(e, "writing the answer");
        fflush(out);
        unfed = r.why != SAMPLE_STOP_EOS && r.n_gen > 0 ? r.gen[r.n_gen - 1] : -1;
        sample_request_free(&r);
        bpe_ids_free(&ids);
        first = 0;
        if (rc)
            break;
    }
    if (!rc && ferror(in))
        rc = err_errno(e, "reading the chat input");
    free(buf);
    return rc;
}
