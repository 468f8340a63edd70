/* outfile: output files that are complete or absent.
 *
 * A named output is written to a hidden temporary file in the same directory, and only
 * outfile_commit makes it visible: flush, fsync, rename over the final name, fsync the
 * directory. A crash or an outfile_abort leaves the final name untouched (a stale
 * ".NAME.tmp.PID" may remain after a crash; nothing reads it). "-" means standard output,
 * which cannot be made atomic: a reader of our formats detects a stream cut short by its
 * missing trailer. So is an existing device or named pipe (-o /dev/null): renaming a file
 * over it would replace the device. */
#ifndef DSV3_OUTFILE_H
#define DSV3_OUTFILE_H

#include <stdio.h>

#include "err.h"

typedef struct outfile {
    FILE *f;          /* where to write */
    char *path;       /* final name, NULL for stdout */
    char *tmp;        /* temporary name, NULL for stdout */
    int seekable;     /* 1 for a regular file: callers may seek back to patch headers */
} outfile;

int outfile_open(outfile *o, const char *path, dsv3_err *e);
int outfile_commit(outfile *o, dsv3_err *e);
void outfile_abort(outfile *o);

/* The name to use in messages: the final path, or "<stdout>". */
const char *outfile_name(const outfile *o);

#endif
