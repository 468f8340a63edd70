/* ops: the CPU reference of every operation the model is made of, forward and backward.
 *
 * Each function is one equation of the DeepSeek-V3 report (or of transformers' code where
 * the report is silent), in plain float32 C with double accumulators where a sum is long.
 * The CUDA kernels in kernels/ carry the same names and are tested against these. Backward
 * functions ADD into their gradient outputs (d_in +=, d_w +=), so a tensor used twice
 * collects both contributions and callers zero gradients once per step.
 *
 * Shapes are row-major; "N" is the number of token rows (batch x sequence). */
#ifndef DSV3_OPS_H
#define DSV3_OPS_H

#include <stdint.h>

/* Threads of the parallel loops (OpenMP): n <= 0 means one per processor. Without OpenMP
 * both are no-ops and ops_threads() is 1. Results do not depend on the count: every
 * parallel loop splits over outputs that are each summed in the serial order. */
void ops_set_threads(int n);
int ops_threads(void);

/* out[N,O] = in[N,I] . w[O,I]^T  (a torch nn.Linear without bias). */
void matmul_forward(float *out, const float *in, const float *w, int N, int I, int O);
/* d_in[N,I] += d_out . w;  d_w[O,I] += d_out^T . in. Either output may be NULL. */
void matmul_backward(float *d_in, float *d_w, const float *d_out, const float *in,
                     const float *w, int N, int I, int O);

/* out = w * x / sqrt(mean(x^2) + eps) over rows of D; rstd[N] keeps 1/sqrt(...) for backward. */
void rmsnorm_forward(float *out, float *rstd, const float *in, const float *w, int N, int D,
                     float eps);
void rmsnorm_backward(float *d_in, float *d_w, const float *d_out, const float *in,
                      const float *w, const float *rstd, int N, int D);

/* out[N,H] = table[ids[i]]; backward adds rows of d_out into d_table. */
void embedding_forward(float *out, const float *table, const int32_t *ids, int N, int H);
void embedding_backward(float *d_table, const float *d_out, const int32_t *ids, int N, int H);

/* RoPE tables: cos/sin[T, d/2] for positions 0..T-1 from inv_freq, times attn_factor
 * (YaRN's magnitude correction, which transformers folds into cos and sin). */
void rope_tables(float *cos_t, float *sin_t, const double *inv_freq, int T, int half,
                 double attn_factor);
/* Rotates, in place, `count` vectors of d = 2*half values at x + i*stride, vector i at
 * position pos[i / per_pos]. interleave: pairs (2j, 2j+1) (DeepSeek's layout); otherwise
 * pairs (j, j + half). Backward rotates the gradient by the transpose. */
void rope_forward(float *x, int count, int stride, int per_pos, const int *pos,
                  const float *cos_t, const float *sin_t, int half, int interleave);
void rope_backward(float *dx, int count, int stride, int per_pos, const int *pos,
                   const float *cos_t, const float *sin_t, int half, int interleave);

/* h = silu(g) * u, elementwise over n. */
void swiglu_forward(float *h, const float *g, const float *u, int64_t n);
void swiglu_backward(float *d_g, float *d_u, const float *d_h, const float *g, const float *u,
                     int64_t n);

/* Causal multi-head attention over B sequences of T tokens and nh heads.
 * q, k: [B,T,nh,dk]; v: [B,T,nh,dv]; out: [B,T,nh,dv]; att: [B,nh,T,T] keeps the softmax
 * probabilities (upper triangle zero). scores = scale * q.k. */
void attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                       int B, int T, int nh, int dk, int dv, float scale);
void attention_backward(float *d_q, float *d_k, float *d_v, const float *d_out,
                        const float *att, const float *q, const float *k, const float *v,
                        int B, int T, int nh, int dk, int dv, float scale);
/* The same with document masking: seg [B*T] (NULL: none) numbers the documents packed in
 * each sequence, and query i sees key j only when j <= i and seg[j] == seg[i]. Masked
 * entries of att are 0 and are skipped in every sum, so a document gets bit for bit what
 * it would get as a sequence of its own (at the same positions' inputs). */
void attention_forward_seg(float *out, float *att, const float *q, const float *k,
                           const float *v, const int32_t *seg, int B, int T, int nh, int dk,
                           int dv, float scale);
void attention_backward_seg(float *d_q, float *d_k, float *d_v, const float *d_out,
                            const float *att, const float *q, const float *k, const float *v,
                            const int32_t *seg, int B, int T, int nh, int dk, int dv,
                            float scale);

/* The DeepSeek-V3 router for one token: s = sigmoid(logits[E]); choose with s + bias:
 * n_group groups scored by the sum of their top-2, the topk_group best kept, the top k
 * experts among those; weights = s of the chosen, divided by their sum when norm, times
 * scale. idx[k], w[k]; s[E] returned for backward. Ties go to the lower index. */
void router_forward(int *idx, float *w, float *s, const float *logits, const float *bias,
                    int E, int n_group, int topk_group, int k, int norm, float scale);
/* router_forward with each group scored by the sum of its group_top best biased affinities
 * (clamped to [1, experts per group]): DeepSeek-V3's node-limited routing when the groups
 * are the nodes of expert parallelism, topk_group = M nodes a token may reach and
 * group_top = k / M (report section 2.1.2: "the sum of the highest K_r/M affinity scores
 * of the experts distributed on each node"). group_top 2 is router_forward. */
void router_forward_limited(int *idx, float *w, float *s, const float *logits,
                            const float *bias, int E, int n_group, int topk_group, int group_top,
                            int k, int norm, float scale);
/* d_logits[E] += from d_w[k], routing held fixed. */
void router_backward(float *d_logits, const float *d_w, const int *idx, const float *s, int E,
                     int k, int norm, float scale);

/* Cross-entropy of logits[N,V] against targets[N] (target < 0: ignored). Returns the sum of
 * the per-row losses in *sum and the count of rows used; losses[N] (may be NULL) gets each
 * row's loss (0 for ignored). Backward: d_logits[N,V] = (softmax - onehot) * scale for the
 * used rows, 0 for ignored ones (overwrites). */
void crossentropy_forward(double *sum, int *count, float *losses, const float *logits,
                          const int32_t *targets, int N, int V);
void crossentropy_backward(float *d_logits, const float *logits, const int32_t *targets, int N,
                           int V, float scale);

#endif
