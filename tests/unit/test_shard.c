/* Tests of lib/shard: round trips through files and pipes, the shapes that break naive
 * readers (empty shards, empty records, one huge record, many tiny ones), random access, and
 * damage of every kind the format promises to detect. */
#include <errno.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "../../lib/shard.h"
#include "../test.h"

/* ---- a corpus of records held in memory ---- */

typedef struct corpus {
    uint32_t *tok;
    uint64_t *start;   /* record i is tok[start[i] .. start[i+1]) */
    uint32_t *flags;
    uint64_t n, cap_rec, n_tok, cap_tok;
} corpus;

static void corpus_add(corpus *c, const uint32_t *t, uint64_t n, uint32_t flags)
{
    if (c->n + 2 > c->cap_rec) {
        c->cap_rec = c->cap_rec ? 2 * c->cap_rec : 64;
        c->start = realloc(c->start, c->cap_rec * sizeof *c->start);
        c->flags = realloc(c->flags, c->cap_rec * sizeof *c->flags);
    }
    if (c->n_tok + n > c->cap_tok) {
        while (c->n_tok + n > c->cap_tok)
            c->cap_tok = c->cap_tok ? 2 * c->cap_tok : 1024;
        c->tok = realloc(c->tok, c->cap_tok * sizeof *c->tok);
    }
    if (c->n == 0)
        c->start[0] = 0;
    if (n)
        memcpy(c->tok + c->n_tok, t, n * sizeof *t);
    c->n_tok += n;
    c->flags[c->n] = flags;
    c->start[++c->n] = c->n_tok;
}

static void corpus_free(corpus *c)
{
    free(c->tok);
    free(c->start);
    free(c->flags);
    memset(c, 0, sizeof *c);
}

/* Random records: lengths from a heavy-tailed mix (empty, short, chunk-sized) so records
 * end exactly at, just before and just after chunk boundaries. */
static void corpus_random(corpus *c, uint64_t n_records, uint64_t max_len, uint32_t vocab)
{
    uint32_t *buf = malloc((max_len + 1) * sizeof *buf);
    for (uint64_t i = 0; i < n_records; i++) {
        uint64_t r = test_rand() % 10, len;
        if (r == 0)
            len = 0;
        else if (r < 7)
            len = test_rand() % 64;
        else
            len = test_rand() % (max_len + 1);
        for (uint64_t j = 0; j < len; j++)
            buf[j] = (uint32_t)(test_rand() % vocab);
        corpus_add(c, buf, len, (uint32_t)(test_rand() & 3));
    }
    free(buf);
}

static char tmpdir[256];

static const char *tmp_path(const char *name)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    return path;
}

static int write_corpus(const char *path, const corpus *c, const shard_params *p, dsv3_err *e)
{
    shard_writer *w;
    if (shard_writer_open(&w, path, p, e))
        return -1;
    for (uint64_t i = 0; i < c->n; i++) {
        /* Feed each record in two pieces to exercise shard_write + shard_end_record. */
        uint64_t len = c->start[i + 1] - c->start[i], half = len / 2;
        if (shard_write(w, c->tok + c->start[i], half, e) ||
            shard_write(w, c->tok + c->start[i] + half, len - half, e) ||
            shard_end_record(w, c->flags[i], e)) {
            shard_writer_abort(w);
            return -1;
        }
    }
    return shard_writer_close(w, e);
}

/* Reads the whole shard and compares it record by record with the corpus. */
static int read_matches(shard_reader *r, const corpus *c, uint64_t from)
{
    shard_record rec;
    dsv3_err e;
    uint64_t i = from;
    int rc;
    while ((rc = shard_next(r, &rec, &e)) == 1) {
        if (i >= c->n) {
            fprintf(stderr, "    more records than written\n");
            return 0;
        }
        uint64_t len = c->start[i + 1] - c->start[i];
        if (rec.index != i || rec.n_tokens != len || rec.flags != c->flags[i] ||
            (len && memcmp(rec.tokens, c->tok + c->start[i], len * 4) != 0)) {
            fprintf(stderr, "    record %llu differs (len %llu vs %llu)\n", (unsigned long long)i,
                    (unsigned long long)rec.n_tokens, (unsigned long long)len);
            return 0;
        }
        i++;
    }
    if (rc < 0) {
        fprintf(stderr, "    read error: %s\n", e.msg);
        return 0;
    }
    if (i != c->n) {
        fprintf(stderr, "    %llu records read, %llu written\n", (unsigned long long)i,
                (unsigned long long)c->n);
        return 0;
    }
    return 1;
}

static int file_matches(const char *path, const corpus *c)
{
    shard_reader *r;
    dsv3_err e;
    if (shard_open(&r, path, &e)) {
        fprintf(stderr, "    open: %s\n", e.msg);
        return 0;
    }
    const shard_info *in = shard_get_info(r);
    int ok = in->index_known && in->counts_known && in->n_records == c->n &&
             in->n_tokens == c->n_tok && read_matches(r, c, 0);
    shard_close(r);
    return ok;
}

/* The same bytes read as a stream (no seeking, no index up front). */
static int stream_matches(const char *path, const corpus *c)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    int fds[2];
    if (pipe(fds))
        return 0;
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        char buf[65536];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0)
            if (write(fds[1], buf, n) != (ssize_t)n)
                break;
        _exit(0);
    }
    fclose(f);
    close(fds[1]);
    FILE *in = fdopen(fds[0], "rb");
    shard_reader *r;
    dsv3_err e;
    int ok = 0;
    if (shard_open_stream(&r, in, "pipe", 1, &e) == 0) {
        ok = !shard_get_info(r)->index_known && read_matches(r, c, 0);
        shard_close(r);
    } else {
        fprintf(stderr, "    open stream: %s\n", e.msg);
        fclose(in);
    }
    waitpid(pid, NULL, 0);
    return ok;
}

static void random_params(shard_params *p)
{
    shard_params_default(p, SHARD_DOCS);
    uint64_t r = test_rand() % 3;
    p->chunk_tokens = r == 0 ? 1 + (uint32_t)(test_rand() % 8)
                    : r == 1 ? 1 + (uint32_t)(test_rand() % 5000)
                             : 1u << 16;
    p->shuffle = (int)(test_rand() & 1);
    p->level = 1 + (int)(test_rand() % 6);
}

/* ---- round trips ---- */

static void roundtrip_file_and_stream(void)
{
    for (int trial = 0; trial < 12; trial++) {
        corpus c = {0};
        shard_params p;
        random_params(&p);
        corpus_random(&c, 1 + test_rand() % 1500, 3000, 129280);
        dsv3_err e;
        const char *path = tmp_path("rt.shard");
        REQUIRE(write_corpus(path, &c, &p, &e) == 0);
        CHECKF(file_matches(path, &c), "trial %d chunk_tokens %u", trial, p.chunk_tokens);
        CHECKF(stream_matches(path, &c), "trial %d chunk_tokens %u", trial, p.chunk_tokens);
        corpus_free(&c);
    }
}

/* The writer on a pipe (standard output of a child), the reader on the other end. */
static void roundtrip_through_pipe(void)
{
    corpus c = {0};
    corpus_random(&c, 700, 20000, 129280);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 4096;
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], STDOUT_FILENO);
        close(fds[1]);
        dsv3_err e;
        _exit(write_corpus("-", &c, &p, &e) == 0 ? 0 : 1);
    }
    close(fds[1]);
    FILE *in = fdopen(fds[0], "rb");
    shard_reader *r;
    dsv3_err e;
    REQUIRE(shard_open_stream(&r, in, "pipe", 1, &e) == 0);
    CHECK(!shard_get_info(r)->counts_known);  /* a pipe cannot have its header patched */
    CHECK(read_matches(r, &c, 0));
    CHECK(shard_get_info(r)->n_records == c.n);
    shard_close(r);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    corpus_free(&c);
}

static void empty_shard(void)
{
    corpus c = {0};
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    dsv3_err e;
    const char *path = tmp_path("empty.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    CHECK(file_matches(path, &c));
    CHECK(stream_matches(path, &c));
    shard_reader *r;
    REQUIRE(shard_open(&r, path, &e) == 0);
    CHECK(shard_get_info(r)->n_chunks == 0);
    CHECK(shard_seek(r, 0, &e) == 0);
    shard_record rec;
    CHECK(shard_next(r, &rec, &e) == 0);
    CHECK(shard_seek(r, 1, &e) == -1);
    shard_close(r);
}

static void empty_records_at_chunk_edges(void)
{
    corpus c = {0};
    uint32_t t[5] = {1, 2, 3, 4, 5};
    for (int i = 0; i < 40; i++)
        corpus_add(&c, t, (uint64_t)(i % 6 == 0 ? 0 : i % 5), (uint32_t)i);
    for (uint32_t chunk = 1; chunk <= 7; chunk++) {
        shard_params p;
        shard_params_default(&p, SHARD_DOCS);
        p.chunk_tokens = chunk;
        dsv3_err e;
        const char *path = tmp_path("edges.shard");
        REQUIRE(write_corpus(path, &c, &p, &e) == 0);
        CHECKF(file_matches(path, &c), "chunk_tokens %u", chunk);
        CHECKF(stream_matches(path, &c), "chunk_tokens %u", chunk);
    }
    corpus_free(&c);
}

static void one_huge_document(void)
{
    const uint64_t n = 12u << 20;   /* 48 MiB of tokens, twelve 1 Mi-token chunks */
    corpus c = {0};
    uint32_t small[3] = {7, 8, 9};
    corpus_add(&c, small, 3, 0);
    uint32_t *big = malloc(n * sizeof *big);
    REQUIRE(big);
    for (uint64_t i = 0; i < n; i++)
        big[i] = (uint32_t)((i * 2654435761u) % 129280);
    corpus_add(&c, big, n, SHARD_DOC_CODE);
    corpus_add(&c, small, 2, 0);
    free(big);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    dsv3_err e;
    const char *path = tmp_path("huge.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    CHECK(file_matches(path, &c));
    CHECK(stream_matches(path, &c));
    shard_reader *r;
    REQUIRE(shard_open(&r, path, &e) == 0);
    CHECK(shard_get_info(r)->n_chunks == 13);
    CHECK(shard_seek(r, 2, &e) == 0);   /* the record after the huge one */
    CHECK(read_matches(r, &c, 2));
    CHECK(shard_seek(r, 1, &e) == 0);
    CHECK(read_matches(r, &c, 1));
    shard_close(r);
    corpus_free(&c);
}

static void many_tiny_records(void)
{
    corpus c = {0};
    for (uint64_t i = 0; i < 300000; i++) {
        uint32_t t[2] = {(uint32_t)i, (uint32_t)(i >> 3)};
        corpus_add(&c, t, i % 3, (uint32_t)(i & 1));
    }
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 65536;
    dsv3_err e;
    const char *path = tmp_path("tiny.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    CHECK(file_matches(path, &c));
    CHECK(stream_matches(path, &c));
    corpus_free(&c);
}

static void packed_sequences(void)
{
    const uint32_t L = 17;
    corpus c = {0};
    uint32_t t[17];
    for (int i = 0; i < 1000; i++) {
        for (uint32_t j = 0; j < L; j++)
            t[j] = (uint32_t)(test_rand() % 1000);
        corpus_add(&c, t, L, 0);
    }
    shard_params p;
    shard_params_default(&p, SHARD_PACKED);
    p.seq_len = L;
    p.chunk_tokens = 100;   /* not a multiple of L: sequences span chunks */
    dsv3_err e;
    const char *path = tmp_path("packed.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    CHECK(file_matches(path, &c));
    shard_reader *r;
    REQUIRE(shard_open(&r, path, &e) == 0);
    CHECK(shard_get_info(r)->kind == SHARD_PACKED && shard_get_info(r)->seq_len == L);
    shard_close(r);
    /* A record of the wrong length is refused and nothing is written. */
    shard_writer *w;
    const char *bad = tmp_path("packed-bad.shard");
    REQUIRE(shard_writer_open(&w, bad, &p, &e) == 0);
    CHECK(shard_write_record(w, t, L - 1, 0, &e) == -1);
    CHECK(strstr(e.msg, "sequence length") != NULL);
    CHECK(shard_writer_close(w, &e) == -1);
    CHECK(access(bad, F_OK) != 0);
    corpus_free(&c);
}

static void random_access(void)
{
    corpus c = {0};
    corpus_random(&c, 2000, 500, 50000);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 97;
    dsv3_err e;
    const char *path = tmp_path("seek.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    shard_reader *r;
    REQUIRE(shard_open(&r, path, &e) == 0);
    for (int k = 0; k < 300; k++) {
        uint64_t i = test_rand() % (c.n + 1);
        REQUIRE(shard_seek(r, i, &e) == 0);
        shard_record rec;
        int rc = shard_next(r, &rec, &e);
        if (i == c.n) {
            CHECK(rc == 0);
            continue;
        }
        uint64_t len = c.start[i + 1] - c.start[i];
        CHECKF(rc == 1 && rec.index == i && rec.n_tokens == len &&
               (len == 0 || memcmp(rec.tokens, c.tok + c.start[i], len * 4) == 0),
               "record %llu", (unsigned long long)i);
    }
    CHECK(shard_seek(r, c.n + 1, &e) == -1);
    /* After seeks, a seek to 0 and a full read still checks the index at the end. */
    CHECK(shard_seek(r, 0, &e) == 0);
    CHECK(read_matches(r, &c, 0));
    shard_close(r);
    corpus_free(&c);
}

static void vocabulary_is_enforced(void)
{
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.vocab_size = 100;
    p.tokenizer_id = 0x1234abcdULL;
    shard_writer *w;
    dsv3_err e;
    const char *path = tmp_path("vocab.shard");
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    uint32_t ok[3] = {0, 50, 99}, bad[2] = {5, 100};
    CHECK(shard_write_record(w, ok, 3, 0, &e) == 0);
    CHECK(shard_write_record(w, bad, 2, 0, &e) == -1);
    CHECK(strstr(e.msg, "id 100") != NULL);
    CHECK(shard_writer_close(w, &e) == -1);
    CHECK(access(path, F_OK) != 0);
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    CHECK(shard_write_record(w, ok, 3, 0, &e) == 0);
    CHECK(shard_writer_close(w, &e) == 0);
    shard_reader *r;
    REQUIRE(shard_open(&r, path, &e) == 0);
    CHECK(shard_get_info(r)->vocab_size == 100);
    CHECK(shard_get_info(r)->tokenizer_id == 0x1234abcdULL);
    CHECK(shard_verify(r, &e) == 0);
    CHECK(shard_get_stats(r)->max_token == 99);
    shard_close(r);
}

static void output_is_complete_or_absent(void)
{
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    dsv3_err e;
    shard_writer *w;
    const char *path = tmp_path("partial.shard");
    uint32_t t[4] = {1, 2, 3, 4};
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    CHECK(shard_write(w, t, 4, &e) == 0);
    CHECK(shard_writer_close(w, &e) == -1);         /* the record was never ended */
    CHECK(strstr(e.msg, "never ended") != NULL);
    CHECK(access(path, F_OK) != 0);
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    CHECK(shard_write_record(w, t, 4, 0, &e) == 0);
    CHECK(access(path, F_OK) != 0);                 /* invisible until closed */
    shard_writer_abort(w);
    CHECK(access(path, F_OK) != 0);
    /* A failed replacement leaves the previous complete file in place. */
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    CHECK(shard_write_record(w, t, 4, 0, &e) == 0);
    CHECK(shard_writer_close(w, &e) == 0);
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    shard_writer_abort(w);
    shard_reader *r;
    CHECK(shard_open(&r, path, &e) == 0 && shard_verify(r, &e) == 0);
    shard_close(r);
    /* Nothing but the one shard is left in the directory. */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "test $(ls -A %s | grep -c tmp) -eq 0", tmpdir);
    CHECK(system(cmd) == 0);
}

static void bad_parameters(void)
{
    shard_params p;
    shard_writer *w;
    dsv3_err e;
    shard_params_default(&p, SHARD_PACKED);
    CHECK(shard_writer_open(&w, tmp_path("x.shard"), &p, &e) == -1);   /* no seq_len */
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 0;
    CHECK(shard_writer_open(&w, tmp_path("x.shard"), &p, &e) == -1);
    shard_params_default(&p, SHARD_DOCS);
    p.level = 99;
    CHECK(shard_writer_open(&w, tmp_path("x.shard"), &p, &e) == -1);
    shard_params_default(&p, SHARD_DOCS);
    CHECK(shard_writer_open(&w, "/nonexistent-dir/x.shard", &p, &e) == -1);
    CHECK(strstr(e.msg, "/nonexistent-dir/x.shard") != NULL);
    shard_reader *r;
    CHECK(shard_open(&r, "/nonexistent-file.shard", &e) == -1);
    CHECK(strstr(e.msg, "/nonexistent-file.shard") != NULL);
}

static void deterministic_bytes(void)
{
    corpus c = {0};
    corpus_random(&c, 500, 2000, 129280);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 3000;
    dsv3_err e;
    REQUIRE(write_corpus(tmp_path("d1.shard"), &c, &p, &e) == 0);
    REQUIRE(write_corpus(tmp_path("d2.shard"), &c, &p, &e) == 0);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cmp -s %s/d1.shard %s/d2.shard", tmpdir, tmpdir);
    CHECK(system(cmd) == 0);
    corpus_free(&c);
}

/* Chunks compressed on threads: the same bytes as in the caller's thread for any count,
 * in a file and down a pipe, with many small chunks so several are in flight at once. */
static int same_file(const char *a, const char *b)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cmp -s %s %s", a, b);
    return system(cmd) == 0;
}

static void threads_same_bytes(void)
{
    for (int trial = 0; trial < 4; trial++) {
        corpus c = {0};
        corpus_random(&c, 300 + test_rand() % 700, 5000, 129280);
        shard_params p;
        random_params(&p);
        if (p.chunk_tokens == 1u << 16)
            p.chunk_tokens = 2000;   /* many chunks */
        dsv3_err e;
        char ref[512];
        snprintf(ref, sizeof ref, "%s", tmp_path("t0.shard"));
        REQUIRE(write_corpus(ref, &c, &p, &e) == 0);
        for (int t = 1; t <= 5; t++) {
            p.threads = t;
            REQUIRE(write_corpus(tmp_path("tn.shard"), &c, &p, &e) == 0);
            CHECKF(same_file(ref, tmp_path("tn.shard")), "trial %d threads %d chunk %u", trial,
                   t, p.chunk_tokens);
            CHECKF(file_matches(tmp_path("tn.shard"), &c), "trial %d threads %d", trial, t);
        }
        /* standard output (a pipe, so no header patch): against threads 0 down the same */
        char cmd[1600];
        snprintf(cmd, sizeof cmd, "cat > %s", tmp_path("p0.shard"));
        for (int t = 0; t <= 3; t += 3) {
            p.threads = t;
            fflush(stdout);
            FILE *pp = popen(cmd, "w");
            REQUIRE(pp != NULL);
            int saved = dup(STDOUT_FILENO);
            dup2(fileno(pp), STDOUT_FILENO);
            int rc = write_corpus("-", &c, &p, &e);
            fflush(stdout);
            dup2(saved, STDOUT_FILENO);
            close(saved);
            CHECK(pclose(pp) == 0 && rc == 0);
            if (t == 0)
                snprintf(cmd, sizeof cmd, "cat > %s", tmp_path("p3.shard"));
        }
        CHECK(same_file(tmp_path("p0.shard"), tmp_path("p3.shard")));
        CHECK(stream_matches(tmp_path("p3.shard"), &c));
        corpus_free(&c);
    }
}

/* A writer with compression threads fails and aborts as cleanly as one without. */
static void threads_errors_and_abort(void)
{
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 16;
    p.vocab_size = 1000;
    p.threads = 3;
    shard_writer *w;
    dsv3_err e;
    const char *path = tmp_path("tab.shard");
    uint32_t t[100];
    for (int i = 0; i < 100; i++)
        t[i] = (uint32_t)(test_rand() % 1000);
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    for (int i = 0; i < 50; i++)
        CHECK(shard_write_record(w, t, 100, 0, &e) == 0);
    shard_writer_abort(w);   /* with chunks in flight */
    CHECK(access(path, F_OK) != 0);
    REQUIRE(shard_writer_open(&w, path, &p, &e) == 0);
    for (int i = 0; i < 20; i++)
        CHECK(shard_write_record(w, t, 100, 0, &e) == 0);
    t[7] = 1000;
    CHECK(shard_write_record(w, t, 100, 0, &e) == -1);
    CHECK(strstr(e.msg, "id 1000") != NULL);
    CHECK(shard_writer_close(w, &e) == -1);
    CHECK(access(path, F_OK) != 0);
    p.threads = 257;
    CHECK(shard_writer_open(&w, path, &p, &e) == -1);
    /* a full disk: /dev/full takes no bytes, and the failure comes from a compressor */
    p.threads = 2;
    t[7] = 999;
    if (access("/dev/full", W_OK) == 0) {
        FILE *saved = fopen("/dev/full", "w");
        REQUIRE(saved != NULL);
        int fd = dup(STDOUT_FILENO);
        dup2(fileno(saved), STDOUT_FILENO);
        int rc = shard_writer_open(&w, "-", &p, &e);
        for (int i = 0; rc == 0 && i < 20000; i++)
            rc = shard_write_record(w, t, 50, 0, &e);
        if (rc == 0)
            rc = shard_writer_close(w, &e);
        else
            shard_writer_abort(w);
        dup2(fd, STDOUT_FILENO);
        close(fd);
        fclose(saved);
        CHECK(rc == -1);
        CHECKF(strstr(e.msg, "write failed") != NULL, "%s", e.msg);
    }
}

/* ---- damage ---- */

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n + 1);
    if (fread(b, 1, *n, f) != *n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    return b;
}

static void spit(const char *path, const uint8_t *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (n)
        fwrite(b, 1, n, f);
    fclose(f);
}

/* Opens and reads everything, as a file (random access) and as a stream. Returns the number
 * of the two modes that failed cleanly with a message naming the file; 2 is what damage must
 * give. A mode that succeeds or fails without naming the file counts 0. */
static int fails_both_ways(const char *path, const uint8_t *b, size_t n, char *msg, size_t cap)
{
    spit(path, b, n);
    int failed = 0;
    shard_reader *r;
    dsv3_err e;
    if (shard_open(&r, path, &e) == 0) {
        int rc = shard_verify(r, &e);
        shard_close(r);
        if (rc == 0)
            goto stream;
    }
    if (strstr(e.msg, path) != NULL)
        failed++;
    snprintf(msg, cap, "%s", e.msg);
stream:;
    FILE *f = fmemopen((void *)(n ? b : (const uint8_t *)""), n ? n : 1, "rb");
    if (n == 0)
        fgetc(f);   /* fmemopen cannot open 0 bytes: consume the 1 to make it empty */
    if (shard_open_stream(&r, f, "mem", 1, &e) == 0) {
        int rc = shard_verify(r, &e);
        shard_close(r);
        if (rc == 0)
            return failed;
    }
    if (strstr(e.msg, "mem") != NULL && strstr(e.msg, "offset") != NULL)
        failed++;
    return failed;
}

static const char *small_damage_target(size_t *n, uint8_t **b)
{
    corpus c = {0};
    uint32_t t[6] = {3, 1, 4, 1, 5, 9};
    for (int i = 0; i < 9; i++)
        corpus_add(&c, t, (uint64_t)(i % 7), (uint32_t)i);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 8;    /* several chunks in a few hundred bytes */
    p.vocab_size = 10;
    dsv3_err e;
    const char *path = tmp_path("target.shard");
    if (write_corpus(path, &c, &p, &e) != 0)
        return NULL;
    corpus_free(&c);
    *b = slurp(path, n);
    return path;
}

static void damage_truncated_anywhere(void)
{
    size_t n;
    uint8_t *b;
    REQUIRE(small_damage_target(&n, &b));
    const char *path = tmp_path("trunc.shard");
    char msg[1024];
    for (size_t len = 0; len < n; len++)
        CHECKF(fails_both_ways(path, b, len, msg, sizeof msg) == 2, "truncated to %zu of %zu", len,
               n);
    fails_both_ways(path, b, n / 2, msg, sizeof msg);
    fprintf(stderr, "    e.g. %s\n", msg);
    free(b);
}

static void damage_any_flipped_byte(void)
{
    size_t n;
    uint8_t *b;
    REQUIRE(small_damage_target(&n, &b));
    const char *path = tmp_path("flip.shard");
    char msg[1024];
    for (size_t i = 0; i < n; i++)
        for (int bit = 0; bit < 8; bit += 7) {
            b[i] ^= (uint8_t)(1u << bit);
            CHECKF(fails_both_ways(path, b, n, msg, sizeof msg) == 2, "byte %zu bit %d of %zu", i,
                   bit, n);
            b[i] ^= (uint8_t)(1u << bit);
        }
    free(b);
}

static void put64le(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* Lies with valid checksums: the reader must catch them by cross-checking, not by hashes. */
static void damage_counts_that_lie(void)
{
    size_t n;
    uint8_t *b;
    REQUIRE(small_damage_target(&n, &b));
    const char *path = tmp_path("lie.shard");
    char msg[1024];

    uint8_t *h = malloc(n);
    memcpy(h, b, n);                           /* header: one record too many */
    put64le(h + 48, get64le(h + 48) + 1);
    put64le(h + 72, XXH3_64bits(h, 72));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);
    CHECK(strstr(msg, "header says") != NULL);

    memcpy(h, b, n);                           /* first chunk: one token more than it holds */
    uint8_t *ch = h + 80;
    ch[8] += 1;
    put64le(ch + 56, XXH3_64bits(ch, 56));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);

    memcpy(h, b, n);                           /* index totals: one token more */
    uint64_t ioff = get64le(h + n - 32), ibytes = get64le(h + n - 24);
    uint8_t *ix = h + ioff;
    put64le(ix + 24, get64le(ix + 24) + 1);
    put64le(ix + ibytes - 8, XXH3_64bits(ix, ibytes - 8));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);

    memcpy(h, b, n);                           /* index entry pointing at the wrong place */
    put64le(ix + 32 + 24, get64le(ix + 32 + 24) + 4);
    put64le(ix + ibytes - 8, XXH3_64bits(ix, ibytes - 8));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);

    memcpy(h, b, n);                           /* header states a vocabulary the tokens exceed */
    h[24] = 5;                                 /* ids run to 5 in the target */
    put64le(h + 72, XXH3_64bits(h, 72));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);
    CHECK(strstr(msg, "vocabulary") != NULL);

    memcpy(h, b, n);                           /* footer pointing before the index */
    put64le(h + n - 32, ioff - 8);
    put64le(h + n - 16, XXH3_64bits(h + n - 32, 16));
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);
    free(h);
    free(b);
}

static void damage_wrong_magic_and_junk(void)
{
    size_t n;
    uint8_t *b;
    REQUIRE(small_damage_target(&n, &b));
    const char *path = tmp_path("magic.shard");
    char msg[1024];
    uint8_t *h = malloc(n + 5);
    memcpy(h, b, n);
    memcpy(h, "DSV3SHRX", 8);
    CHECK(fails_both_ways(path, h, n, msg, sizeof msg) == 2);
    CHECK(strstr(msg, "not a dsv3 shard") != NULL);
    memcpy(h, b, n);
    memcpy(h + n, "junk!", 5);                 /* data after the footer */
    CHECK(fails_both_ways(path, h, n + 5, msg, sizeof msg) == 2);
    CHECK(fails_both_ways(path, h, 0, msg, sizeof msg) == 2);   /* zero-length file */
    const char *text = "this is not a shard at all, only text\n";
    CHECK(fails_both_ways(path, (const uint8_t *)text, strlen(text), msg, sizeof msg) == 2);
    free(h);
    free(b);
}

static void random_damage_on_large_shard(void)
{
    corpus c = {0};
    corpus_random(&c, 400, 3000, 129280);
    shard_params p;
    shard_params_default(&p, SHARD_DOCS);
    p.chunk_tokens = 2000;
    dsv3_err e;
    const char *path = tmp_path("large.shard");
    REQUIRE(write_corpus(path, &c, &p, &e) == 0);
    size_t n;
    uint8_t *b = slurp(path, &n);
    char msg[1024];
    for (int k = 0; k < 60; k++) {
        size_t i = (size_t)(test_rand() % n);
        uint8_t bit = (uint8_t)(1u << (test_rand() % 8));
        b[i] ^= bit;
        CHECKF(fails_both_ways(tmp_path("large-bad.shard"), b, n, msg, sizeof msg) == 2,
               "byte %zu of %zu", i, n);
        b[i] ^= bit;
    }
    free(b);
    corpus_free(&c);
}

int main(void)
{
    test_seed();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dsv3-test-shard-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(roundtrip_file_and_stream);
    RUN(roundtrip_through_pipe);
    RUN(empty_shard);
    RUN(empty_records_at_chunk_edges);
    RUN(one_huge_document);
    RUN(many_tiny_records);
    RUN(packed_sequences);
    RUN(random_access);
    RUN(vocabulary_is_enforced);
    RUN(output_is_complete_or_absent);
    RUN(bad_parameters);
    RUN(deterministic_bytes);
    RUN(threads_same_bytes);
    RUN(threads_errors_and_abort);
    RUN(damage_truncated_anywhere);
    RUN(damage_any_flipped_byte);
    RUN(damage_counts_that_lie);
    RUN(damage_wrong_magic_and_junk);
    RUN(random_damage_on_large_shard);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    TEST_EXIT();
}
