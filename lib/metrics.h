/* metrics: RUN/metrics.jsonl, one JSON object a line, for plots and for people.
 *
 * Owns the file: opened fresh for a new run; on a resume, the lines of steps after the
 * checkpoint (written before an interruption, and about to be written again) are dropped
 * first, atomically, so the file reads as one uninterrupted run. Each line is flushed as it
 * is written: a crash loses at most the line being written, and a reader skips a last line
 * without its newline. The fields are the trainer's (docs/train-format.md). */
#ifndef DSV3_METRICS_H
#define DSV3_METRICS_H

#include <stdint.h>
#include <stdio.h>

#include "err.h"

typedef struct json_t json_t;

typedef struct metrics {
    FILE *f;
    char *path;
} metrics;

/* Opens RUN/metrics.jsonl: emptied when fresh is 1; otherwise the lines whose "step" is at
 * most keep_through are kept (the rest dropped) and new lines are appended. */
int metrics_open(metrics *m, const char *run, int fresh, uint64_t keep_through, dsv3_err *e);

/* Writes obj as one compact line and flushes; takes the reference to obj. */
int metrics_write(metrics *m, json_t *obj, dsv3_err *e);

void metrics_close(metrics *m);

#endif
