/* trainckpt: atomic training checkpoints of a run folder (see trainckpt.h). */
#include "trainckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dp.h"
#include "outfile.h"

static int fsync_path(const char *path, dsv3_err *e)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return err_errno(e, "%s: cannot open to sync", path);
    int rc = fsync(fd);
    close(fd);
    return rc ? err_errno(e, "%s: fsync failed", path) : 0;
}

static int write_text(const char *path, const char *text, dsv3_err *e)
{
    outfile o;
    if (outfile_open(&o, path, e))
        return -1;
    if (fputs(text, o.f) == EOF) {
        outfile_abort(&o);
        return err_errno(e, "%s: write failed", path);
    }
    return outfile_commit(&o, e);
}

static int write_state(const char *path, const train_state *st, dsv3_err *e)
{
    char rng[17];
    snprintf(rng, sizeof rng, "%016" PRIx64, st->rng);
    json_t *j = json_pack("{s:s, s:i, s:I, s:I, s:I, s:{s:I, s:I, s:s, s:I}, s:I, s:s, s:I}",
                          "format", "dsv3-train-state", "version", 1,
                          "step", (json_int_t)st->step, "tokens", (json_int_t)st->tokens,
                          "skipped_batches", (json_int_t)st->skipped,
                          "data", "epoch", (json_int_t)st->data.epoch,
                          "index", (json_int_t)st->data.index,
                          "tokenizer_id", st->tokenizer_id, "seq_len", (json_int_t)st->seq_len,
                          "seed", (json_int_t)st->seed, "rng", rng,
                          "world", (json_int_t)(st->world ? st->world : 1));
    /* "ep" only when expert-parallel: other states stay as they were */
    if (j && st->ep > 1)
        json_object_set_new(j, "ep", json_integer((json_int_t)st->ep));
    /* the routing always: a resume must route as the run did (0: off); the node count
     * resolved, as the launcher's ranks per node may differ on the resuming job */
    if (j) {
        json_object_set_new(j, "route_nodes", json_integer((json_int_t)st->route_nodes));
        if (st->route_nodes)
            json_object_set_new(j, "route_groups", json_integer((json_int_t)st->route_groups));
    }
    char *text = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
    json_decref(j);
    if (!text)
        return err_set(e, "%s: out of memory", path);
    size_t n = strlen(text);
    char *line = malloc(n + 2);
    int rc = -1;
    if (line) {
        memcpy(line, text, n);
        memcpy(line + n, "\n", 2);
        rc = write_text(path, line, e);
    } else
        err_set(e, "%s: out of memory", path);
    free(line);
    free(text);
    return rc;
}

int trainckpt_read_state(const char *dir, train_state *st, dsv3_err *e)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/state.json", dir);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j)
        return err_set(e, "%s: %s (line %d)", path, je.text, je.line);
    memset(st, 0, sizeof *st);
    json_int_t version = 0, step = -1, tokens = -1, skipped = -1, epoch = -1, index = -1,
               seq_len = -1, seed = -1;
    const char *fmt = NULL, *tok = NULL, *rng = NULL;
    int rc = json_unpack(j, "{s:s, s:I, s:I, s:I, s:I, s:{s:I, s:I, s:s, s:I}, s:I, s:s}",
                         "format", &fmt, "version", &version, "step", &step, "tokens", &tokens,
                         "skipped_batches", &skipped, "data", "epoch", &epoch, "index", &index,
                         "tokenizer_id", &tok, "seq_len", &seq_len, "seed", &seed, "rng", &rng);
    char *end = NULL;
    if (!rc && rng)
        st->rng = strtoull(rng, &end, 16);
    if (rc || strcmp(fmt, "dsv3-train-state") || version != 1 || step < 0 || tokens < 0 ||
        skipped < 0 || epoch < 0 || index < 0 || seq_len <= 0 || seq_len > UINT32_MAX ||
        seed < 0 || strlen(tok) != 16 || !end || *end || strlen(rng) != 16) {
        json_decref(j);
        return err_set(e, "%s: not a dsv3-train state of version 1 (a field is missing or "
                       "out of range)", path);
    }
    /* "world" came with data parallelism: a state without it is a single process's. */
    json_t *w = json_object_get(j, "world");
    json_int_t world = w ? (json_is_integer(w) ? json_integer_value(w) : -1) : 1;
    if (world < 1 || world > INT32_MAX) {
        json_decref(j);
        return err_set(e, "%s: \"world\" is not a rank count", path);
    }
    st->world = (uint32_t)world;
    json_t *ep = json_object_get(j, "ep");
    json_int_t epn = ep ? (json_is_integer(ep) ? json_integer_value(ep) : -1) : 1;
    if (epn < 1 || epn > world) {
        json_decref(j);
        return err_set(e, "%s: \"ep\" is not an expert-parallel rank count", path);
    }
    st->ep = (uint32_t)epn;
    /* "route_nodes" came with node-limited routing: without it the routing is unknown */
    json_t *rn = json_object_get(j, "route_nodes"), *rg = json_object_get(j, "route_groups");
    json_int_t M = rn ? (json_is_integer(rn) ? json_integer_value(rn) : -1) : 0;
    json_int_t G = rg ? (json_is_integer(rg) ? json_integer_value(rg) : -1) : 0;
    if (M < 0 || M > INT32_MAX || G < 0 || G > INT32_MAX || (M > 0) != (G > 0)) {
        json_decref(j);
        return err_set(e, "%s: \"route_nodes\"/\"route_groups\" are not a routing (node "
                       "limit and node count, both set or both absent)", path);
    }
    st->route_known = rn != NULL;
    st->route_nodes = (uint32_t)M;
    st->route_groups = (uint32_t)G;
    st->step = (uint64_t)step;
    st->tokens = (uint64_t)tokens;
    st->skipped = (uint64_t)skipped;
    st->data.epoch = (uint64_t)epoch;
    st->data.index = (uint64_t)index;
    st->seed = (uint64_t)seed;
    st->seq_len = (uint32_t)seq_len;
    snprintf(st->tokenizer_id, sizeof st->tokenizer_id, "%s", tok);
    json_decref(j);
    return 0;
}

int trainckpt_remove_dir(const char *dir, dsv3_err *e)
{
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? 0 : err_errno(e, "%s: cannot open", dir);
    struct dirent *de;
    char path[4096];
    int rc = 0;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (unlink(path) && !rc)
            rc = err_errno(e, "%s: cannot remove", path);
    }
    closedir(d);
    if (!rc && rmdir(dir))
        rc = err_errno(e, "%s: cannot remove", dir);
    return rc;
}

/* The step number of a name "step-NNNNNN", or -1. */
static int64_t step_of(const char *name)
{
    if (strncmp(name, "step-", 5) || !name[5])
        return -1;
    int64_t v = 0;
    for (const char *p = name + 5; *p; p++) {
        if (*p < '0' || *p > '9' || v > INT64_MAX / 10 - 10)
            return -1;
        v = v * 10 + (*p - '0');
    }
    return v;
}

static int has_state(const char *run, const char *name)
{
    char path[4096];
    struct stat sb;
    snprintf(path, sizeof path, "%s/%s/state.json", run, name);
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Step numbers of the complete checkpoints in RUN, ascending. */
static int list_steps(const char *run, int64_t **out, int *n_out, dsv3_err *e)
{
    *out = NULL;
    *n_out = 0;
    DIR *d = opendir(run);
    if (!d)
        return errno == ENOENT ? 0 : err_errno(e, "%s: cannot open", run);
    int n = 0, cap = 0;
    int64_t *v = NULL;
    struct dirent *de;
    while ((de = readdir(d))) {
        int64_t s = step_of(de->d_name);
        if (s < 0 || !has_state(run, de->d_name))
            continue;
        if (n == cap) {
            int64_t *nv = realloc(v, (size_t)(cap = cap ? 2 * cap : 16) * sizeof *v);
            if (!nv) {
                free(v);
                closedir(d);
                return err_set(e, "out of memory");
            }
            v = nv;
        }
        v[n++] = s;
    }
    closedir(d);
    for (int i = 1; i < n; i++)   /* insertion sort: a handful of checkpoints */
        for (int k = i; k > 0 && v[k - 1] > v[k]; k--) {
            int64_t t = v[k];
            v[k] = v[k - 1];
            v[k - 1] = t;
        }
    *out = v;
    *n_out = n;
    return 0;
}

static void step_name(char *buf, size_t n, uint64_t step)
{
    snprintf(buf, n, "step-%06" PRIu64, step);
}

int trainckpt_find(const char *run, char *name, size_t n, dsv3_err *e)
{
    char path[4096], buf[64] = "";
    snprintf(path, sizeof path, "%s/latest", run);
    FILE *f = fopen(path, "r");
    if (f) {
        if (!fgets(buf, sizeof buf, f))
            buf[0] = 0;
        fclose(f);
        buf[strcspn(buf, "\n")] = 0;
        if (step_of(buf) >= 0 && has_state(run, buf)) {
            snprintf(name, n, "%s", buf);
            return 1;
        }
    }
    int64_t *v;
    int k;
    if (list_steps(run, &v, &k, e))
        return -1;
    if (k)
        step_name(name, n, (uint64_t)v[k - 1]);
    free(v);
    return k > 0;
}

void trainckpt_clean(const char *run)
{
    DIR *d = opendir(run);
    if (!d)
        return;
    struct dirent *de;
    char path[4096];
    while ((de = readdir(d))) {
        if (!strncmp(de->d_name, ".step-", 6) && strstr(de->d_name, ".tmp.")) {
            snprintf(path, sizeof path, "%s/%s", run, de->d_name);
            trainckpt_remove_dir(path, NULL);
        }
    }
    closedir(d);
}

static int keep_last(const char *run, int keep, dsv3_err *e)
{
    int64_t *v;
    int n;
    if (keep <= 0)
        return 0;
    if (list_steps(run, &v, &n, e))
        return -1;
    char name[64], path[4096];
    int rc = 0;
    for (int i = 0; i + keep < n && !rc; i++) {
        step_name(name, sizeof name, (uint64_t)v[i]);
        snprintf(path, sizeof path, "%s/%s", run, name);
        rc = trainckpt_remove_dir(path, e);
    }
    free(v);
    return rc;
}

int trainckpt_begin(const char *run, uint64_t step, long id, char *tmp, size_t n, dsv3_err *e)
{
    char name[64];
    step_name(name, sizeof name, step);
    snprintf(tmp, n, "%s/.%s.tmp.%ld", run, name, id);
    if (trainckpt_remove_dir(tmp, e))
        return -1;
    if (mkdir(tmp, 0777))
        return err_errno(e, "%s: cannot create", tmp);
    return 0;
}

int trainckpt_commit(const char *run, const char *tmp, const train_state *st, int keep,
                     dsv3_err *e)
{
    char name[64], final[4096], path[4200];
    step_name(name, sizeof name, st->step);
    snprintf(final, sizeof final, "%s/%s", run, name);
    snprintf(path, sizeof path, "%s/state.json", tmp);
    int rc = write_state(path, st, e);
    if (!rc)
        rc = fsync_path(tmp, e);
    /* A folder of this step may exist when a run resumed from an earlier checkpoint than
     * its newest: it is replaced. */
    if (!rc && trainckpt_remove_dir(final, e))
        rc = -1;
    if (!rc && rename(tmp, final))
        rc = err_errno(e, "%s: cannot rename to %s", tmp, final);
    if (!rc)
        rc = fsync_path(run, e);
    if (rc) {
        trainckpt_remove_dir(tmp, NULL);
        return -1;
    }
    char text[80];
    snprintf(text, sizeof text, "%s\n", name);
    snprintf(path, sizeof path, "%s/latest", run);
    if (write_text(path, text, e))
        return -1;
    return keep_last(run, keep, e);
}

int trainckpt_save(const char *run, const dsv3_model *m, const optim *o, const train_state *st,
                   int keep, int crash_at, dsv3_err *e)
{
    char tmp[4096], path[4200];
    if (trainckpt_begin(run, st->step, (long)getpid(), tmp, sizeof tmp, e))
        return -1;
    /* Each file is committed through lib/outfile: written, fsynced, renamed in tmp. */
    int rc = model_save(m, tmp, e);
    if (!rc) {
        snprintf(path, sizeof path, "%s/optim.safetensors", tmp);
        rc = optim_save(o, m, path, e);
    }
    if (!rc && crash_at)
        raise(SIGKILL);
    if (rc) {
        trainckpt_remove_dir(tmp, NULL);
        return -1;
    }
    return trainckpt_commit(run, tmp, st, keep, e);
}

void trainckpt_shard_name(char *buf, size_t n, int rank, int world)
{
    snprintf(buf, n, "optim-rank%05d-of-%05d.safetensors", rank, world);
}

int trainckpt_load_optim(const char *dir, uint32_t world, optim *o, const dsv3_model *m,
                         dsv3_err *e)
{
    char path[4200], name[64];
    if (world <= 1) {
        snprintf(path, sizeof path, "%s/optim.safetensors", dir);
        return optim_load(o, m, path, e);
    }
    int64_t step = -1;
    size_t covered = 0, lo, hi;
    for (uint32_t r = 0; r < world; r++) {
        dp_shard_range(m->n_params, (int)world, (int)r, &lo, &hi);
        int overlaps = lo < o->lo + o->n && hi > o->lo;
        /* Shard 0 is always read: the step count comes with every shard. */
        if (!overlaps && !(r == 0 && o->n == 0))
            continue;
        size_t c = 0;
        trainckpt_shard_name(name, sizeof name, (int)r, (int)world);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (optim_load_shard(o, m, path, (int)r, (int)world, &step, &c, e))
            return -1;
        covered += c;
    }
    if (covered != o->n)
        return err_set(e, "%s: the %u optimizer shards cover %zu of the %zu elements of this "
                       "rank's range", dir, world, covered, o->n);
    return 0;
}
