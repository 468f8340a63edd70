/* Test fixture shared by the sampling tests: a byte-level tokenizer with an end-of-sequence
 * token, so generated ids always decode. */
#ifndef DSV3_TEST_EOS_TOKENIZER_H
#define DSV3_TEST_EOS_TOKENIZER_H

#include <stdio.h>

#include "../lib/bpe.h"

/* A tokenizer whose id 0 is a special end-of-sequence token, then the 256 bytes. */
static bpe *eos_tokenizer(void)
{
    static uint8_t bytes[256], kind[257];
    static const uint8_t *tok[257];
    static uint32_t len[257];
    static const char eos[] = "<eos>";
    tok[0] = (const uint8_t *)eos;
    len[0] = 5;
    kind[0] = BPE_SPECIAL;
    for (int i = 0; i < 256; i++) {
        bytes[i] = (uint8_t)i;
        tok[i + 1] = &bytes[i];
        len[i + 1] = 1;
        kind[i + 1] = BPE_BYTE;
    }
    const char *pat[] = {"[\\s\\S]"};
    bpe_spec s = {.vocab_size = 257, .kind = kind, .tok = tok, .len = len, .patterns = pat,
                  .n_patterns = 1, .bos = BPE_NONE, .eos = 0, .pad = BPE_NONE};
    bpe *b = NULL;
    dsv3_err e;
    if (bpe_build(&b, &s, &e))
        fprintf(stderr, "    %s\n", e.msg);
    return b;
}

#endif
