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
