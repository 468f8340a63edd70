/* Tests of lib/outfile: an output is complete or absent. */
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../lib/outfile.h"
#include "../test.h"

static char dir[256];

static int count_entries(void)
{
    char cmd[400];
    snprintf(cmd, sizeof cmd, "exit $(ls -A %s | wc -l)", dir);
    int s = system(cmd);
    return WIFEXITED(s) ? WEXITSTATUS(s) : -1;
}

static void commit_makes_it_appear(void)
{
    char path[400];
    snprintf(path, sizeof path, "%s/a.out", dir);
    outfile o;
    dsv3_err e;
    REQUIRE(outfile_open(&o, path, &e) == 0);
    CHECK(o.seekable);
    fputs("hello", o.f);
    CHECK(access(path, F_OK) != 0);
    CHECK(count_entries() == 1);   /* only the hidden temporary */
    CHECK(outfile_commit(&o, &e) == 0);
    FILE *f = fopen(path, "r");
    char buf[16] = {0};
    REQUIRE(f);
    CHECK(fread(buf, 1, sizeof buf, f) == 5 && strcmp(buf, "hello") == 0);
    fclose(f);
    CHECK(count_entries() == 1);
}

static void abort_leaves_the_old_file(void)
{
    char path[400];
    snprintf(path, sizeof path, "%s/a.out", dir);
    outfile o;
    dsv3_err e;
    REQUIRE(outfile_open(&o, path, &e) == 0);
    fputs("replacement", o.f);
    outfile_abort(&o);
    FILE *f = fopen(path, "r");
    char buf[16] = {0};
    REQUIRE(f);
    CHECK(fread(buf, 1, sizeof buf, f) == 5 && strcmp(buf, "hello") == 0);
    fclose(f);
    CHECK(count_entries() == 1);
}

static void unwritable_place_is_an_error(void)
{
    outfile o;
    dsv3_err e;
    CHECK(outfile_open(&o, "/nonexistent-dir/x", &e) == -1);
    CHECK(strstr(e.msg, "/nonexistent-dir/x") != NULL);
}

static void crash_before_commit_leaves_nothing_visible(void)
{
    char path[400];
    snprintf(path, sizeof path, "%s/crash.out", dir);
    pid_t pid = fork();
    if (pid == 0) {
        outfile o;
        dsv3_err e;
        if (outfile_open(&o, path, &e) == 0) {
            fputs("half", o.f);
            fflush(o.f);
        }
        _exit(3);   /* dies without committing */
    }
    int st;
    waitpid(pid, &st, 0);
    CHECK(access(path, F_OK) != 0);
}

/* -o /dev/null once renamed a regular file over the device: devices and pipes are
 * written in place (a FIFO here, so a failure cannot break /dev/null). */
static void a_named_pipe_is_written_not_replaced(void)
{
    char path[400], cmd[900];
    snprintf(path, sizeof path, "%s/fifo", dir);
    REQUIRE(mkfifo(path, 0600) == 0);
    snprintf(cmd, sizeof cmd, "cat %s > %s/got &", path, dir);
    REQUIRE(system(cmd) == 0);
    outfile o;
    dsv3_err e;
    REQUIRE(outfile_open(&o, path, &e) == 0);
    CHECK(!o.seekable);
    fputs("through the pipe", o.f);
    CHECK(outfile_commit(&o, &e) == 0);
    struct stat st;
    CHECK(stat(path, &st) == 0 && S_ISFIFO(st.st_mode));
    snprintf(cmd, sizeof cmd, "for i in 1 2 3 4 5 6 7 8 9 10; do grep -qx 'through the pipe' %s/got && exit 0; sleep 0.1; done; exit 1", dir);
    CHECK(system(cmd) == 0);
    unlink(path);
    snprintf(cmd, sizeof cmd, "%s/got", dir);
    unlink(cmd);
}

int main(void)
{
    test_seed();
    snprintf(dir, sizeof dir, "/tmp/dsv3-test-outfile-XXXXXX");
    if (!mkdtemp(dir))
        return 1;
    RUN(commit_makes_it_appear);
    RUN(abort_leaves_the_old_file);
    RUN(unwritable_place_is_an_error);
    RUN(crash_before_commit_leaves_nothing_visible);
    RUN(a_named_pipe_is_written_not_replaced);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        return 1;
    TEST_EXIT();
}
