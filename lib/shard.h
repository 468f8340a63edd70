/* shard: the container for everything made of tokens (docs/formats.md has the byte layout).
 *
 * A shard is a header, a run of independently zstd-compressed chunks each guarded by xxh3
 * checksums, an index of the chunks and a fixed footer. It is written front to back (so it
 * can go to a pipe) and read front to back (so it can come from one); a regular file can
 * also be opened for random access through the index. Records are documents (kind
 * SHARD_DOCS, any length, with per-document flags) or packed training sequences (kind
 * SHARD_PACKED, all of the header's seq_len). A record may span chunks, so one document of
 * any size fits. Every damage the reader can detect stops it with a message naming the file
 * and the byte offset; it never hands out a token from a chunk it could not verify. */
#ifndef DSV3_SHARD_H
#define DSV3_SHARD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

enum { SHARD_VERSION = 1 };

typedef enum { SHARD_DOCS = 1, SHARD_PACKED = 2 } shard_kind;

/* Per-record flags (32 bits). Bits 0-15 are defined here; 16-31 are free for programs. */
enum {
    SHARD_DOC_CODE = 1u << 0,   /* source code: eligible for FIM when restricted to code */
    SHARD_DOC_FIM = 1u << 1,    /* this record was rearranged by FIM */
};

typedef struct shard_params {
    shard_kind kind;
    uint32_t seq_len;       /* SHARD_PACKED: tokens per record; 0 for SHARD_DOCS */
    uint32_t vocab_size;    /* 0: not stated; otherwise every token must be below it */
    uint64_t tokenizer_id;  /* 0: not stated; identifies the tokenizer that made the tokens */
    uint32_t chunk_tokens;  /* tokens per chunk before compression (default 1 Mi) */
    int level;              /* zstd level (default 3) */
    int shuffle;            /* byte-plane shuffle of tokens before compression (default 0) */
    int threads;            /* chunks compressed in parallel on this many threads (0: in the
                               caller's thread); the file's bytes are the same for any count */
} shard_params;

void shard_params_default(shard_params *p, shard_kind kind);

/* ---- writing ---- */

typedef struct shard_writer shard_writer;

/* path "-" writes to standard output; any other path appears only on shard_writer_close. */
int shard_writer_open(shard_writer **w, const char *path, const shard_params *p, dsv3_err *e);
/* Appends tokens to the record being written, which shard_end_record then closes. */
int shard_write(shard_writer *w, const uint32_t *tokens, size_t n, dsv3_err *e);
int shard_end_record(shard_writer *w, uint32_t flags, dsv3_err *e);
int shard_write_record(shard_writer *w, const uint32_t *tokens, size_t n, uint32_t flags,
                       dsv3_err *e);
/* Writes the index and footer and commits the file; frees w whatever the outcome. */
int shard_writer_close(shard_writer *w, dsv3_err *e);
/* Seconds spent compressing so far, summed over threads (for reports of where time went). */
double shard_writer_compress_seconds(shard_writer *w);
/* Discards everything: the named output never appears. Frees w. */
void shard_writer_abort(shard_writer *w);

/* ---- reading ---- */

typedef struct shard_reader shard_reader;

typedef struct shard_info {
    uint32_t version;
    shard_kind kind;
    uint32_t token_bytes;
    uint32_t seq_len;
    uint32_t vocab_size;
    uint32_t chunk_tokens;
    uint64_t tokenizer_id;
    int counts_known;       /* header counts present (the file was written seekable) */
    uint64_t n_records;     /* from the header, or from the index once known */
    uint64_t n_tokens;
    int index_known;        /* random access: the index was read at open */
    uint64_t n_chunks;      /* from the index, when known */
} shard_info;

typedef struct shard_record {
    const uint32_t *tokens; /* valid until the next call on the reader */
    uint64_t n_tokens;
    uint32_t flags;
    uint64_t index;         /* record number in the shard, from 0 */
} shard_record;

typedef struct shard_stats {
    uint64_t records, tokens, chunks;
    uint64_t bytes_compressed;  /* chunk payloads as stored */
    uint64_t bytes_raw;         /* chunk payloads uncompressed */
    uint64_t bytes_file;        /* everything read so far */
    uint32_t max_token;
    uint64_t min_record, max_record;
} shard_stats;

typedef struct shard_chunk_entry {
    uint64_t offset, first_record, first_token;
} shard_chunk_entry;

/* path "-" reads standard input. A regular file is opened for random access (its footer
 * and index are read and checked now); a pipe is read front to back. */
int shard_open(shard_reader **r, const char *path, dsv3_err *e);
/* As shard_open on a stream the caller owns (closed by shard_close only if own). */
int shard_open_stream(shard_reader **r, FILE *f, const char *name, int own, dsv3_err *e);
const shard_info *shard_get_info(const shard_reader *r);
const shard_stats *shard_get_stats(const shard_reader *r);
/* Next record: returns 1 with *rec filled, 0 at the end (after the index and footer have
 * been checked against everything read), -1 on damage or a read error. */
int shard_next(shard_reader *r, shard_record *rec, dsv3_err *e);
/* Positions the reader so shard_next returns record i (i == n_records: the end).
 * Needs random access. */
int shard_seek(shard_reader *r, uint64_t record, dsv3_err *e);
/* The index entry of chunk c (random access only). */
int shard_chunk(const shard_reader *r, uint64_t c, shard_chunk_entry *out, dsv3_err *e);
/* Reads every remaining record, checking everything; fills the stats. */
int shard_verify(shard_reader *r, dsv3_err *e);
void shard_close(shard_reader *r);

const char *shard_kind_name(shard_kind k);

#endif
