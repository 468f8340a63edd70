/* Tests of lib/ststream: a file streamed in random pieces is byte for byte the file
 * st_write makes of the same tensors and reads back through st_open; writing out of order,
 * too much or too little, or declaring a name twice fails and leaves no file. */
#include <sys/stat.h>
#include <unistd.h>

#include "../../lib/ststream.h"
#include "../test.h"

static char tmpdir[256];

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long l = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)l + 1);
    *n = fread(b, 1, (size_t)l, f);
    fclose(f);
    return b;
}

static int exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

static void test_same_as_st_write(void)
{
    enum { N = 9 };
    static const st_dtype dts[] = {ST_F32, ST_BF16, ST_F8_E4M3, ST_I64, ST_U8};
    char names[N][32];
    int64_t shapes[N][2];
    st_dtype dt[N];
    unsigned char *data[N];
    uint64_t bytes[N];
    st_writer w = {0};
    ststream s = {0};
    for (int i = 0; i < N; i++) {
        snprintf(names[i], sizeof names[i], "t%d.weight", (int)(test_rand() % 1000) * N + i);
        shapes[i][0] = (int64_t)(test_rand() % 40);   /* zero-size tensors too */
        shapes[i][1] = 1 + (int64_t)(test_rand() % 70);
        dt[i] = dts[test_rand() % 5];
        bytes[i] = (uint64_t)(shapes[i][0] * shapes[i][1]) * st_dtype_size(dt[i]);
        data[i] = malloc(bytes[i] + 1);
        for (uint64_t j = 0; j < bytes[i]; j++)
            data[i][j] = (unsigned char)test_rand();
        int nd = 1 + (int)(test_rand() % 2);
        int64_t sh1[1] = {shapes[i][0] * shapes[i][1]};
        st_add(&w, names[i], dt[i], nd, nd == 2 ? shapes[i] : sh1, data[i]);
        sts_declare(&s, names[i], dt[i], nd, nd == 2 ? shapes[i] : sh1);
    }
    char p1[300], p2[300];
    snprintf(p1, sizeof p1, "%s/a.safetensors", tmpdir);
    snprintf(p2, sizeof p2, "%s/b.safetensors", tmpdir);
    dsv3_err e;
    REQUIRE(st_write(&w, p1, &e) == 0);
    REQUIRE(sts_begin(&s, p2, &e) == 0);
    for (int i = 0; i < N; i++) {  /* random pieces, the first named */
        uint64_t at = 0;
        while (at < bytes[i]) {
            uint64_t n = 1 + test_rand() % (bytes[i] - at);
            CHECK(sts_write(&s, at ? NULL : names[i], data[i] + at, n, &e) == 0);
            at += n;
        }
    }
    CHECKF(sts_commit(&s, &e) == 0, "%s", e.msg);
    size_t n1 = 0, n2 = 0;
    unsigned char *b1 = slurp(p1, &n1), *b2 = slurp(p2, &n2);
    REQUIRE(b1 && b2);
    CHECKF(n1 == n2 && !memcmp(b1, b2, n1), "sizes %zu %zu", n1, n2);
    CHECK(sts_file_size(&s) == n2);
    st_file f;
    REQUIRE(st_open(&f, p2, &e) == 0);
    CHECK(f.n == N);
    for (int i = 0; i < N; i++) {
        const st_tensor *t = st_find(&f, names[i]);
        CHECK(t && t->dtype == dt[i] && t->nbytes == bytes[i] &&
              !memcmp(t->data, data[i], bytes[i]));
    }
    st_close(&f);
    free(b1);
    free(b2);
    for (int i = 0; i < N; i++)
        free(data[i]);
    st_writer_free(&w);
    sts_free(&s);
}

static void test_misuse(void)
{
    int64_t sh[2] = {4, 4};
    float x[16] = {0};
    char p[300];
    snprintf(p, sizeof p, "%s/bad.safetensors", tmpdir);
    dsv3_err e;
    for (int mode = 0; mode < 4; mode++) {
        ststream s = {0};
        sts_declare(&s, "a", ST_F32, 2, sh);
        sts_declare(&s, mode == 3 ? "a" : "b", ST_F32, 2, sh);
        int rc = sts_begin(&s, p, &e);
        if (mode == 3) {
            CHECKF(rc == -1 && strstr(e.msg, "twice"), "%s", e.msg);
        } else {
            REQUIRE(rc == 0);
            if (mode == 0)  /* out of order */
                rc = sts_write(&s, "b", x, sizeof x, &e);
            else if (mode == 1)  /* more than the tensor holds */
                rc = sts_write(&s, "a", x, sizeof x + 4, &e);
            else  /* one tensor missing at commit */
                rc = sts_write(&s, "a", x, sizeof x, &e) || sts_commit(&s, &e);
            CHECKF(rc != 0, "mode %d", mode);
        }
        CHECKF(!exists(p), "mode %d left %s", mode, p);
        sts_free(&s);
    }
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-ststream-%d", (int)getpid());
    mkdir(tmpdir, 0777);
    RUN(test_same_as_st_write);
    RUN(test_misuse);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) {
    }
    TEST_EXIT();
}
