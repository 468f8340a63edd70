/* bpetrain: learning a byte-level BPE vocabulary from text.
 *
 * Two phases. Counting: documents are cut into pre-tokens (lib/pretok) by worker threads,
 * each counting distinct pre-tokens in its own table; the tables are summed at the end. Memory
 * is proportional to the distinct pre-tokens, and max_words caps it: a table that outgrows the
 * cap drops its rarest pre-tokens (reported in the stats). Merging: every distinct pre-token
 * is a word of symbols weighted by its count; pair counts live in a hash table with, per pair,
 * the words it occurs in; a max-heap of (count, pair) picks each merge. A merge rewrites only
 * the words holding the pair and updates the counts of the pairs around it, and heap entries
 * whose count went stale are refreshed when they surface (counts only fall, except for the
 * new pairs, which are pushed). Ties go to the lower (left id, right id): the result depends
 * on the corpus only, never on thread timing. */
#ifndef DSV3_BPETRAIN_H
#define DSV3_BPETRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "bpe.h"
#include "err.h"

typedef struct bpetrain_opts {
    uint32_t n_merges;               /* learned tokens wanted */
    const char *const *patterns;     /* pre-tokenizer */
    size_t n_patterns;
    const char *const *lead;         /* special tokens at ids 0.. (BOS, EOS, PAD by default) */
    size_t n_lead;
    const char *const *trail;        /* special tokens after the learned ones */
    size_t n_trail;
    uint32_t bos, eos, pad;          /* roles as indexes into lead[], BPE_NONE for none */
    uint64_t max_words;              /* cap on distinct pre-tokens held (0: no cap) */
    uint64_t min_frequency;          /* stop when the best pair is rarer than this */
    int threads;                     /* counting threads (>= 1) */
    /* called every few hundred merges and at the end; may be NULL */
    void (*on_merge)(void *ctx, uint32_t done);
    void *ctx;
} bpetrain_opts;

typedef struct bpetrain_stats {
    uint64_t bytes;          /* text counted */
    uint64_t words;          /* distinct pre-tokens kept */
    uint64_t pruned;         /* distinct pre-tokens dropped by max_words */
    uint64_t pairs;          /* distinct pairs ever seen */
    uint32_t merges;         /* merges learned */
    uint64_t peak_bytes;     /* largest memory held by the counting and merging tables */
} bpetrain_stats;

typedef struct bpetrain bpetrain;

int bpetrain_new(bpetrain **t, const bpetrain_opts *o, dsv3_err *e);
/* Counts a batch of documents, spread over the threads. */
int bpetrain_count(bpetrain *t, const uint8_t *const *docs, const size_t *lens, size_t n,
                   dsv3_err *e);
/* Learns the merges and builds the tokenizer. */
int bpetrain_finish(bpetrain *t, bpe **out, dsv3_err *e);
const bpetrain_stats *bpetrain_get_stats(const bpetrain *t);
void bpetrain_free(bpetrain *t);

#endif
