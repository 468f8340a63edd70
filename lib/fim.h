/* fim: Fill-in-the-Middle at character boundaries, through a tokenizer.
 *
 * Owns the -t path of dsv3-pack's FIM: a document's tokens are decoded to text, cut at two
 * uniform random UTF-8 character boundaries (the start, the end, or a byte that is not a
 * continuation byte; invalid UTF-8 thus cuts between its bytes) into prefix, middle and
 * suffix, and each part is encoded again on its own, so no token straddles a cut. The
 * arrangement is that of pack_fim: PSM  BEGIN prefix HOLE suffix END middle;  SPM  BEGIN
 * HOLE suffix END prefix middle. Decoding the three parts and putting them back in order gives the document's text
 * exactly. A document holding a special token is not re-encoded (its text would not encode
 * back to that token): the caller cuts it at token boundaries instead. */
#ifndef DSV3_FIM_H
#define DSV3_FIM_H

#include <stdint.h>

#include "bpe.h"
#include "err.h"

typedef struct fim_text {
    const bpe *b;
    bpe_encoder *enc;
    bpe_bytes text;     /* the decoded document */
    bpe_ids out;        /* the rearranged tokens of the last fim_text_apply */
} fim_text;

int fim_text_new(fim_text *f, const bpe *b, dsv3_err *e);
void fim_text_free(fim_text *f);
/* 1: f->out holds the rearranged document; 0: t holds a special token (nothing drawn, no
 * output); -1: error (an id outside the vocabulary, out of memory). Draws the two cuts from
 * rng with pack_rand_below, over the m+1 boundaries of an m-character text. */
int fim_text_apply(fim_text *f, const uint32_t *t, uint64_t n, int spm, const uint32_t ids[3],
                   uint64_t *rng, dsv3_err *e);

/* The special tokens dsv3-pack takes from a tokenizer (DeepSeek-V3's names): ids[0..3) =
 * <｜fim▁begin｜>, <｜fim▁hole｜>, <｜fim▁end｜>; BPE_NONE where absent. */
void fim_token_ids(const bpe *b, uint32_t ids[3]);
extern const char *const FIM_TOKEN_NAMES[3];

#endif
