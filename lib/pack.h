/* pack: document streams in, a folder of packed training shards out (docs/pack-format.md).
 *
 * Owns the whole of dsv3-pack's work between reading and writing: the in-memory corpus of
 * documents (each ended by EOS), exact dedup by XXH3-128, packing into records of
 * seq_len+1 tokens (greedy with a one-token overlap, or best-fit-decreasing of whole
 * documents), the seeded global shuffle, the train/validation split, and the output folder
 * (shards, boundary side shards, manifest.json) written under a temporary name and renamed
 * only when complete. Near-duplicate removal (lib/minhash) runs on the whole corpus before
 * packing, and FIM (at token boundaries, or at character boundaries through lib/fim when a
 * tokenizer is given) then applies to the documents that survive, in input order. The corpus
 * is held in memory: 4 bytes per token plus 12 bytes per document, plus the dedup tables. */
#ifndef DSV3_PACK_H
#define DSV3_PACK_H

#include <stdint.h>

#include "err.h"
#include "minhash.h"
#include "progress.h"

struct bpe;

/* Flag of a packed record (bits 16-31 of the shard's record flags belong to programs):
 * token 0 repeats the previous sequence's last token in packing order (greedy packing's
 * one-token overlap), so it is not a new token of the corpus. */
enum { PACK_SEQ_CONT = 1u << 16 };

/* Boundary records (one per packed record, in *.bounds.shard) are
 * [n_valid, seg_0, seg_1, ...]: tokens at n_valid and after are padding; seg_i are the
 * ascending offsets where a segment (a document, or the part of one) begins. Offsets are
 * below 2^28, so bit 31 is free to mark a segment that continues a document begun in an
 * earlier record (attention still starts afresh there: the trainer never sees the start). */
enum { PACK_BOUND_CONT = 1u << 31 };

typedef struct pack_options {
    uint32_t seq_len;       /* L: the trainer's context; records hold L+1 tokens */
    uint32_t eos_id;        /* appended to every document */
    uint32_t pad_id;        /* fills the tail of a record only where unavoidable */
    int best_fit;           /* 1: best-fit-decreasing of whole documents (Ding et al. 2024) */
    int dedup;              /* 1: drop exact repeats (XXH3-128 of the tokens) */
    uint64_t seed;          /* shuffle and split */
    uint64_t shard_tokens;  /* tokens per output shard (rounded down to whole records, >= 1) */
    double val_fraction;    /* share of sequences set aside for validation */
    int level;              /* zstd level of the output */
    double fim_rate;        /* share of documents rearranged prefix-suffix-middle */
    double fim_spm_rate;    /* share rearranged suffix-prefix-middle (disjoint from the above) */
    uint32_t fim_ids[3];    /* <fim_begin>, <fim_hole>, <fim_end> */
    int fim_code_only;      /* FIM only documents flagged SHARD_DOC_CODE */
    int near_dedup;         /* 1: drop near duplicates (MinHash LSH, lib/minhash) */
    minhash_params near;    /* its n-gram size, bands, rows, threads */
    int log_removed;        /* 1: list every removed document in DIR/removed.tsv */
    const struct bpe *tok;  /* optional: FIM at character boundaries; inputs must match it */
    const char *tok_name;   /* its file, for messages */
    progress *progress;     /* optional: reading progress, in tokens */
} pack_options;

void pack_options_default(pack_options *o);

typedef struct pack_counts {
    uint64_t inputs;
    uint64_t input_docs, input_tokens;      /* as read, before dedup, without EOS */
    uint64_t dup_docs, dup_tokens;          /* removed by --dedup */
    uint64_t docs, tokens;                  /* kept; tokens include one EOS per document */
    uint64_t sequences, train_sequences, val_sequences;
    uint64_t train_shards, val_shards;
    uint64_t pad_tokens;                    /* padding written in all records */
    uint64_t split_docs;                    /* documents spread over more than one record */
    uint64_t dedup_table_bytes;             /* memory of the dedup table at its largest */
    uint64_t fim_psm, fim_spm;              /* documents rearranged by FIM */
    uint64_t fim_token_cut;                 /* of those, cut at token boundaries although a
                                               tokenizer was given (they hold special tokens) */
    uint64_t near_docs, near_tokens;        /* removed by --near-dedup */
    uint64_t near_clusters;                 /* clusters of two or more (one kept from each) */
    uint64_t near_pairs;                    /* candidate pairs (band collisions) */
    uint64_t near_bytes;                    /* memory of the near-dedup stage at its largest */
    double near_seconds, near_cpu_seconds;  /* its wall and CPU time, all threads (not in the
                                               manifest: its bytes depend only on inputs,
                                               options and seed) */
} pack_counts;

typedef struct pack pack;

int pack_new(pack **p, const pack_options *o, dsv3_err *e);
/* Reads one document stream ("-": standard input) into the corpus. The first input fixes
 * vocab_size and tokenizer_id; a later input that differs is refused, naming both files. */
int pack_add_input(pack *p, const char *path, dsv3_err *e);
/* Packs, shuffles, splits and writes the folder `outdir`, which must not exist yet. On
 * failure nothing named outdir appears. `argv_line` is recorded in the manifest. */
int pack_write(pack *p, const char *outdir, const char *argv_line, dsv3_err *e);
const pack_counts *pack_get_counts(const pack *p);
void pack_free(pack *p);

/* Fill-in-the-Middle at token boundaries: cuts t[0..n) at two uniform points into prefix,
 * middle, suffix and writes n+3 tokens to out, PSM: BEGIN prefix HOLE suffix END middle;
 * SPM (spm = 1): BEGIN HOLE suffix END prefix middle (Bavarian et al. 2022's SPM with
 * DeepSeek's three tokens). */
void pack_fim(uint32_t *out, const uint32_t *t, uint64_t n, int spm, const uint32_t ids[3],
              uint64_t *rng);

/* xxh3-64 (seed 0) of a whole file and its size, as the manifest records them. */
int pack_file_hash(const char *path, uint64_t *hash, uint64_t *size, dsv3_err *e);

/* The deterministic generator of pack and loader (splitmix64): a value below n, unbiased. */
uint64_t pack_rand_below(uint64_t *state, uint64_t n);
/* A seeded permutation of 0..n-1 (Fisher-Yates). */
void pack_permutation(uint64_t *perm, uint64_t n, uint64_t seed);

#endif
