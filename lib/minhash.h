/* minhash: near-duplicate detection over token documents (MinHash + LSH banding).
 *
 * Owns the near-dedup stage of dsv3-pack, after datatrove's MinHash stages (signature,
 * buckets, clusters) but in one process: every document's token n-grams ("shingles") are
 * hashed (XXH3-64), each of bands*rows hash functions keeps its minimum over the shingles,
 * and each band of `rows` minima is reduced to one 64-bit band key. Documents whose keys
 * agree in any band are candidate pairs; candidates are joined by union-find and every
 * cluster keeps its first document (lowest index, so input order decides). The chance that
 * two documents of n-gram Jaccard similarity s collide in some band is
 * 1 - (1 - s^rows)^bands: with datatrove's 14 x 8 that is 0.92 at s = 0.8, 0.56 at 0.7, 0.05
 * at 0.5.
 *
 * Signatures are computed on `threads` threads (each document's result depends only on its
 * tokens, so the output is the same for any thread count); bands are bucketed by sorting
 * (key, document) pairs one band at a time. Memory: 8*bands bytes per document for the band
 * keys, 8 for union-find, and 16 per document for the band being sorted (datatrove's
 * defaults: 136 bytes per document). */
#ifndef DSV3_MINHASH_H
#define DSV3_MINHASH_H

#include <stdint.h>

#include "err.h"

enum { MINHASH_MAX_HASHES = 1024 };

typedef struct minhash_params {
    uint32_t ngram;     /* tokens per shingle (datatrove: 5) */
    uint32_t bands;     /* LSH bands (datatrove: 14) */
    uint32_t rows;      /* hashes per band (datatrove: 8) */
    uint64_t seed;      /* of the hash functions (fixed default: results do not move with
                           the packing seed) */
    int threads;        /* signature threads; 0: one per online CPU */
} minhash_params;

void minhash_params_default(minhash_params *p);
/* Checks ranges: ngram >= 1, bands >= 1, rows >= 1, bands*rows <= MINHASH_MAX_HASHES. */
int minhash_params_check(const minhash_params *p, dsv3_err *e);

/* The hash functions of a run: h_i(x) = high 32 bits of (a_i * x + b_i) mod 2^64, x the
 * shingle's XXH3-64 (multiply-add-shift; a_i odd). */
typedef struct minhash_fns {
    uint32_t n;
    uint64_t a[MINHASH_MAX_HASHES], b[MINHASH_MAX_HASHES];   /* rounded up to 8 used */
} minhash_fns;

void minhash_fns_init(minhash_fns *f, uint32_t n, uint64_t seed);
/* sig[0..f->n) = the MinHash signature of t[0..n). A document shorter than ngram tokens is
 * one shingle of all its tokens; an empty one gets all-ones (UINT32_MAX) minima. */
void minhash_signature(const minhash_fns *f, uint32_t ngram, const uint32_t *t, uint64_t n,
                       uint32_t *sig);

typedef struct minhash_stats {
    uint64_t candidate_pairs;   /* adjacent equal keys met while bucketing (all bands) */
    uint64_t clusters;          /* clusters of two or more documents */
    uint64_t removed;           /* documents that are not the first of their cluster */
    uint64_t bytes;             /* memory of the stage at its largest */
} minhash_stats;

/* Document i is tok[off[i] .. off[i+1] - trailing) (trailing: tokens appended to every
 * document, such as EOS, that are not part of its text). On return keep_as[i] is i for a
 * document kept and, for a removed one, the document kept for its cluster (< i). */
int minhash_dedup(const minhash_params *p, const uint32_t *tok, const uint64_t *off,
                  uint64_t n_docs, uint32_t trailing, uint64_t *keep_as, minhash_stats *st,
                  dsv3_err *e);

#endif
