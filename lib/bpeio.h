/* bpeio: moving tokenizers in and out of other tools' files.
 *
 * HF tokenizers' tokenizer.json (a BPE model over GPT-2's byte-level alphabet, merges as
 * "a b" strings or ["a", "b"] pairs, added tokens, a pre-tokenizer of Split regexes and/or
 * ByteLevel) and tiktoken's rank files (one "base64-token rank" per line, the rank being the
 * id; the pattern and the special tokens are not in the file, so the caller names them).
 * What these formats can say that our model cannot (normalizers, other pre-tokenizers,
 * dropout, subword prefixes) is refused with a message rather than silently dropped. */
#ifndef DSV3_BPEIO_H
#define DSV3_BPEIO_H

#include <stddef.h>
#include <stdint.h>

#include "bpe.h"
#include "err.h"

typedef struct bpeio_special {
    const char *text;
    uint32_t id;
} bpeio_special;

/* Roles are taken from the added tokens whose contents are well-known BOS/EOS/PAD strings,
 * unless bos/eos/pad name one (NULL: guess). */
int bpeio_import_hf(bpe **b, const char *path, const char *bos, const char *eos,
                    const char *pad, dsv3_err *e);
/* The same from bytes in memory (name for messages; roles guessed), for tests and fuzzing. */
int bpeio_import_hf_mem(bpe **b, const void *data, size_t n, const char *name, dsv3_err *e);
int bpeio_export_hf(const bpe *b, const char *path, dsv3_err *e);

/* patterns: the pre-tokenizer (a built-in set or regexes); specials: extra tokens with ids. */
int bpeio_import_tiktoken(bpe **b, const char *path, const char *const *patterns,
                          size_t n_patterns, const bpeio_special *specials, size_t n_specials,
                          const char *bos, const char *eos, const char *pad, dsv3_err *e);
int bpeio_export_tiktoken(const bpe *b, const char *path, dsv3_err *e);

/* The special tokens tiktoken defines with a built-in encoding ("gpt2", "cl100k", "o200k"). */
size_t bpeio_tiktoken_specials(const char *name, const bpeio_special **out);

#endif
