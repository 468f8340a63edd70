#include "progress.h"

#include <string.h>
#include <time.h>
#include <unistd.h>

double progress_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void progress_human(char *buf, size_t n, double v)
{
    static const char *suffix[] = {"", "k", "M", "G", "T", "P"};
    if (v < 10000.0) {
        snprintf(buf, n, "%.0f", v);
        return;
    }
    int i = 0;
    while (v >= 1000.0 && i < 5) {
        v /= 1000.0;
        i++;
    }
    snprintf(buf, n, "%.*f%s", v < 10 ? 2 : v < 100 ? 1 : 0, v, suffix[i]);
}

static void format_duration(char *buf, size_t n, double s)
{
    if (s < 0 || s > 1e8) {
        snprintf(buf, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

void progress_format(char *buf, size_t n, const char *label, const char *unit, uint64_t done,
                     uint64_t total, double seconds)
{
    char d[32], t[32], r[32], left[32];
    double rate = seconds > 0 ? (double)done / seconds : 0.0;
    progress_human(d, sizeof d, (double)done);
    progress_human(r, sizeof r, rate);
    if (total) {
        progress_human(t, sizeof t, (double)total);
        double pct = 100.0 * (double)done / (double)total;
        format_duration(left, sizeof left, rate > 0 ? (double)(total - (done < total ? done : total)) / rate : -1);
        snprintf(buf, n, "%s: %s/%s %s (%.0f%%), %s %s/s, %s left", label, d, t, unit, pct, r,
                 unit, left);
    } else {
        format_duration(left, sizeof left, seconds);
        snprintf(buf, n, "%s: %s %s, %s %s/s, %s elapsed", label, d, unit, r, unit, left);
    }
}

void progress_start(progress *p, cli_progress_mode mode, const char *label, const char *unit,
                    uint64_t total)
{
    memset(p, 0, sizeof *p);
    p->out = stderr;
    p->tty = isatty(STDERR_FILENO);
    p->enabled = mode == PROGRESS_ON || (mode == PROGRESS_AUTO && p->tty);
    p->label = label;
    p->unit = unit;
    p->total = total;
    p->t_start = p->t_last = progress_now();
}

static void redraw(progress *p, double now)
{
    char line[256];
    progress_format(line, sizeof line, p->label, p->unit, p->done, p->total, now - p->t_start);
    if (p->tty)
        fprintf(p->out, "\r%s\033[K", line);
    else
        fprintf(p->out, "%s\n", line);  /* a log file gets whole lines, no escapes */
    fflush(p->out);
    p->t_last = now;
    p->drawn = 1;
}

void progress_update(progress *p, uint64_t done)
{
    p->done = done;
    if (!p->enabled)
        return;
    double now = progress_now();
    if (now - p->t_last >= (p->tty ? 0.25 : 10.0))
        redraw(p, now);
}

void progress_finish(progress *p)
{
    if (!p->enabled)
        return;
    redraw(p, progress_now());
    if (p->tty)
        fputc('\n', p->out);
    fflush(p->out);
    p->drawn = 0;
}
