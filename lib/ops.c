#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads: every parallel loop below splits over outputs that one iteration alone writes
 * (rows, output columns, heads), and each output is summed in the serial order, so the
 * results are bitwise those of one thread. Loops with little work stay on one thread:
 * starting a team costs microseconds. */
#define PAR_MIN_WORK 32768

void ops_set_threads(int n)
{
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : omp_get_num_procs());
#else
    (void)n;
#endif
}

int ops_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---- linear ---- */

void matmul_forward(float *out, const float *in, const float *w, int N, int I, int O)
{
#pragma omp parallel for collapse(2) schedule(static) if ((int64_t)N * I * O > PAR_MIN_WORK)
    for (int n = 0; n < N; n++) {
        for (int o = 0; o < O; o++) {
            const float *x = in + (int64_t)n * I;
            float *y = out + (int64_t)n * O;
            const float *wr = w + (int64_t)o * I;
            /* Four partial sums: shorter dependency chains, and closer to a BLAS's order. */
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            int i = 0;
            for (; i + 4 <= I; i += 4) {
                a0 += x[i] * wr[i];
                a1 += x[i + 1] * wr[i + 1];
                a2 += x[i + 2] * wr[i + 2];
                a3 += x[i + 3] * wr[i + 3];
            }
            for (; i < I; i++)
                a0 += x[i] * wr[i];
            y[o] = (a0 + a1) + (a2 + a3);
        }
    }
}

void matmul_backward(float *d_in, float *d_w, const float *d_out, const float *in,
                     const float *w, int N, int I, int O)
{
    int par = (int64_t)N * I * O > PAR_MIN_WORK;
    (void)par;  /* unused without OpenMP */
    if (d_in) {
#pragma omp parallel for schedule(static) if (par)
        for (int n = 0; n < N; n++) {
            const float *dy = d_out + (int64_t)n * O;
            float *dx = d_in + (int64_t)n * I;
            for (int o = 0; o < O; o++) {
                float g = dy[o];
                if (g == 0)
                    continue;
                const float *wr = w + (int64_t)o * I;
                for (int i = 0; i < I; i++)
                    dx[i] += g * wr[i];
            }
        }
    }
    if (d_w) {
#pragma omp parallel for schedule(static) if (par)
        for (int o = 0; o < O; o++) {
            float *dw = d_w + (int64_t)o * I;
            for (int n = 0; n < N; n++) {
                float g = d_out[(int64_t)n * O + o];
                if (g == 0)
                    continue;
                const float *x = in + (int64_t)n * I;
                for (int i = 0; i < I; i++)
                    dw[i] += g * x[i];
            }
        }
    }
}

/* ---- RMSNorm: y = w * x * rstd, rstd = (mean(x^2) + eps)^-1/2 ---- */

void rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int N, int D,
                     float eps)
{
    for (int n = 0; n < N; n++) {
        const float *x = in + (int64_t)n * D;
        double ss = 0;
        for (int i = 0; i < D; i++)
            ss += (double)x[i] * x[i];
        float r = (float)(1.0 / sqrt(ss / D + eps));
        if (rstd)
            rstd[n] = r;
        float *y = out + (int64_t)n * D;
        for (int i = 0; i < D; i++)
            y[i] = w[i] * (x[i] * r);
    }
}

/* With xhat = x * r: dx = r * (g - xhat * mean(g . xhat)), g = dy * w. */
void rmsnorm_backward(float *d_in, float *d_w, const float *d_out, const float *in,
                      const float *w, const float *rstd, int N, int D)
{
    for (int n = 0; n < N; n++) {
        const float *x = in + (int64_t)n * D, *dy = d_out + (int64_t)n * D;
        float r = rstd[n];
        double dot = 0;
        for (int i = 0; i < D; i++)
            dot += (double)dy[i] * w[i] * x[i] * r;
        float m = (float)(dot / D);
        for (int i = 0; i < D; i++) {
            float xh = x[i] * r;
            if (d_w)
                d_w[i] += dy[i] * xh;
            if (d_in)
                d_in[(int64_t)n * D + i] += r * (dy[i] * w[i] - xh * m);
        }
    }
}

/* ---- embedding ---- */

void embedding_forward(float *out, const float *table, const int32_t *ids, int N, int H)
{
    for (int n = 0; n < N; n++)
        memcpy(out + (int64_t)n * H, table + (int64_t)ids[n] * H, (size_t)H * sizeof *out);
}

void embedding_backward(float *d_table, const float *d_out, const int32_t *ids, int N, int H)
{
    for (int n = 0; n < N; n++) {
        float *dt = d_table + (int64_t)ids[n] * H;
        const float *dy = d_out + (int64_t)n * H;
        for (int i = 0; i < H; i++)
            dt[i] += dy[i];
    }
}

/* ---- RoPE ---- */

void rope_tables(float *cos_t, float *sin_t, const double *inv_freq, int T, int half,
                 double attn_factor)
{
    for (int t = 0; t < T; t++)
        for (int j = 0; j < half; j++) {
            /* transformers forms the angle as a float32 product; so do we. */
            float ang = (float)inv_freq[j] * (float)t;
            cos_t[(int64_t)t * half + j] = (float)(cos((double)ang) * attn_factor);
            sin_t[(int64_t)t * half + j] = (float)(sin((double)ang) * attn_factor);
        }
}

static void rope_apply(float *x, int count, int stride, int per_pos, const int *pos,
                       const float *cos_t, const float *sin_t, int half, int interleave,
                       float sign)
{
    for (int i = 0; i < count; i++) {
        float *v = x + (int64_t)i * stride;
        const float *c = cos_t + (int64_t)pos[i / per_pos] * half;
        const float *s = sin_t + (int64_t)pos[i / per_pos] * half;
        for (int j = 0; j < half; j++) {
            float *a = interleave ? &v[2 * j] : &v[j];
            float *b = interleave ? &v[2 * j + 1] : &v[j + half];
            float sn = sign * s[j], x0 = *a, x1 = *b;
            *a = x0 * c[j] - x1 * sn;
            *b = x1 * c[j] + x0 * sn;
        }
    }
}

void rope_forward(float *x, int count, int stride, int per_pos, const int *pos,
                  const float *cos_t, const float *sin_t, int half, int interleave)
{
    rope_apply(x, count, stride, per_pos, pos, cos_t, sin_t, half, interleave, 1.0f);
}

/* The Jacobian of a (scaled) rotation is [[c, -s], [s, c]]; its transpose is the rotation
 * with -s, which is what the gradient goes through. */
void rope_backward(float *dx, int count, int stride, int per_pos, const int *pos,
                   const float *cos_t, const float *sin_t, int half, int interleave)
{
    rope_apply(dx, count, stride, per_pos, pos, cos_t, sin_t, half, interleave, -1.0f);
}

/* ---- SwiGLU ---- */

static float sigmoidf_(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

void swiglu_forward(float *h, const float *g, const float *u, int64_t n)
{
#pragma omp parallel for schedule(static) if (n > PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++)
        h[i] = g[i] * sigmoidf_(g[i]) * u[i];
}

/* silu'(g) = sig(g) * (1 + g * (1 - sig(g))). */
void swiglu_backward(float *d_g, float *d_u, const float *d_h, const float *g, const float *u,
                     int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float sg = sigmoidf_(g[i]);
        d_g[i] += d_h[i] * u[i] * sg * (1 + g[i] * (1 - sg));
        d_u[i] += d_h[i] * g[i] * sg;
    }
}

/* ---- attention ---- */

void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int nh, int dk, int dv, float scale)
{
    attention_forward_seg(out, att, q, k, v, NULL, B, T, nh, dk, dv, scale);
}

/* Key j is visible to query i of the same sequence: j <= i and, with seg, the same segment.
 * Masked keys are skipped (never summed as zeros), so a document's rows see exactly the
 * sums they would see as a sequence of their own. */
#define ATT_SEES(seg, b, T, i, j) \
    (!(seg) || (seg)[(int64_t)(b) * (T) + (j)] == (seg)[(int64_t)(b) * (T) + (i)])

void attention_forward_seg(float *out, float *att, const float *q, const float *k,
                           const float *v, const int32_t *seg, int B, int T, int nh, int dk,
                           int dv, float scale)
{
#pragma omp parallel for collapse(2) schedule(static) \
    if ((int64_t)B * nh * T * T * (dk + dv) > PAR_MIN_WORK)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++) {
                const float *qi = q + (((int64_t)b * T + i) * nh + h) * dk;
                float *p = att + (((int64_t)b * nh + h) * T + i) * T;
                float mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    if (!ATT_SEES(seg, b, T, i, j)) {
                        p[j] = 0;
                        continue;
                    }
                    const float *kj = k + (((int64_t)b * T + j) * nh + h) * dk;
                    double s = 0;
                    for (int d = 0; d < dk; d++)
                        s += (double)qi[d] * kj[d];
                    p[j] = (float)s * scale;
                    if (p[j] > mx)
                        mx = p[j];
                }
                double sum = 0;
                for (int j = 0; j <= i; j++)
                    if (ATT_SEES(seg, b, T, i, j)) {
                        p[j] = expf(p[j] - mx);
                        sum += p[j];
                    }
                for (int j = 0; j <= i; j++)
                    if (ATT_SEES(seg, b, T, i, j))
                        p[j] = (float)(p[j] / sum);
                for (int j = i + 1; j < T; j++)
                    p[j] = 0;
                float *o = out + (((int64_t)b * T + i) * nh + h) * dv;
                for (int d = 0; d < dv; d++)
                    o[d] = 0;
                for (int j = 0; j <= i; j++) {
                    if (!ATT_SEES(seg, b, T, i, j))
                        continue;
                    const float *vj = v + (((int64_t)b * T + j) * nh + h) * dv;
                    for (int d = 0; d < dv; d++)
                        o[d] += p[j] * vj[d];
                }
            }
}

/* dP = dO . V^T; dS = P * (dP - sum_j P dP); dQ = scale dS K; dK = scale dS^T Q; dV = P^T dO. */
void attention_backward(float *d_q, float *d_k, float *d_v, const float *d_out,
                        const float *att, const float *q, const float *k, const float *v,
                        int B, int T, int nh, int dk, int dv, float scale)
{
    attention_backward_seg(d_q, d_k, d_v, d_out, att, q, k, v, NULL, B, T, nh, dk, dv, scale);
}

void attention_backward_seg(float *d_q, float *d_k, float *d_v, const float *d_out,
                            const float *att, const float *q, const float *k, const float *v,
                            const int32_t *seg, int B, int T, int nh, int dk, int dv,
                            float scale)
{
    /* d_k and d_v of head (b, h) collect only from queries of the same head. */
#pragma omp parallel for collapse(2) schedule(static) \
    if ((int64_t)B * nh * T * T * (dk + dv) > PAR_MIN_WORK)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < nh; h++)
            for (int i = 0; i < T; i++) {
                const float *p = att + (((int64_t)b * nh + h) * T + i) * T;
                const float *doi = d_out + (((int64_t)b * T + i) * nh + h) * dv;
                float dp[T > 0 ? T : 1];
                double dot = 0;
                for (int j = 0; j <= i; j++) {
                    if (!ATT_SEES(seg, b, T, i, j)) {
                        dp[j] = 0;
                        continue;
                    }
                    const float *vj = v + (((int64_t)b * T + j) * nh + h) * dv;
                    float *dvj = d_v + (((int64_t)b * T + j) * nh + h) * dv;
                    double s = 0;
                    for (int d = 0; d < dv; d++) {
                        s += (double)doi[d] * vj[d];
                        dvj[d] += p[j] * doi[d];
                    }
                    dp[j] = (float)s;
                    dot += (double)p[j] * dp[j];
                }
                const float *qi = q + (((int64_t)b * T + i) * nh + h) * dk;
                float *dqi = d_q + (((int64_t)b * T + i) * nh + h) * dk;
                for (int j = 0; j <= i; j++) {
                    if (!ATT_SEES(seg, b, T, i, j))
                        continue;
                    float ds = p[j] * (dp[j] - (float)dot) * scale;
                    if (ds == 0)
                        continue;
                    const float *kj = k + (((int64_t)b * T + j) * nh + h) * dk;
                    float *dkj = d_k + (((int64_t)b * T + j) * nh + h) * dk;
                    for (int d = 0; d < dk; d++) {
                        dqi[d] += ds * kj[d];
                        dkj[d] += ds * qi[d];
                    }
                }
            }
}

/* ---- router ---- */

void router_forward(int *idx, float *w, float *s, const float *logits, const float *bias,
                    int E, int n_group, int topk_group, int k, int norm, float scale)
{
    router_forward_limited(idx, w, s, logits, bias, E, n_group, topk_group, 2, k, norm, scale);
}

/* The sum of the `top` largest of v[0 .. n) (top <= n), added largest first. */
static float sum_top(const float *v, int n, int top)
{
    float best[top];
    for (int j = 0; j < top; j++)
        best[j] = -INFINITY;
    for (int e = 0; e < n; e++) {
        float x = v[e];
        for (int j = 0; j < top; j++)
            if (x > best[j]) {
                float t = best[j];
                best[j] = x;
                x = t;
            }
    }
    float sum = 0;
    for (int j = 0; j < top; j++)
        sum += best[j];
    return sum;
}

void router_forward_limited(int *idx, float *w, float *s, const float *logits,
                            const float *bias, int E, int n_group, int topk_group, int group_top,
                            int k, int norm, float scale)
{
    int per = E / n_group;
    if (group_top > per)
        group_top = per;
    if (group_top < 1)
        group_top = 1;
    float choice[E], gscore[n_group];
    unsigned char keep[n_group];
    for (int e = 0; e < E; e++) {
        s[e] = sigmoidf_(logits[e]);
        choice[e] = s[e] + (bias ? bias[e] : 0);
    }
    /* A group's score is the sum of its group_top best biased affinities (2 in V3's
     * group-limited routing; K/M for node-limited routing to M nodes). With 2 this adds
     * the best and the second best, as before. */
    for (int g = 0; g < n_group; g++) {
        gscore[g] = sum_top(choice + g * per, per, group_top);
        keep[g] = 0;
    }
    for (int r = 0; r < topk_group; r++) {
        int best = -1;
        for (int g = 0; g < n_group; g++)
            if (!keep[g] && (best < 0 || gscore[g] > gscore[best]))
                best = g;
        keep[best] = 1;
    }
    /* The top k among the kept groups' experts (DeepSeek's reference masks the others with
     * -inf; transformers with 0.0, which differs only if a kept expert's biased score is
     * negative and fewer than k are positive). */
    unsigned char taken[E];
    memset(taken, 0, sizeof taken);
    double sum = 0;
    for (int r = 0; r < k; r++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (keep[e / per] && !taken[e] && (best < 0 || choice[e] > choice[best]))
                best = e;
        taken[best] = 1;
        idx[r] = best;
        w[r] = s[best];
        sum += s[best];
    }
    /* transformers adds 1e-20 to the denominator; it cannot matter in float32 for s > 0. */
    for (int r = 0; r < k; r++)
        w[r] = norm ? (float)(w[r] / (sum + 1e-20)) * scale : w[r] * scale;
}

/* w_r = c s_r / S (norm, S = sum of chosen s) or c s_r; s = sigmoid(l), ds/dl = s (1 - s). */
void router_backward(float *d_logits, const float *d_w, const int *idx, const float *s, int E,
                     int k, int norm, float scale)
{
    (void)E;
    double S = 0, dot = 0;
    for (int r = 0; r < k; r++) {
        S += s[idx[r]];
        dot += (double)d_w[r] * s[idx[r]];
    }
    for (int r = 0; r < k; r++) {
        int e = idx[r];
        double ds = norm ? scale * (d_w[r] / S - dot / (S * S)) : scale * d_w[r];
        d_logits[e] += (float)(ds * s[e] * (1 - s[e]));
    }
}

/* ---- cross-entropy ---- */

static double row_ce(const float *l, int target, int V)
{
    float mx = -INFINITY;
    for (int v = 0; v < V; v++)
        if (l[v] > mx)
            mx = l[v];
    double z = 0;
    for (int v = 0; v < V; v++)
        z += exp((double)l[v] - mx);
    return log(z) + mx - l[target];
}

void crossentropy_forward(double *sum, int *count, float *losses, const float *logits,
                          const int32_t *targets, int N, int V)
{
    /* Rows in parallel into row[], then summed in order: the same sum on any thread count. */
    double *row = malloc((size_t)(N > 0 ? N : 1) * sizeof *row);
    int par = row && (int64_t)N * V > PAR_MIN_WORK;
    (void)par;
#pragma omp parallel for schedule(static) if (par)
    for (int n = 0; n < N; n++) {
        double loss = targets[n] < 0 ? 0 : row_ce(logits + (int64_t)n * V, targets[n], V);
        if (row)
            row[n] = loss;
        else if (losses)
            losses[n] = (float)loss;
    }
    double total = 0;
    int used = 0;
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0) {
            if (losses)
                losses[n] = 0;
            continue;
        }
        double loss = row ? row[n] : row_ce(logits + (int64_t)n * V, targets[n], V);
        if (losses)
            losses[n] = (float)loss;
        total += loss;
        used++;
    }
    free(row);
    *sum = total;
    *count = used;
}

void crossentropy_backward(float *d_logits, const float *logits, const int32_t *targets, int N,
                           int V, float scale)
{
#pragma omp parallel for schedule(static) if ((int64_t)N * V > PAR_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (int64_t)n * V;
        float *d = d_logits + (int64_t)n * V;
        if (targets[n] < 0) {
            memset(d, 0, (size_t)V * sizeof *d);
            continue;
        }
        float mx = -INFINITY;
        for (int v = 0; v < V; v++)
            if (l[v] > mx)
                mx = l[v];
        double z = 0;
        for (int v = 0; v < V; v++)
            z += exp((double)l[v] - mx);
        for (int v = 0; v < V; v++)
            d[v] = (float)(exp((double)l[v] - mx) / z) * scale;
        d[targets[n]] -= scale;
    }
}
