/* err: the error record that every fallible library call fills in.
 *
 * Library code never prints and never exits. A function that fails writes one message into
 * the caller's dsv3_err (naming the file and the position where that makes sense) and
 * returns -1; the program in cmd/ prints it once as "dsv3-xxx: message" and picks the exit
 * status. A NULL dsv3_err is allowed and discards the message. */
#ifndef DSV3_ERR_H
#define DSV3_ERR_H

#include <stddef.h>

#ifdef __cplusplus /* kernels/ are compiled as C++ by nvcc */
extern "C" {
#endif

typedef struct dsv3_err {
    char msg[1024];
} dsv3_err;

/* Formats the message into e and returns -1, so error paths read `return err_set(e, ...)`. */
int err_set(dsv3_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* As err_set, with ": strerror(errno)" appended (errno as it was on entry). */
int err_errno(dsv3_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the message already in e with "prefix: ", for adding context on the way up. */
int err_prefix(dsv3_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void err_clear(dsv3_err *e);

#ifdef __cplusplus
}
#endif

#endif
