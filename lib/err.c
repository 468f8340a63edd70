#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int err_set(dsv3_err *e, const char *fmt, ...)
{
    if (!e)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int err_errno(dsv3_err *e, const char *fmt, ...)
{
    int saved = errno;
    if (!e)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof e->msg)
        snprintf(e->msg + n, sizeof e->msg - (size_t)n, ": %s", strerror(saved));
    return -1;
}

int err_prefix(dsv3_err *e, const char *fmt, ...)
{
    if (!e)
        return -1;
    char prefix[512], old[sizeof e->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    size_t np = strlen(prefix), no = strnlen(old, sizeof old - 1);
    size_t room = sizeof e->msg - 1;
    if (np > room)
        np = room;
    memcpy(e->msg, prefix, np);
    size_t at = np;
    for (const char *sep = ": "; *sep && at < room; sep++)
        e->msg[at++] = *sep;
    if (no > room - at)
        no = room - at;
    memcpy(e->msg + at, old, no);
    e->msg[at + no] = '\0';
    return -1;
}

void err_clear(dsv3_err *e)
{
    if (e)
        e->msg[0] = '\0';
}
