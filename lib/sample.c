#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/gmodel.h"

struct sample_scorer {
    dsv3_model *m;
    int window;
    model_acts *acts;  /* for the last window length */
    int acts_T;
    int32_t *ids, *tg;
    int gpu, dev;      /* sample_scorer_use_gpu */
    gmodel *gm;        /* for a full window */
    float *rowloss;    /* [window] */
};

int sample_scorer_new(sample_scorer **out, dsv3_model *m, int window, dsv3_err *e)
{
    sample_scorer *s = calloc(1, sizeof *s);
    if (!s)
        return err_set(e, "out of memory");
    s->m = m;
    s->window = window > 0 ? window : m->cfg.max_position_embeddings;
    if (s->window < 1)
        s->window = 4096;
    s->ids = malloc((size_t)s->window * sizeof *s->ids);
    s->tg = malloc((size_t)s->window * sizeof *s->tg);
    if (!s->ids || !s->tg) {
        sample_scorer_free(s);
        return err_set(e, "out of memory for a window of %d tokens", window);
    }
    *out = s;
    return 0;
}

void sample_scorer_free(sample_scorer *s)
{
    if (!s)
        return;
    model_acts_free(s->acts);
    gmodel_destroy(s->gm);
    free(s->rowloss);
    free(s->ids);
    free(s->tg);
    free(s);
}

int sample_scorer_use_gpu(sample_scorer *s, int dev, dsv3_err *e)
{
    if (!(s->rowloss = malloc((size_t)s->window * sizeof *s->rowloss)))
        return err_set(e, "out of memory");
    s->gpu = 1;
    s->dev = dev;
    return 0;
}

/* The forward of one window of T tokens (ids/tg set) on the GPU: *loss and rowloss[T].
 * The GPU model is made once for a full window; a shorter one is padded at its end (id 0,
 * no target), which causal attention keeps from the rows before it. */
static int gpu_window(sample_scorer *s, int T, float *loss, dsv3_err *e)
{
    if (!s->gm && gmodel_create(&s->gm, s->m, 1, s->window, s->dev, e))
        return -1;
    for (int i = T; i < s->window; i++) {
        s->ids[i] = 0;
        s->tg[i] = -1;
    }
    if (gmodel_forward(s->gm, s->ids, s->tg, 0, loss, e))
        return -1;
    return gmodel_row_losses(s->gm, s->rowloss) ? err_set(e, "no losses from the GPU") : 0;
}

/* log softmax(row)[t] in double. */
static double logprob(const float *row, int V, int t)
{
    float mx = -INFINITY;
    for (int v = 0; v < V; v++)
        if (row[v] > mx)
            mx = row[v];
    double z = 0;
    for (int v = 0; v < V; v++)
        z += exp((double)row[v] - mx);
    return (double)row[t] - mx - log(z);
}

static int score_window(sample_scorer *s, uint64_t doc, uint64_t off, const uint32_t *ids,
                        int T, FILE *f, double *sum, uint64_t *count, dsv3_err *e)
{
    dsv3_model *m = s->m;
    int V = m->cfg.vocab_size;
    for (int i = 0; i < T; i++) {
        if (ids[i] >= (uint32_t)V)
            return err_set(e, "document %llu: token %u at position %llu is outside the "
                           "model's vocabulary (vocab_size %d)", (unsigned long long)doc,
                           ids[i], (unsigned long long)(off + i), V);
        s->ids[i] = (int32_t)ids[i];
        s->tg[i] = i + 1 < T ? (int32_t)ids[i + 1] : -1;
    }
    if (T < 2) {  /* nothing to predict */
        fprintf(f, "{\"doc\":%llu,\"offset\":%llu,\"tokens\":[", (unsigned long long)doc,
                (unsigned long long)off);
        if (T)
            fprintf(f, "%u", ids[0]);
        fputs("],\"logprobs\":[],\"loss\":null,\"n\":0}\n", f);
        return 0;
    }
    float loss = 0;
    if (s->gpu && gpu_window(s, T, &loss, e))
        return -1;
    if (!s->gpu && (!s->acts || s->acts_T != T)) {
        model_acts_free(s->acts);
        s->acts_T = 0;
        if (!(s->acts = model_acts_new(m, 1, T, e)))
            return -1;
        s->acts_T = T;
    }
    if (!s->gpu && model_forward(m, s->acts, s->ids, s->tg, &loss, e))
        return -1;
    const float *logits = s->gpu ? NULL : model_acts_logits(s->acts);
    fprintf(f, "{\"doc\":%llu,\"offset\":%llu,\"tokens\":[", (unsigned long long)doc,
            (unsigned long long)off);
    for (int i = 0; i < T; i++)
        fprintf(f, "%s%u", i ? "," : "", ids[i]);
    fputs("],\"logprobs\":[", f);
    for (int i = 0; i + 1 < T; i++) {
        double lp = s->gpu ? -(double)s->rowloss[i]
                           : logprob(logits + (int64_t)i * V, V, s->tg[i]);
        *sum -= lp;
        fprintf(f, "%s%.7g", i ? "," : "", lp);
    }
    fprintf(f, "],\"loss\":%.9g,\"n\":%d}\n", loss, T - 1);
    *count += (uint64_t)(T - 1);
    return 0;
}

int sample_score_doc(sample_scorer *s, uint64_t doc, const uint32_t *ids, uint64_t n, FILE *f,
                     double *sum, uint64_t *count, dsv3_err *e)
{
    uint64_t off = 0;
    do {
        uint64_t len = n - off < (uint64_t)s->window ? n - off : (uint64_t)s->window;
        if (score_window(s, doc, off, ids + off, (int)len, f, sum, count, e))
            return -1;
        off += len;
    } while (off < n);
    return 0;
}
