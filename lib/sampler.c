#include "sampler.h"

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

/* llama.cpp's rule: each distinct token of the window, once, however often it occurs. */
void sampler_penalty(sampler_cands *c, const int32_t *hist, int n_hist, int last_n,
                     float penalty)
{
    if (penalty == 1.0f || last_n == 0 || n_hist <= 0)
        return;
    int from = last_n < 0 || last_n >= n_hist ? 0 : n_hist - last_n;
    for (int i = 0; i < c->n; i++) {
        int seen = 0;
        for (int j = from; j < n_hist && !seen; j++)
            seen = hist[j] == c->v[i].id;
        if (seen)
            c->v[i].logit = c->v[i].logit <= 0 ? c->v[i].logit * penalty
                                               : c->v[i].logit / penalty;
    }
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

/* The k best by a heap (n log k, not a sort of the whole vocabulary), then sorted. */
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
        sum += exp((double)c->v[i].logit - mx);
    for (int i = 0; i < c->n; i++)
        c->v[i].p = (float)(exp((double)c->v[i].logit - mx) / sum);
}

void sampler_top_p(sampler_cands *c, double p)
{
    if (p >= 1.0 || c->n <= 1)
        return;
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
    uint64_t z = (s->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return ((z ^ (z >> 31)) >> 11) * 0x1p-53;
}

int sampler_is_greedy(const sampler *s)
{
    return s->p.temp <= 0 && ((float)s->p.repeat_penalty == 1.0f || s->p.repeat_last_n == 0);
}

/* The chain after the candidates are made: the penalty, then greedy (the largest logit, ties
 * to the lower id) or top-k, top-p, min-p, temperature and the draw. */
static int32_t chain(sampler *s, sampler_cands *c, const int32_t *hist, int n_hist)
{
    sampler_penalty(c, hist, n_hist, s->p.repeat_last_n, (float)s->p.repeat_penalty);
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
    return chain(s, &c, hist, n_hist);
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
    return chain(s, &c, hist, n_hist);
}
