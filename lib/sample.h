/* sample: what dsv3-sample does with a model. For now scoring: the log-probability the
 * model gives each token of a sequence after the tokens before it, and the mean loss, as
 * JSONL; generation is to come.
 *
 * A sequence longer than the window is scored in consecutive windows of `window` tokens,
 * each on its own (the first token of a window has no prediction). A window's loss is
 * model_forward's mean cross-entropy over its next-token targets, so it is the number the
 * trainer reports for the same ids. */
#ifndef DSV3_SAMPLE_H
#define DSV3_SAMPLE_H

#include <stdint.h>
#include <stdio.h>

#include "model.h"

typedef struct sample_scorer sample_scorer;

/* window <= 0: the config's max_position_embeddings. */
int sample_scorer_new(sample_scorer **s, dsv3_model *m, int window, dsv3_err *e);
void sample_scorer_free(sample_scorer *s);

/* Runs the forwards on GPU dev (kernels/gmodel, bf16) instead of lib/model: a token's
 * log-probability is then minus the GPU head's cross-entropy of its row, fp32 from bf16
 * hidden states and weights. */
int sample_scorer_use_gpu(sample_scorer *s, int dev, dsv3_err *e);

/* Scores document `doc` (ids[0..n)) and writes one JSON object a window to f:
 * {"doc":D,"offset":O,"tokens":[...],"logprobs":[...],"loss":X,"n":K} with K = window
 * length - 1 predictions (loss null when K = 0). Adds the predictions' summed loss and count
 * to *sum and *count. An id outside the vocabulary is an error naming the document. */
int sample_score_doc(sample_scorer *s, uint64_t doc, const uint32_t *ids, uint64_t n, FILE *f,
                     double *sum, uint64_t *count, dsv3_err *e);

#endif
