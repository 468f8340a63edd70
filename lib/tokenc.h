/* tokenc: documents to token ids on many threads, written in input order: the pipeline
 * behind `dsv3-tok encode`.
 *
 * One thread reads batches of documents (lib/docin) into a ring of slots, the encoder
 * threads take whole slots in order (each with its own bpe_encoder; JSONL records are
 * parsed there too), and the calling thread hands the slots' ids, in order, to a shard
 * writer (whose own threads compress the chunks: lib/shard) or prints them as lines of
 * decimal ids. Batches are small, so the pipeline fills and drains quickly, and nothing in
 * the output depends on the thread count: document i is encoded with bpe_doc_seed(seed, i),
 * i counting the documents written. */
#ifndef DSV3_TOKENC_H
#define DSV3_TOKENC_H

#include <stdint.h>
#include <stdio.h>

#include "bpe.h"
#include "docin.h"
#include "err.h"
#include "progress.h"
#include "shard.h"

typedef struct tokenc_opts {
    int threads;             /* encoder threads (at least 1) */
    bpe_encode_opts enc;     /* its seed is the run's; each document gets its own from it */
    int bos, eos;            /* begin / end every document with the tokenizer's BOS / EOS */
    int skip_bad;            /* as given to docin_open: bad JSONL records are left out */
    size_t batch_bytes;      /* text per slot (0: 256 KiB) */
} tokenc_opts;

/* What the run did, and where each stage spent its time (seconds, summed over threads). */
typedef struct tokenc_stats {
    uint64_t docs, bytes, tokens;
    double wall;
    double read, read_wait;        /* the reader reading; waiting for a free slot */
    double encode, encode_wait;    /* encoders at work (parse included); idle */
    double sink, sink_wait;        /* the caller writing (compression hand-off included);
                                      waiting for the next slot to be encoded */
} tokenc_stats;

/* Encodes every document of d into w, or, with w NULL, prints a line of ids per document
 * to ids. pr (may be NULL) is advanced by input bytes. On error nothing more is written
 * and the caller aborts its output. */
int tokenc_run(const bpe *b, docin *d, const tokenc_opts *o, shard_writer *w, FILE *ids,
               progress *pr, tokenc_stats *st, dsv3_err *e);

#endif
