/* Tests of lib/cli (number parsing) and lib/err (message building). */
#include "../../lib/cli.h"
#include "../../lib/err.h"
#include "../test.h"

#include <errno.h>

static void parse_u64_accepts_numbers_and_suffixes(void)
{
    uint64_t v;
    dsv3_err e;
    CHECK(cli_parse_u64("-n", "0", 0, 10, &v, &e) == 0 && v == 0);
    CHECK(cli_parse_u64("-n", "4096", 0, UINT64_MAX, &v, &e) == 0 && v == 4096);
    CHECK(cli_parse_u64("-n", "128k", 0, UINT64_MAX, &v, &e) == 0 && v == 128000);
    CHECK(cli_parse_u64("-n", "1Mi", 0, UINT64_MAX, &v, &e) == 0 && v == 1048576);
    CHECK(cli_parse_u64("-n", "2G", 0, UINT64_MAX, &v, &e) == 0 && v == 2000000000ULL);
    CHECK(cli_parse_u64("-n", "18446744073709551615", 0, UINT64_MAX, &v, &e) == 0 &&
          v == UINT64_MAX);
    uint64_t r = test_rand() >> 1;
    char buf[32];
    snprintf(buf, sizeof buf, "%llu", (unsigned long long)r);
    CHECK(cli_parse_u64("-n", buf, 0, UINT64_MAX, &v, &e) == 0 && v == r);
}

static void parse_u64_refuses_garbage_naming_the_option(void)
{
    uint64_t v = 77;
    dsv3_err e;
    const char *bad[] = {"", "-1", "+3", " 3", "3 ", "3x", "0x10", "1.5", "k", "18446744073709551616",
                         "20000000000000G"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECKF(cli_parse_u64("--seq-len", bad[i], 0, UINT64_MAX, &v, &e) == -1, "'%s'", bad[i]);
        CHECKF(strstr(e.msg, "--seq-len") != NULL, "'%s' -> %s", bad[i], e.msg);
    }
    CHECK(v == 77);   /* untouched on failure */
    CHECK(cli_parse_u64("-L", "5", 6, 10, &v, &e) == -1 && strstr(e.msg, "out of range"));
    CHECK(cli_parse_u64("-L", "11", 6, 10, &v, &e) == -1);
}

static void parse_double(void)
{
    double d;
    dsv3_err e;
    CHECK(cli_parse_double("--temp", "0.8", 0, 10, &d, &e) == 0 && d == 0.8);
    CHECK(cli_parse_double("--temp", "1e-3", 0, 10, &d, &e) == 0 && d == 1e-3);
    CHECK(cli_parse_double("--temp", "-0.1", 0, 10, &d, &e) == -1);
    CHECK(cli_parse_double("--temp", "nan", 0, 10, &d, &e) == -1);
    CHECK(cli_parse_double("--temp", "inf", 0, 1e300, &d, &e) == -1);
    CHECK(cli_parse_double("--temp", "0.5x", 0, 10, &d, &e) == -1 && strstr(e.msg, "--temp"));
}

static void err_messages(void)
{
    dsv3_err e;
    CHECK(err_set(&e, "%s: bad %d", "f.bin", 3) == -1);
    CHECK(strcmp(e.msg, "f.bin: bad 3") == 0);
    CHECK(err_prefix(&e, "loading %s", "x") == -1);
    CHECK(strcmp(e.msg, "loading x: f.bin: bad 3") == 0);
    errno = ENOENT;
    CHECK(err_errno(&e, "%s: cannot open", "y") == -1);
    CHECK(strcmp(e.msg, "y: cannot open: No such file or directory") == 0);
    CHECK(err_set(NULL, "ignored") == -1);
    /* A message longer than the record is cut, never overflowed. */
    char big[3000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    err_set(&e, "%s", big);
    CHECK(strlen(e.msg) == sizeof e.msg - 1);
    err_prefix(&e, "%s", big);
    CHECK(strlen(e.msg) == sizeof e.msg - 1);
    err_clear(&e);
    CHECK(e.msg[0] == 0);
}

static void version_is_set(void)
{
    CHECK(strlen(cli_version()) > 0);
    CHECK(strncmp(cli_version(), "0.", 2) == 0);
}

int main(void)
{
    test_seed();
    RUN(parse_u64_accepts_numbers_and_suffixes);
    RUN(parse_u64_refuses_garbage_naming_the_option);
    RUN(parse_double);
    RUN(err_messages);
    RUN(version_is_set);
    TEST_EXIT();
}
