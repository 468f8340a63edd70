/* docin: documents from files, in batches, for the programs that read text corpora.
 *
 * One document per file (text), per line (lines, without its '\n'), or per JSON record
 * (jsonl: one object per line, the document in a string field, "text" by default). Auto
 * picks jsonl for *.jsonl / *.ndjson names and for input whose first byte is '{', else
 * text. A bad JSON record stops the reader with a message naming the file and line, unless
 * skip_bad, which counts it. JSON parsing is the slow part of reading (jansson runs at about
 * 30 MB/s), so a batch's records are parsed on several threads at the end of docin_next.
 * Batches own their bytes until the next call. */
#ifndef DSV3_DOCIN_H
#define DSV3_DOCIN_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef enum { DOCIN_AUTO, DOCIN_TEXT, DOCIN_LINES, DOCIN_JSONL } docin_mode;

typedef struct docin docin;

/* files "-" is standard input; n == 0 reads standard input. */
int docin_open(docin **d, char *const *files, size_t n, docin_mode mode, const char *field,
               int skip_bad, dsv3_err *e);
/* The next batch of about max_bytes (at least one document): returns the count, 0 at the
 * end, -1 on error. */
long docin_next(docin *d, size_t max_bytes, const uint8_t *const **docs, const size_t **lens,
                dsv3_err *e);
/* A reader whose only document is text[0..n) (not copied: it must outlive d). */
int docin_open_mem(docin **d, const void *text, size_t n, dsv3_err *e);

/* ---- batches the caller owns, for pipelines: one thread reads while others encode ----
 * docin_read fills b with the next batch of about max_bytes (at least one document) and
 * returns the count, 0 at the end, -1 on error; it leaves JSONL records raw, so their
 * parsing can run on the threads that use them: docin_batch_doc parses record i in place
 * (different i may run on different threads at once) and returns 1 for a bad record, which
 * the caller hands, in document order, to docin_batch_bad: with skip_bad it is counted
 * (returns 0, leave the record out), else -1 with the message naming file and line. */
typedef struct docin_batch docin_batch;

docin_batch *docin_batch_new(void);
void docin_batch_free(docin_batch *b);
long docin_read(docin *d, docin_batch *b, size_t max_bytes, dsv3_err *e);
size_t docin_batch_count(const docin_batch *b);
int docin_batch_doc(const docin *d, docin_batch *b, size_t i, const uint8_t **doc, size_t *len);
int docin_batch_bad(docin *d, docin_batch *b, size_t i, dsv3_err *e);
/* Gives back the arena of a batch grown past keep bytes (after a huge document). */
void docin_batch_trim(docin_batch *b, size_t keep);

/* Text mode delivers each file in pieces of about this many bytes, each ending at a line
 * break: for training, where a document boundary only cuts a pre-token, and memory must not
 * grow with the largest file. 0 (the default) keeps a file one document. */
void docin_set_pieces(docin *d, size_t bytes);
/* jsonl: parse each batch's records on this many threads (default 1). */
void docin_set_threads(docin *d, int threads);
uint64_t docin_skipped(const docin *d);
uint64_t docin_bytes(const docin *d);   /* input bytes read so far */
void docin_close(docin *d);

/* "text", "lines", "jsonl" or "auto"; -1 if none. */
int docin_mode_parse(const char *s, docin_mode *m);

#endif
