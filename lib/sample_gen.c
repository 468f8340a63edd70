/* sample_gen: the generation loop of lib/sample (see sample.h): stop strings and UTF-8 in
 * the text stream, sequences in cache slots, prefill, batched decode, continuous batching,
 * speculative decoding with the MTP module's drafts. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sample.h"

const char *sample_stop_name(sample_stop s)
{
    switch (s) {
    case SAMPLE_STOP_EOS: return "eos";
    case SAMPLE_STOP_STRING: return "stop";
    case SAMPLE_STOP_LENGTH: return "length";
    case SAMPLE_STOP_CTX: return "ctx";
    default: return "none";
    }
}

/* ---- text ---- */

void sample_text_init(sample_text *t, const bpe *b, char **stops, int n_stops)
{
    memset(t, 0, sizeof *t);
    t->b = b;
    t->stops = stops;
    t->n_stops = n_stops;
}

void sample_text_free(sample_text *t)
{
    bpe_bytes_free(&t->text);
}

/* Bytes at the end of s[0..n) that start a UTF-8 character not yet complete. */
static size_t utf8_cut(const uint8_t *s, size_t n)
{
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        uint8_t c = s[n - back];
        if ((c & 0xC0) == 0x80)
            continue;  /* a continuation byte: look further back */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return need > back && c >= 0xC0 && c < 0xF8 ? back : 0;
    }
    return 0;
}

int sample_text_push(sample_text *t, uint32_t id, const uint8_t **out, size_t *n, dsv3_err *e)
{
    *out = NULL;
    *n = 0;
    if (t->stopped)
        return 1;
    if (bpe_decode(t->b, &id, 1, 1, &t->text, e))
        return -1;
    /* A stop string can only end in the new bytes; one that began in released text would
     * have been held back, so searching from the released end finds every match. */
    size_t from = t->emitted, cut = SIZE_MAX;
    for (int i = 0; i < t->n_stops; i++) {
        size_t len = strlen(t->stops[i]);
        if (!len || t->text.n - from < len)
            continue;
        const uint8_t *hit = memmem(t->text.v + from, t->text.n - from, t->stops[i], len);
        if (hit && (size_t)(hit - t->text.v) < cut)
            cut = (size_t)(hit - t->text.v);
    }
    if (cut != SIZE_MAX) {
        t->text.n = cut;
        t->stopped = 1;
        *out = t->text.v + t->emitted;
        *n = cut - t->emitted;
        t->emitted = cut;
        return 1;
    }
    /* Hold back the longest tail that is a prefix of a stop string, then a cut character. */
    size_t hold = 0;
    for (int i = 0; i < t->n_stops; i++) {
        size_t len = strlen(t->stops[i]);
        for (size_t k = len - (len > 0); k > hold; k--)
            if (k <= t->text.n - t->emitted &&
                !memcmp(t->text.v + t->text.n - k, t->stops[i], k)) {
                hold = k;
                break;
            }
    }
    size_t end = t->text.n - hold;
    end -= utf8_cut(t->text.v + t->emitted, end - t->emitted);
    *out = t->text.v + t->emitted;
    *n = end - t->emitted;
    t->emitted = end;
    return 0;
}

void sample_text_flush(sample_text *t, const uint8_t **out, size_t *n)
{
    *out = t->text.v + t->emitted;
    *n = t->text.n - t->emitted;
    t->emitted = t->text.n;
}

void sample_request_free(sample_request *r)
{
    bpe_bytes_free(&r->text);
    free(r->gen);
    r->gen = NULL;
}

/* ---- sequences ---- */

/* A running request in a slot. */
typedef struct seq {
    int req;           /* index into the requests, -1 when the slot is free */
    sampler smp;
    sample_text txt;
    int32_t *hist;     /* prompt then generated ids, for the repeat penalty */
    int n_hist;
    int32_t next;      /* the token to feed at the next decode step */
} seq;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int emit(FILE *f, const uint8_t *s, size_t n, dsv3_err *e)
{
    if (!f || !n)
        return 0;
    if (fwrite(s, 1, n, f) != n || fflush(f))
        return err_errno(e, "writing the generated text");
    return 0;
}

/* Ids the tokenizer cannot decode (a vocabulary padded past the tokenizer's, holes): never
 * chosen. Listed once a run, as runs of ids [from, to), so a step does not ask the tokenizer
 * about every id of a large vocabulary. */
typedef struct banned {
    int32_t *from, *to;
    int n;
} banned;

static int banned_make(banned *bn, const bpe *b, int V, dsv3_err *e)
{
    memset(bn, 0, sizeof *bn);
    for (int v = 0; v < V;) {
        if ((uint32_t)v < bpe_vocab_size(b) && bpe_token_kind(b, (uint32_t)v) != BPE_UNUSED) {
            v++;
            continue;
        }
        int w = v + 1;
        while (w < V && ((uint32_t)w >= bpe_vocab_size(b) ||
                         bpe_token_kind(b, (uint32_t)w) == BPE_UNUSED))
            w++;
        int32_t *f2 = realloc(bn->from, (size_t)(bn->n + 1) * sizeof *f2);
        if (f2)
            bn->from = f2;
        int32_t *t2 = realloc(bn->to, (size_t)(bn->n + 1) * sizeof *t2);
        if (t2)
            bn->to = t2;
        if (!f2 || !t2)
            return err_set(e, "out of memory");
        bn->from[bn->n] = v;
        bn->to[bn->n++] = w;
        v = w;
    }
    return 0;
}

static void banned_free(banned *bn)
{
    free(bn->from);
    free(bn->to);
}

static void ban(const banned *bn, float *logits)
{
    for (int i = 0; i < bn->n; i++)
        for (int v = bn->from[i]; v < bn->to[i]; v++)
            logits[v] = -INFINITY;
}

/* The mask of the banned ids, for greedy steps on the device (infer_set_banned). */
static int ban_mask(infer *f, const banned *bn, dsv3_err *e)
{
    if (!bn->n)
        return infer_set_banned(f, NULL, e);
    uint8_t *m = calloc((size_t)infer_vocab(f), 1);
    if (!m)
        return err_set(e, "out of memory");
    for (int i = 0; i < bn->n; i++)
        memset(m + bn->from[i], 1, (size_t)(bn->to[i] - bn->from[i]));
    int rc = infer_set_banned(f, m, e);
    free(m);
    return rc;
}

static int accept(infer *f, int len, seq *q, sample_request *r, int32_t tok,
                  const sample_run_opts *o, dsv3_err *e);

/* Takes the sequence's next token from its logits (those of cached position len - 1);
 * finishes the request when it ends. */
static int take(infer *f, int len, seq *q, sample_request *r, float *logits,
                const sample_run_opts *o, const banned *bn, dsv3_err *e)
{
    ban(bn, logits);
    return accept(f, len, q, r, sampler_sample(&q->smp, logits, q->hist, q->n_hist), o, e);
}

/* The sequence's next token is tok (chosen at cached position len - 1). */
static int accept(infer *f, int len, seq *q, sample_request *r, int32_t tok,
                  const sample_run_opts *o, dsv3_err *e)
{
    if (tok == o->eos) {
        r->why = SAMPLE_STOP_EOS;
        return 0;
    }
    q->hist[q->n_hist++] = tok;
    r->gen[r->n_gen++] = tok;
    const uint8_t *out;
    size_t n;
    int stop = sample_text_push(&q->txt, (uint32_t)tok, &out, &n, e);
    if (stop < 0)
        return -1;
    if (emit(o->stream, out, n, e))
        return -1;
    if (stop)
        r->why = SAMPLE_STOP_STRING;
    else if (r->n_predict >= 0 && r->n_gen >= r->n_predict)
        r->why = SAMPLE_STOP_LENGTH;
    else if (len >= infer_n_ctx(f))
        r->why = SAMPLE_STOP_CTX;
    q->next = tok;
    return 0;
}

/* Puts request i into slot s: the sequence's state, then its prompt in one pass (prefill)
 * and its first token. */
static int start(infer *f, const bpe *b, int s, seq *q, sample_request *reqs, int i,
                 float *logits, const sample_run_opts *o, const banned *bn, sample_stats *st,
                 dsv3_err *e)
{
    sample_request *r = &reqs[i];
    if (!o->keep_slot)
        infer_slot_clear(f, s);
    int have = infer_slot_len(f, s), ctx = infer_n_ctx(f);
    if (r->n_ids < 1)
        return err_set(e, "request %d: an empty prompt", i);
    if (have + r->n_ids >= ctx)
        return err_set(e, "request %d: the prompt has %d tokens%s, more than the context of "
                       "%d tokens leaves room for (--ctx)", i, r->n_ids,
                       have ? " after the conversation so far" : "", ctx);
    int cap = r->n_ids + (r->n_predict >= 0 && r->n_predict < ctx ? r->n_predict : ctx) + 1;
    r->n_gen = 0;
    r->why = SAMPLE_STOP_NONE;
    memset(&r->text, 0, sizeof r->text);
    q->hist = malloc((size_t)cap * sizeof *q->hist);
    r->gen = malloc((size_t)cap * sizeof *r->gen);
    if (!q->hist || !r->gen) {
        free(q->hist);
        return err_set(e, "out of memory");
    }
    if (sampler_init(&q->smp, &r->sp, infer_vocab(f), e)) {
        free(q->hist);
        return -1;
    }
    q->req = i;
    memcpy(q->hist, r->ids, (size_t)r->n_ids * sizeof *q->hist);
    q->n_hist = r->n_ids;
    sample_text_init(&q->txt, b, r->stops, r->n_stops);
    double t0 = now();
    int rc = infer_prefill(f, s, r->ids, r->n_ids, logits, e);
    st->prefill_s += now() - t0;
    st->prompt_tokens += (uint64_t)r->n_ids;
    return rc ? rc : take(f, infer_slot_len(f, s), q, r, logits, o, bn, e);
}

/* Hands a finished request its text and frees the slot. */
static void finish(seq *q, sample_request *r)
{
    const uint8_t *out;
    size_t n;
    if (!q->txt.stopped)
        sample_text_flush(&q->txt, &out, &n);
    r->text = q->txt.text;
    memset(&q->txt.text, 0, sizeof q->txt.text);
    sampler_free(&q->smp);
    free(q->hist);
    q->hist = NULL;
    q->req = -1;
}

/* Drafts for the running sequences that can take two rows this step (room in the context
 * and in -n): draft[s] the MTP module's token (its most likely one, the banned ids left
 * out: infer_set_banned), -1 for the others. */
static int drafts(infer *f, seq *q, const sample_request *reqs, int S, int32_t *draft,
                  int *dslot, int32_t *dnext, int32_t *dtok, dsv3_err *e)
{
    int D = 0;
    for (int s = 0; s < S; s++) {
        draft[s] = -1;
        if (q[s].req < 0)
            continue;
        const sample_request *r = &reqs[q[s].req];
        if (infer_slot_len(f, s) + 2 > infer_n_ctx(f) ||
            (r->n_predict >= 0 && r->n_predict - r->n_gen < 2))
            continue;
        dslot[D] = s;
        dnext[D++] = q[s].next;
    }
    if (!D)
        return 0;
    if (infer_mtp_draft_greedy(f, D, dslot, dnext, dtok, e))
        return -1;
    for (int i = 0; i < D; i++)
        draft[dslot[i]] = dtok[i];
    return 0;
}

/* Takes a sequence's tokens from a decode step: row k (and k + 1 with a draft), sampled from
 * the rows' logits, or (logits NULL: a greedy step) the rows' greedy ids tok. */
static int verify(infer *f, int s, seq *z, sample_request *r, float *logits, const int32_t *tok,
                  int V, int32_t draft, const sample_run_opts *o, const banned *bn,
                  sample_stats *st, dsv3_err *e)
{
    int len = infer_slot_len(f, s) - (draft >= 0);  /* as without the draft row */
    st->main_steps++;
    st->decode_tokens++;
    if (logits ? take(f, len, z, r, logits, o, bn, e) : accept(f, len, z, r, tok[0], o, e))
        return -1;
    if (draft < 0)
        return 0;
    if (!r->why) {
        st->drafts++;
        if (z->next == draft) {
            st->accepted++;
            st->decode_tokens++;
            return logits ? take(f, len + 1, z, r, logits + V, o, bn, e)
                          : accept(f, len + 1, z, r, tok[1], o, e);
        }
    }
    return infer_slot_truncate(f, s, len, e);
}

/* A decode step's rows: one a running sequence (its next token), and one more for its draft
 * where draft (or NULL) has one. Returns how many. */
static int step_rows(const seq *q, int S, const int32_t *draft, int *slot, int32_t *ids)
{
    int R = 0;
    for (int s = 0; s < S; s++)
        if (q[s].req >= 0) {
            slot[R] = s;
            ids[R++] = q[s].next;
            if (draft && draft[s] >= 0) {
                slot[R] = s;
                ids[R++] = draft[s];
            }
        }
    return R;
}

/* Whether the rows' next greedy step can be queued before this one's tokens are known:
 * no sequence ends with this step for certain (its -n or the context), and each has room
 * for one more position. */
static int may_continue(const infer *f, const seq *q, const sample_request *reqs,
                        const int *slot, int R)
{
    for (int k = 0; k < R; k++) {
        const sample_request *r = &reqs[q[slot[k]].req];
        if (infer_slot_len(f, slot[k]) >= infer_n_ctx(f) ||
            (r->n_predict >= 0 && r->n_gen + 1 >= r->n_predict))
            return 0;
    }
    return 1;
}

/* Decode steps of the R rows (slot, first ids), each next one queued before the host takes
 * the tokens of the one before (infer_draw_submit), until a sequence ends: then its slot is
 * cut back to the length it has without the step queued after its end, and the rows of that
 * step that go on are taken as well. draw: each row's draw (sampler_draw_of), or NULL when
 * every row is greedy. */
static int run_ahead(infer *f, seq *q, sample_request *reqs, const int *slot, const int32_t *ids,
                     const sampler_draw *draw, int R, int32_t *tok, const sample_run_opts *o,
                     sample_stats *st, dsv3_err *e)
{
    double t0 = now();
    if (infer_draw_submit(f, R, slot, ids, draw, e))
        return -1;
    int queued = 1, ended = 0;
    while (queued) {
        if (!ended && may_continue(f, q, reqs, slot, R)) {
            if (infer_draw_submit(f, R, slot, NULL, NULL, e))
                return -1;
            queued++;
        }
        if (infer_greedy_collect(f, tok, e))
            return -1;
        queued--;
        for (int k = 0; k < R; k++) {
            seq *z = &q[slot[k]];
            if (z->req < 0)  /* ended at the step before */
                continue;
            sample_request *r = &reqs[z->req];
            int len = infer_slot_len(f, slot[k]) - queued;
            st->main_steps++;
            st->decode_tokens++;
            if (draw)  /* the device drew with the sampler's state: it moves on here too */
                sampler_draw_taken(&z->smp);
            if (accept(f, len, z, r, tok[k], o, e) ||
                (r->why && queued && infer_slot_truncate(f, slot[k], len, e)))
                return -1;
            if (r->why) {
                finish(z, r);
                ended = 1;
            }
        }
        double t1 = now();
        st->decode_s += t1 - t0;
        t0 = t1;
    }
    return 0;
}

/* Each row's draw as a sampler_draw (sampler_draw_of), when every one can be made so. */
static int step_draws(const infer *f, const seq *q, const int *slot, int R, sampler_draw *draw)
{
    for (int k = 0; k < R; k++)
        if (!sampler_draw_of(&q[slot[k]].smp, infer_top_max(f), &draw[k]))
            return 0;
    return 1;
}

/* How many of each row's largest logits the step's draws need (sampler_top_need; a slot's
 * history is its tokens so far and the one fed now), or 0 where one of them may need any. */
static int top_need(const infer *f, const seq *q, int S)
{
    int K = 0;
    for (int s = 0; s < S; s++) {
        if (q[s].req < 0)
            continue;
        int k = sampler_top_need(&q[s].smp, q[s].n_hist);
        if (!k || k > infer_top_max(f))
            return 0;
        K = k > K ? k : K;
    }
    return K;
}

/* One sampled step of the R rows (slot, ids) from each row's K largest logits only
 * (infer_forward_top: on the GPU only those leave the device), drawn as from the whole row. */
static int step_top(infer *f, seq *q, sample_request *reqs, const int *slot, const int32_t *ids,
                    int R, int K, int32_t *top_id, float *top_logit, sampler_cand *cand,
                    const sample_run_opts *o, sample_stats *st, dsv3_err *e)
{
    double t0 = now();
    if (infer_forward_top(f, R, slot, ids, K, top_id, top_logit, e))
        return -1;
    st->decode_s += now() - t0;
    for (int k = 0; k < R; k++) {
        seq *z = &q[slot[k]];
        sample_request *r = &reqs[z->req];
        for (int i = 0; i < K; i++)
            cand[i] = (sampler_cand){top_id[(size_t)k * K + i], top_logit[(size_t)k * K + i], 0};
        st->main_steps++;
        st->decode_tokens++;
        int32_t tok = sampler_sample_top(&z->smp, cand, K, z->hist, z->n_hist);
        if (accept(f, infer_slot_len(f, slot[k]), z, r, tok, o, e))
            return -1;
        if (r->why)
            finish(z, r);
    }
    return 0;
}

int sample_run(infer *f, const bpe *b, sample_request *reqs, int n, const sample_run_opts *o,
               sample_stats *st, dsv3_err *e)
{
    int S = infer_n_slots(f), V = infer_vocab(f), next_req = 0, next_done = 0;
    seq *q = calloc((size_t)S, sizeof *q);
    int *slot = malloc((size_t)2 * S * sizeof *slot), *dslot = malloc((size_t)S * sizeof *dslot);
    int32_t *ids = malloc((size_t)2 * S * sizeof *ids), *draft = malloc((size_t)S * sizeof *draft);
    int32_t *dnext = malloc((size_t)S * sizeof *dnext);
    int32_t *next = malloc((size_t)2 * S * sizeof *next);  /* a greedy step's choices */
    float *logits = malloc((size_t)2 * S * V * sizeof *logits);
    int32_t *top_id = malloc((size_t)S * INFER_TOP_MAX * sizeof *top_id);
    float *top_logit = malloc((size_t)S * INFER_TOP_MAX * sizeof *top_logit);
    sampler_cand *cand = malloc(INFER_TOP_MAX * sizeof *cand);
    sampler_draw *draws = malloc((size_t)S * sizeof *draws);
    banned bn;
    int rc = banned_make(&bn, b, V, e) || ban_mask(f, &bn, e);
    if (!rc && (!q || !slot || !ids || !logits || !dslot || !draft || !dnext || !next ||
                !top_id || !top_logit || !cand || !draws))
        rc = err_set(e, "out of memory");
    if (!rc && o->mtp && !infer_mtp_on(f))
        rc = err_set(e, "speculative decoding needs the MTP stream on (infer_use_mtp)");
    for (int s = 0; s < S && q; s++)
        q[s].req = -1;
    while (!rc) {
        /* Fill free slots with waiting requests at once (continuous batching). */
        for (int s = 0; s < S && !rc; s++)
            while (q[s].req < 0 && next_req < n && !rc) {
                int i = next_req++;
                rc = start(f, b, s, &q[s], reqs, i, logits, o, &bn, st, e);
                if (q[s].req >= 0 && reqs[i].why)
                    finish(&q[s], &reqs[i]);
            }
        /* Release finished requests in input order. */
        while (!rc && next_done < next_req && reqs[next_done].why) {
            if (o->done)
                rc = o->done(o->ctx, next_done, &reqs[next_done], e);
            next_done++;
        }
        int R = 0, any = 0;
        for (int s = 0; s < S && !rc; s++)
            any |= q[s].req >= 0;
        if (rc || (!any && next_req >= n))
            break;
        double t0 = now();
        int greedy = 1;  /* every row greedy: only the chosen ids come back */
        for (int s = 0; s < S && greedy; s++)
            greedy = q[s].req < 0 || sampler_is_greedy(&q[s].smp);
        if (!o->mtp && !o->no_ahead && (greedy || !o->full_logits)) {
            R = step_rows(q, S, NULL, slot, ids);
            if (greedy || step_draws(f, q, slot, R, draws)) {
                rc = run_ahead(f, q, reqs, slot, ids, greedy ? NULL : draws, R, next, o, st, e);
                continue;
            }
        }
        int K = greedy || o->mtp || o->full_logits ? 0 : top_need(f, q, S);
        if (K) {
            R = step_rows(q, S, NULL, slot, ids);
            rc = step_top(f, q, reqs, slot, ids, R, K, top_id, top_logit, cand, o, st, e);
            continue;
        }
        if (o->mtp)
            rc = drafts(f, q, reqs, S, draft, dslot, dnext, next, e);
        else
            for (int s = 0; s < S; s++)
                draft[s] = -1;
        if (!rc)
            R = step_rows(q, S, draft, slot, ids);
        if (!rc && greedy)
            rc = infer_forward_greedy(f, R, slot, ids, next, e);
        else if (!rc)
            rc = infer_forward(f, R, slot, ids, NULL, logits, e);
        st->decode_s += now() - t0;
        for (int k = 0; k < R && !rc; k++) {
            int s = slot[k];
            seq *z = &q[s];
            sample_request *r = &reqs[z->req];
            rc = verify(f, s, z, r, greedy ? NULL : logits + (size_t)k * V, next + k, V,
                        draft[s], o, &bn, st, e);
            k += draft[s] >= 0;
            if (!rc && r->why)
                finish(z, r);
        }
    }
    for (int i = 0; i < next_req; i++)
        st->gen_tokens += (uint64_t)reqs[i].n_gen;
    for (int s = 0; s < S && q; s++)
        if (q[s].req >= 0)
            finish(&q[s], &reqs[q[s].req]);
    free(q);
    free(slot);
    free(dslot);
    free(ids);
    free(draft);
    free(dnext);
    free(next);
    free(logits);
    free(top_id);
    free(top_logit);
    free(cand);
    free(draws);
    banned_free(&bn);
    return rc;
}
