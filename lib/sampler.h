/* sampler: choosing the next token from logits, with llama.cpp's transforms and order.
 *
 * The chain (llama.cpp's common sampler, in its default order): repeat penalty over the last
 * repeat_last_n tokens (a distinct token's logit divided by the penalty when positive,
 * multiplied when not), top-k, top-p (the smallest prefix of the sorted distribution whose
 * mass reaches p, probabilities at temperature 1), min-p (tokens whose probability is at
 * least min_p times the largest), temperature, then a draw from the softmax. Temperature
 * <= 0 is greedy: the largest logit after the penalty (ties to the lower id). A parameter
 * at its neutral value (top_k <= 0, top_p >= 1, min_p <= 0, penalty 1) does nothing.
 *
 * Each sampler owns its random state (splitmix64 seeded with `seed`), so a sequence's draws
 * depend only on its own seed and logits, not on what else is generated alongside. */
#ifndef DSV3_SAMPLER_H
#define DSV3_SAMPLER_H

#include <stdint.h>

#include "err.h"
#include "sampler_draw.h"

typedef struct sampler_params {
    double temp;           /* 0.8; <= 0 greedy */
    int top_k;             /* 40; <= 0 off */
    double top_p;          /* 0.95; >= 1 off */
    double min_p;          /* 0.05; <= 0 off */
    double repeat_penalty; /* 1.0 (off) */
    int repeat_last_n;     /* 64; 0 off, -1 the whole history */
    uint64_t seed;
} sampler_params;

/* llama.cpp's defaults (seed 0). */
void sampler_params_default(sampler_params *p);

/* A candidate token: id, logit and (after sampler_softmax) probability. */
typedef struct sampler_cand {
    int32_t id;
    float logit;
    float p;
} sampler_cand;

typedef struct sampler_cands {
    sampler_cand *v;
    int n;
    int sorted;  /* by logit, descending (ties: lower id first) */
} sampler_cands;

/* The transforms, each on the current candidates (for tests and for other chains). */
void sampler_penalty(sampler_cands *c, const int32_t *hist, int n_hist, int last_n,
                     float penalty);
void sampler_top_k(sampler_cands *c, int k);
void sampler_softmax(sampler_cands *c);  /* sorts, then p = softmax(logit) */
/* Over more than 1024 unsorted candidates (top-k off) top-p sorts only the prefix it keeps
 * (its softmax then sums every candidate in the list's order, not the sorted one: the same
 * bounds, and a prefix can differ only where its mass lands within rounding of p), and
 * min-p sorts only those it keeps (the same list as sorting all). */
void sampler_top_p(sampler_cands *c, double p);
void sampler_min_p(sampler_cands *c, double p);
void sampler_temp(sampler_cands *c, double t);
/* The candidate where the cumulative softmax passes u in [0,1) (sorted order). */
int32_t sampler_pick(sampler_cands *c, double u);

typedef struct sampler {
    sampler_params p;
    uint64_t rng;
    int V;
    sampler_cand *buf;  /* [V] */
} sampler;

int sampler_init(sampler *s, const sampler_params *p, int V, dsv3_err *e);
void sampler_free(sampler *s);
/* A uniform double in [0,1) from the sampler's state. */
double sampler_uniform(sampler *s);
/* Whether sampler_sample is the plain argmax (temperature <= 0, no penalty): the largest
 * logit, ties to the lower id, whatever the history; a GPU can then choose on the device. */
int sampler_is_greedy(const sampler *s);
/* The next token from logits[V], hist[0..n_hist) being the tokens so far (prompt and
 * generated, for the penalty). */
int32_t sampler_sample(sampler *s, const float *logits, const int32_t *hist, int n_hist);

/* How many of the largest logits (ties to the lower id, the order of a sorted candidate list)
 * the next draw can depend on, for sampler_sample_top; 0 when it may depend on any (top-k
 * off, or a penalty below 1, which can lift any history token into the top). A penalty above
 * 1 only lowers the logits of the window's tokens, so top-k after it is among the top_k +
 * window largest before it. */
int sampler_top_need(const sampler *s, int n_hist);
/* sampler_sample's draw (the same id and the same random state after it) from only the
 * n >= sampler_top_need largest logits: best[] sorted as sampler_cands are (logit descending,
 * ties to the lower id), p unused. */
int32_t sampler_sample_top(sampler *s, const sampler_cand *best, int n, const int32_t *hist,
                           int n_hist);


/* The next draw as a sampler_draw (what a GPU's decode step draws from its top_k largest
 * logits, ginfer's draw steps), when it needs no history (no repeat penalty) and, sampled,
 * 1 <= top_k <= max_k: greedy ones get top_k 1. 0 when it cannot be made so. */
int sampler_draw_of(const sampler *s, int max_k, sampler_draw *d);
/* A draw of sampler_draw_of's was made elsewhere: the random state moves on as
 * sampler_sample's would (sampled ones only). */
void sampler_draw_taken(sampler *s);
/* The draw of d from the n >= d->top_k largest logits best[] (sorted as for
 * sampler_sample_top): sampler_sample_top's id, and d->rng moved on as its state. -1 when out
 * of memory. */
int32_t sampler_draw_top(sampler_draw *d, const sampler_cand *best, int n, dsv3_err *e);

#endif
