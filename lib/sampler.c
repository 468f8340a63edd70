#include "sampler.h"

#include "sampler_draw.h"

/* The softmax's exp over a sorted candidate list: sampler_exp, the one a GPU's draw uses
 * too (lib/sampler_draw.h), so that both draw the same ids. Out of line: with it inlined
 * the draw over a whole vocabulary measured 180 us a token, not 155 (bench_sampler, this
 * VM). Top-p over a whole unsorted vocabulary (top-k off), which no GPU draw runs, keeps
 * libm's exp: twice as fast over 129,280 ids. */
static __attribute__((noinline)) double soft_exp(double x)
{
    return sampler_exp(x);
}

#include <math.h>
#include <stdlib.h>
#include <string.h>

void sampler_params_default(sampler_params *p)
{
    p->temp = 0.8;
    p->top_k = 40;
    p->top_p = 0.95;
    p->min_p = 0.05;
    p->repeat_penalty = 1.0;
    p->repeat_last_n = 64;
    p->seed = 0;
}

static int cmp_cand(const void *a, const void *b)
{
    const sampler_cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

static void sort(sampler_cands *c)
{
    if (!c->sorted)
        qsort(c->v, (size_t)c->n, sizeof *c->v, cmp_cand);
    c->sorted = 1;
}

static float penalised_logit(float l, float penalty)
{
    return l <= 0 ? l * penalty : l / penalty;
}

/* The first of the window's tokens: all of them, or the last last_n. */
static int window_from(int n_hist, int last_n)
{
    return last_n < 0 || last_n >= n_hist ? 0 : n_hist - last_n;
}

/* llama.cpp's rule: each distinct token of the window, once, however often it occurs. */
void sampler_penalty(sampler_cands *c, const int32_t *hist, int n_hist, int last_n,
                     float penalty)
{
    if (penalty == 1.0f || last_n == 0 || n_hist <= 0)
        return;
    int from = window_from(n_hist, last_n);
    for (int i = 0; i < c->n; i++) {
        int seen = 0;
        for (int j = from; j < n_hist && !seen; j++)
            seen = hist[j] == c->v[i].id;
        if (seen)
            c->v[i].logit = penalised_logit(c->v[i].logit, penalty);
    }
    c->sorted = 0;
}

static int cmp_id(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* sampler_penalty on a whole vocabulary in id order (v[i].id == i): each distinct token of
 * the window found by its index, where the scan of every candidate against the window took
 * 4.3 ms a token for 129,280 ids and a window of 64. */
static void penalty_by_id(sampler_cands *c, const int32_t *hist, int n_hist, int last_n,
                          float penalty)
{
    if (penalty == 1.0f || last_n == 0 || n_hist <= 0)
        return;
    int from = window_from(n_hist, last_n), w = n_hist - from;
    int32_t small[256], *ids = w <= 256 ? small : malloc((size_t)w * sizeof *ids);
    if (!ids) {  /* no memory for the window's copy: the scan */
        sampler_penalty(c, hist, n_hist, last_n, penalty);
        return;
    }
    memcpy(ids, hist + from, (size_t)w * sizeof *ids);
    qsort(ids, (size_t)w, sizeof *ids, cmp_id);
    for (int j = 0; j < w; j++)
        if ((j == 0 || ids[j] != ids[j - 1]) && ids[j] >= 0 && ids[j] < c->n)
            c->v[ids[j]].logit = penalised_logit(c->v[ids[j]].logit, penalty);
    if (ids != small)
        free(ids);
    c->sorted = 0;
}

/* Sift-down in a heap of n whose root is the worst (the greatest by cmp_cand). */
static void sift(sampler_cand *h, int n, int i)
{
    for (;;) {
        int w = i, l = 2 * i + 1, r = l + 1;
        if (l < n && cmp_cand(&h[l], &h[w]) > 0)
            w = l;
        if (r < n && cmp_cand(&h[r], &h[w]) > 0)
            w = r;
        if (w == i)
            return;
        sampler_cand t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* Moves the k best of the unsorted c to its front, sorted, by a heap as sampler_top_k; the
 * others stay behind them (a permutation: a later round can look further). */
static void best_to_front(sampler_cands *c, int k)
{
    sampler_cand *v = c->v;
    int n = c->n;
    for (int i = k / 2 - 1; i >= 0; i--)
        sift(v, k, i);
    for (int i = k; i < n; i++)
        if (cmp_cand(&v[i], &v[0]) < 0) {
            sampler_cand t = v[0];
            v[0] = v[i];
            v[i] = t;
            sift(v, k, 0);
        }
    qsort(v, (size_t)k, sizeof *v, cmp_cand);
}

/* The k best by a heap (n log k, not a sort of the whole vocabulary), then sorted; those
 * dropped are overwritten (best_to_front keeps them, for top_p_unsorted's next round). */
void sampler_top_k(sampler_cands *c, int k)
{
    if (k <= 0 || k >= c->n)
        return;
    if (!c->sorted) {
        for (int i = k / 2 - 1; i >= 0; i--)
            sift(c->v, k, i);
        for (int i = k; i < c->n; i++)
            if (cmp_cand(&c->v[i], &c->v[0]) < 0) {
                c->v[0] = c->v[i];
                sift(c->v, k, 0);
            }
    }
    c->n = k;
    sort(c);
}

void sampler_softmax(sampler_cands *c)
{
    sort(c);
    if (!c->n)
        return;
    double mx = c->v[0].logit, sum = 0;
    for (int i = 0; i < c->n; i++)
        sum += soft_exp((double)c->v[i].logit - mx);
    for (int i = 0; i < c->n; i++)
        c->v[i].p = (float)(soft_exp((double)c->v[i].logit - mx) / sum);
}

/* Above this many unsorted candidates top-p and min-p sort only what they keep. */
enum { SORT_ALL_MAX = 1024 };

/* The largest logit of c. */
static float max_logit(const sampler_cands *c)
{
    float m = c->v[0].logit;
    for (int i = 1; i < c->n; i++)
        m = c->v[i].logit > m ? c->v[i].logit : m;
    return m;
}

/* top-p over many unsorted candidates (top-k off): the softmax's sum over every candidate in
 * the list's order, then only as much of the sorted order as the kept prefix needs: the best
 * 256, then 16 times more, or all sorted once the distribution looks flat. A peaked one
 * keeps few; sorting 129,280 candidates took 16 ms a token (tests/bench/bench_sampler). */
static void top_p_unsorted(sampler_cands *c, double p)
{
    double mx = max_logit(c), sum = 0;
    for (int i = 0; i < c->n; i++)
        sum += exp((double)c->v[i].logit - mx);
    for (int m = 256;;) {
        if (m >= c->n) {
            m = c->n;
            qsort(c->v, (size_t)m, sizeof *c->v, cmp_cand);
        } else {
            best_to_front(c, m);
        }
        double cum = 0;
        for (int i = 0; i < m; i++) {
            c->v[i].p = (float)(exp((double)c->v[i].logit - mx) / sum);
            cum += c->v[i].p;
            if (cum >= p || i == c->n - 1) {
                c->n = i + 1;
                c->sorted = 1;
                return;
            }
        }
        /* 16 times more, or all where the prefix (at least m p / cum long: the rest is no
         * denser) is a sixteenth of them or more, a flat distribution */
        m = cum * c->n < 16.0 * m * p ? c->n : 16 * m;
    }
}

void sampler_top_p(sampler_cands *c, double p)
{
    if (p >= 1.0 || c->n <= 1)
        return;
    if (!c->sorted && c->n > SORT_ALL_MAX) {
        top_p_unsorted(c, p);
        return;
    }
    sampler_softmax(c);
    double cum = 0;
    for (int i = 0; i < c->n; i++) {
        cum += c->v[i].p;
        if (cum >= p) {
            c->n = i + 1;
            return;
        }
    }
}

/* p_i >= min_p * p_max is logit_i >= logit_max + log(min_p). */
void sampler_min_p(sampler_cands *c, double p)
{
    if (p <= 0 || c->n <= 1)
        return;
    if (!c->sorted && c->n > SORT_ALL_MAX) {
        /* the kept ones by the cut from the largest, then sorted: the same list as sorting
         * every candidate first (the largest always kept, as there) */
        float cut = (float)(max_logit(c) + log(p));
        int k = 0, best = 0;
        for (int i = 1; i < c->n; i++)
            if (cmp_cand(&c->v[i], &c->v[best]) < 0)
                best = i;
        for (int i = 0; i < c->n; i++)
            if (i == best || c->v[i].logit >= cut)
                c->v[k++] = c->v[i];
        c->n = k;
        sort(c);
        return;
    }
    sort(c);
    float cut = (float)(c->v[0].logit + log(p));
    int k = 1;
    while (k < c->n && c->v[k].logit >= cut)
        k++;
    c->n = k;
}

void sampler_temp(sampler_cands *c, double t)
{
    for (int i = 0; i < c->n; i++)
        c->v[i].logit = (float)(c->v[i].logit / t);
}

int32_t sampler_pick(sampler_cands *c, double u)
{
    sampler_softmax(c);
    double cum = 0;
    for (int i = 0; i < c->n; i++) {
        cum += c->v[i].p;
        if (u < cum)
            return c->v[i].id;
    }
    return c->v[c->n - 1].id;  /* u past a sum rounded below 1 */
}

int sampler_init(sampler *s, const sampler_params *p, int V, dsv3_err *e)
{
    memset(s, 0, sizeof *s);
    s->p = *p;
    s->rng = p->seed;
    s->V = V;
    s->buf = malloc((size_t)(V > 0 ? V : 1) * sizeof *s->buf);
    if (!s->buf)
        return err_set(e, "sampler: out of memory");
    return 0;
}

void sampler_free(sampler *s)
{
    free(s->buf);
    s->buf = NULL;
}

double sampler_uniform(sampler *s)
{
    return sampler_splitmix(&s->rng);
}

int sampler_is_greedy(const sampler *s)
{
    return s->p.temp <= 0 && ((float)s->p.repeat_penalty == 1.0f || s->p.repeat_last_n == 0);
}

/* The chain after the candidates are made: the penalty (by_id: c is the whole vocabulary in
 * id order), then greedy (the largest logit, ties to the lower id) or top-k, top-p, min-p,
 * temperature and the draw. */
static int32_t chain(sampler *s, sampler_cands *c, const int32_t *hist, int n_hist, int by_id)
{
    float pen = (float)s->p.repeat_penalty;
    if (by_id)
        penalty_by_id(c, hist, n_hist, s->p.repeat_last_n, pen);
    else
        sampler_penalty(c, hist, n_hist, s->p.repeat_last_n, pen);
    if (s->p.temp <= 0) {
        int best = 0;
        for (int v = 1; v < c->n; v++)
            if (cmp_cand(&c->v[v], &c->v[best]) < 0)
                best = v;
        return c->v[best].id;
    }
    sampler_top_k(c, s->p.top_k);
    sampler_top_p(c, s->p.top_p);
    sampler_min_p(c, s->p.min_p);
    sampler_temp(c, s->p.temp);
    return sampler_pick(c, sampler_uniform(s));
}

int32_t sampler_sample(sampler *s, const float *logits, const int32_t *hist, int n_hist)
{
    sampler_cands c = {s->buf, s->V, 0};
    for (int v = 0; v < s->V; v++)
        c.v[v] = (sampler_cand){v, logits[v], 0};
    return chain(s, &c, hist, n_hist, 1);
}

static int penalised(const sampler *s)
{
    return (float)s->p.repeat_penalty != 1.0f && s->p.repeat_last_n != 0;
}

int sampler_top_need(const sampler *s, int n_hist)
{
    int k = s->p.temp <= 0 ? 1 : s->p.top_k;
    if (k <= 0 || (penalised(s) && (float)s->p.repeat_penalty < 1.0f))
        return 0;
    if (penalised(s) && n_hist > 0)
        k += s->p.repeat_last_n < 0 || s->p.repeat_last_n > n_hist ? n_hist
                                                                     : s->p.repeat_last_n;
    return k;
}

int32_t sampler_sample_top(sampler *s, const sampler_cand *best, int n, const int32_t *hist,
                           int n_hist)
{
    if (n > s->V)
        n = s->V;
    memcpy(s->buf, best, (size_t)n * sizeof *best);
    sampler_cands c = {s->buf, n, 1};
    return chain(s, &c, hist, n_hist, 0);
}

int sampler_draw_of(const sampler *s, int max_k, sampler_draw *d)
{
    if (penalised(s) || (s->p.temp > 0 && (s->p.top_k < 1 || s->p.top_k > max_k)) || max_k < 1)
        return 0;
    *d = (sampler_draw){0};
    d->temp = s->p.temp;
    d->top_p = s->p.top_p;
    d->min_p = s->p.min_p;
    d->log_min_p = s->p.min_p > 0 ? log(s->p.min_p) : 0;
    d->rng = s->rng;
    d->top_k = s->p.temp > 0 ? s->p.top_k : 1;
    return 1;
}

void sampler_draw_taken(sampler *s)
{
    if (s->p.temp > 0)
        sampler_uniform(s);
}

int32_t sampler_draw_top(sampler_draw *d, const sampler_cand *best, int n, dsv3_err *e)
{
    sampler_params p;
    sampler_params_default(&p);
    p.temp = d->temp;
    p.top_k = d->top_k;
    p.top_p = d->top_p;
    p.min_p = d->min_p;
    p.repeat_penalty = 1.0;
    p.seed = d->rng;
    sampler s;
    if (sampler_init(&s, &p, n, e))
        return -1;
    int32_t id = sampler_sample_top(&s, best, n, NULL, 0);
    d->rng = s.rng;
    sampler_free(&s);
    return id;
}
