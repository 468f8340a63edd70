/* cli: the conventions every dsv3 program keeps at its edge.
 *
 * Shared long options (--help, --version, --quiet, --progress), checked number parsing, and
 * the two ways a program ends badly: a usage error (status 2, with a pointer to --help) and
 * a run-time failure (status 1, the library's message printed once). This is the one module
 * allowed to end the process, and only cmd/ calls those functions. */
#ifndef DSV3_CLI_H
#define DSV3_CLI_H

#include <getopt.h>
#include <stdint.h>

#include "err.h"

enum {
    CLI_EXIT_OK = 0,
    CLI_EXIT_FAILURE = 1,
    CLI_EXIT_USAGE = 2,
};

/* Long-option codes of the shared options, above any short option character. */
enum {
    CLI_OPT_HELP = 0x1000,
    CLI_OPT_VERSION,
    CLI_OPT_QUIET,
    CLI_OPT_PROGRESS,
};

#define CLI_COMMON_OPTIONS                                 \
    {"help", no_argument, NULL, CLI_OPT_HELP},             \
    {"version", no_argument, NULL, CLI_OPT_VERSION},       \
    {"quiet", no_argument, NULL, CLI_OPT_QUIET},           \
    {"progress", no_argument, NULL, CLI_OPT_PROGRESS}

typedef enum { PROGRESS_AUTO, PROGRESS_ON, PROGRESS_OFF } cli_progress_mode;

typedef struct cli_program {
    const char *name;  /* "dsv3-shard" */
    const char *help;  /* the whole --help text */
} cli_program;

typedef struct cli_common {
    cli_progress_mode progress;
    int quiet;
} cli_common;

/* Handles a shared option. Returns 1 if c was one (exits for --help and --version), else 0.
 * Also handles '?' from getopt_long (an unknown option) as a usage error. */
int cli_common_option(const cli_program *p, int c, cli_common *st);

/* The version line, the same for every program: "dsv3-xxx VERSION". */
const char *cli_version(void);

/* Usage error: "NAME: message" and "Try 'NAME --help'." on stderr, exit 2. */
_Noreturn void cli_usage(const cli_program *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Run-time failure: "NAME: message" on stderr, exit 1. */
_Noreturn void cli_fail(const cli_program *p, const dsv3_err *e);
_Noreturn void cli_failf(const cli_program *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Whole-string number parsing with range checks; the message names the option. Accepts
 * the suffixes k, M, G (powers of 1000) and Ki, Mi, Gi (powers of 1024) for counts. */
int cli_parse_u64(const char *opt, const char *s, uint64_t min, uint64_t max, uint64_t *out,
                  dsv3_err *e);
int cli_parse_double(const char *opt, const char *s, double min, double max, double *out,
                     dsv3_err *e);

#endif
