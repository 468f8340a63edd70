/* progress: the one-line progress report on stderr for long work.
 *
 * "label: done/total unit (pct), rate unit/s, time left" redrawn in place at most four
 * times a second on a terminal (a whole line every 10 s into a log), only when enabled (stderr is a terminal, or --progress); --quiet silences
 * it. The line is cleared by progress_finish so later messages start on a clean line. */
#ifndef DSV3_PROGRESS_H
#define DSV3_PROGRESS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"

typedef struct progress {
    int enabled;
    FILE *out;
    const char *label;
    const char *unit;
    uint64_t total;   /* 0: unknown, then no percentage and no time left */
    uint64_t done;
    double t_start;   /* seconds, monotonic */
    double t_last;    /* last redraw */
    int drawn;        /* something is on the line */
    int tty;          /* redraw in place; otherwise whole lines every 10 s, for logs */
} progress;

void progress_start(progress *p, cli_progress_mode mode, const char *label, const char *unit,
                    uint64_t total);
void progress_update(progress *p, uint64_t done);
void progress_finish(progress *p);

/* The text of one report, for tests and for final summaries. */
void progress_format(char *buf, size_t n, const char *label, const char *unit, uint64_t done,
                     uint64_t total, double seconds);

/* 1234567 -> "1.23M"; below 10000 printed whole. */
void progress_human(char *buf, size_t n, double v);

/* Monotonic clock in seconds. */
double progress_now(void);

#endif
