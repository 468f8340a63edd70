/* Tests of lib/progress: the report's text, and silence when not enabled. */
#include "../../lib/progress.h"
#include "../test.h"

static void human_numbers(void)
{
    char b[32];
    progress_human(b, sizeof b, 0);
    CHECK(strcmp(b, "0") == 0);
    progress_human(b, sizeof b, 9999);
    CHECK(strcmp(b, "9999") == 0);
    progress_human(b, sizeof b, 12345);
    CHECK(strcmp(b, "12.3k") == 0);
    progress_human(b, sizeof b, 1234567);
    CHECK(strcmp(b, "1.23M") == 0);
    progress_human(b, sizeof b, 456e9);
    CHECK(strcmp(b, "456G") == 0);
}

static void report_with_total(void)
{
    char b[256];
    progress_format(b, sizeof b, "encode", "tokens", 250000, 1000000, 10.0);
    CHECKF(strcmp(b, "encode: 250k/1.00M tokens (25%), 25.0k tokens/s, 0:30 left") == 0, "%s", b);
    progress_format(b, sizeof b, "train", "merges", 0, 128000, 0.0);
    CHECKF(strstr(b, "? left") != NULL, "%s", b);   /* no rate yet: no estimate */
}

static void report_without_total(void)
{
    char b[256];
    progress_format(b, sizeof b, "make", "tokens", 3000000, 0, 3723.0);
    CHECKF(strcmp(b, "make: 3.00M tokens, 806 tokens/s, 1:02:03 elapsed") == 0, "%s", b);
}

static void silent_when_off(void)
{
    progress p;
    progress_start(&p, PROGRESS_OFF, "x", "tokens", 10);
    char buf[256] = {0};
    FILE *f = fmemopen(buf, sizeof buf, "w");
    p.out = f;
    progress_update(&p, 5);
    progress_finish(&p);
    fclose(f);
    CHECK(buf[0] == 0);
}

static void whole_lines_when_forced_into_a_log(void)
{
    progress p;
    progress_start(&p, PROGRESS_ON, "x", "tokens", 10);
    char buf[512] = {0};
    FILE *f = fmemopen(buf, sizeof buf, "w");
    p.out = f;
    p.tty = 0;
    progress_update(&p, 5);
    progress_finish(&p);
    fclose(f);
    CHECKF(strncmp(buf, "x: 5/10 tokens (50%)", 20) == 0, "%s", buf);
    CHECK(strchr(buf, '\n') == buf + strlen(buf) - 1);   /* one line: the update was too soon */
    CHECK(strchr(buf, '\r') == NULL && strchr(buf, '\033') == NULL);
}

int main(void)
{
    test_seed();
    RUN(human_numbers);
    RUN(report_with_total);
    RUN(report_without_total);
    RUN(silent_when_off);
    RUN(whole_lines_when_forced_into_a_log);
    TEST_EXIT();
}
