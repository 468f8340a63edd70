/* bpe: the byte-level BPE tokenizer model: its vocabulary, merges, special tokens and
 * pre-tokenizer, the tokenizer file (docs/tokenizer-format.md), encode and decode.
 *
 * Every id names a byte string. A text is cut into pieces by the pre-tokenizer (lib/pretok);
 * each piece starts as one token per byte and the adjacent pair with the lowest merge rank
 * is merged, leftmost first, until no pair has a merge: the rule of HF tokenizers' BPE and
 * of tiktoken. A bpe is read-only once built and shared by threads; each thread encodes
 * through its own bpe_encoder (match state, piece cache, scratch). Special tokens are never
 * produced from text unless the caller allows them, so user text cannot inject them. */
#ifndef DSV3_BPE_H
#define DSV3_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "pretok.h"

enum { BPE_VERSION = 1 };
#define BPE_NONE UINT32_MAX

typedef enum {
    BPE_UNUSED = 0,   /* an id with no token (a hole in imported vocabularies) */
    BPE_BYTE = 1,     /* one of the 256 single-byte tokens */
    BPE_MERGED = 2,   /* the result of at least one merge */
    BPE_SPECIAL = 3,  /* a control token: matched in text only when allowed */
    BPE_PLAIN = 4,    /* a regular token no merge produces (reached only by whole-piece lookup) */
} bpe_kind;

enum {
    BPE_FLAG_WHOLE_PIECE = 1u << 0,   /* a piece that is a token encodes as that token first
                                         (tiktoken; HF BPE's ignore_merges) */
};

typedef struct bpe_merge {
    uint32_t left, right, result, rank;   /* lower rank merges first */
} bpe_merge;

/* What a tokenizer is made of, for bpe_build (import and train fill one in). */
typedef struct bpe_spec {
    uint32_t vocab_size;
    const uint8_t *kind;             /* [vocab_size] bpe_kind */
    const uint8_t *const *tok;       /* [vocab_size] bytes of each token */
    const uint32_t *len;             /* [vocab_size] */
    const bpe_merge *merges;
    uint32_t n_merges;
    const char *const *patterns;     /* the pre-tokenizer */
    size_t n_patterns;
    uint32_t flags;
    uint32_t bos, eos, pad;          /* BPE_NONE when absent */
} bpe_spec;

typedef struct bpe bpe;

/* Checks the spec as the loader checks a file (it serialises it and loads that image). */
int bpe_build(bpe **b, const bpe_spec *s, dsv3_err *e);
int bpe_load(bpe **b, const char *path, dsv3_err *e);
/* name is used in messages; the bytes are copied. */
int bpe_load_mem(bpe **b, const void *data, size_t n, const char *name, dsv3_err *e);
/* Atomic (lib/outfile); "-" is standard output. */
int bpe_save(const bpe *b, const char *path, dsv3_err *e);
void bpe_free(bpe *b);

uint32_t bpe_vocab_size(const bpe *b);
uint32_t bpe_n_merges(const bpe *b);
const bpe_merge *bpe_merges(const bpe *b);
uint32_t bpe_flags(const bpe *b);
bpe_kind bpe_token_kind(const bpe *b, uint32_t id);
const uint8_t *bpe_token(const bpe *b, uint32_t id, size_t *len);
uint32_t bpe_byte_token(const bpe *b, uint8_t byte);
/* The id of a regular (non-special) token with these bytes, or BPE_NONE. */
uint32_t bpe_lookup(const bpe *b, const uint8_t *s, size_t n);
/* The id of the special token with these bytes, or BPE_NONE. */
uint32_t bpe_lookup_special(const bpe *b, const uint8_t *s, size_t n);
uint32_t bpe_bos(const bpe *b);
uint32_t bpe_eos(const bpe *b);
uint32_t bpe_pad(const bpe *b);
const pretok *bpe_pretok(const bpe *b);
/* 64-bit hash of the file's payload: the shard header's tokenizer_id. Never 0. */
uint64_t bpe_id(const bpe *b);

/* GPT-2's byte-level alphabet: every byte as a printable code point (HF ByteLevel). */
uint32_t bpe_byte_to_char(uint8_t byte);
int bpe_char_to_byte(uint32_t cp);   /* -1 if cp is not in the alphabet */

/* ---- encoding ---- */

typedef struct bpe_ids {
    uint32_t *v;
    size_t n, cap;
} bpe_ids;

int bpe_ids_push(bpe_ids *ids, uint32_t id);
void bpe_ids_free(bpe_ids *ids);

typedef struct bpe_encode_opts {
    int allow_special;      /* special-token strings in the text become their ids */
    double split_combined;  /* probability of cutting a punctuation+line-break piece in two */
    uint64_t seed;          /* for split_combined: set per document for reproducible output */
} bpe_encode_opts;

typedef struct bpe_encoder bpe_encoder;

int bpe_encoder_new(bpe_encoder **enc, const bpe *b, dsv3_err *e);
void bpe_encoder_free(bpe_encoder *enc);
/* Appends the ids of text[0..n) to out. Any bytes encode, invalid UTF-8 included. */
int bpe_encode(bpe_encoder *enc, const uint8_t *text, size_t n, const bpe_encode_opts *o,
               bpe_ids *out, dsv3_err *e);
/* Appends the ids of one pre-token (no pre-tokenizer, no special tokens). */
int bpe_encode_piece(bpe_encoder *enc, const uint8_t *s, size_t n, bpe_ids *out, dsv3_err *e);

/* ---- decoding ---- */

typedef struct bpe_bytes {
    uint8_t *v;
    size_t n, cap;
} bpe_bytes;

/* Appends the bytes of ids to out; skip_special leaves special tokens out. An id that is
 * out of range or unused is an error naming its position. */
int bpe_decode(const bpe *b, const uint32_t *ids, size_t n, int skip_special, bpe_bytes *out,
               dsv3_err *e);
int bpe_bytes_append(bpe_bytes *o, const void *s, size_t n);
void bpe_bytes_free(bpe_bytes *o);

/* The seed of document doc (counted from 0 in the input) for a run seeded with seed: the
 * output of a multi-threaded encoder must not depend on which thread took the document. */
uint64_t bpe_doc_seed(uint64_t seed, uint64_t doc);

#endif
