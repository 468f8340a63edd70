/* metrics: the run's metrics.jsonl (see metrics.h). */
#include "metrics.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "outfile.h"

/* Rewrites path keeping complete lines whose "step" <= keep_through. */
static int truncate_after(const char *path, uint64_t keep_through, dsv3_err *e)
{
    FILE *in = fopen(path, "r");
    if (!in)
        return 0;  /* nothing to keep */
    outfile o;
    if (outfile_open(&o, path, e)) {
        fclose(in);
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int rc = 0;
    while ((n = getline(&line, &cap, in)) > 0) {
        if (line[n - 1] != '\n')
            break;  /* cut short by a crash */
        json_t *j = json_loadb(line, (size_t)n, 0, NULL);
        json_t *s = j ? json_object_get(j, "step") : NULL;
        int keep = s && json_is_integer(s) && json_integer_value(s) >= 0 &&
                   (uint64_t)json_integer_value(s) <= keep_through;
        json_decref(j);
        if (keep && fwrite(line, 1, (size_t)n, o.f) != (size_t)n) {
            rc = err_errno(e, "%s: write failed", path);
            break;
        }
    }
    free(line);
    fclose(in);
    if (rc) {
        outfile_abort(&o);
        return -1;
    }
    return outfile_commit(&o, e);
}

int metrics_open(metrics *m, const char *run, int fresh, uint64_t keep_through, dsv3_err *e)
{
    memset(m, 0, sizeof *m);
    size_t n = strlen(run) + 16;
    m->path = malloc(n);
    if (!m->path)
        return err_set(e, "out of memory");
    snprintf(m->path, n, "%s/metrics.jsonl", run);
    if (!fresh && truncate_after(m->path, keep_through, e)) {
        metrics_close(m);
        return -1;
    }
    m->f = fopen(m->path, fresh ? "w" : "a");
    if (!m->f) {
        err_errno(e, "%s: cannot open", m->path);
        metrics_close(m);
        return -1;
    }
    return 0;
}

int metrics_write(metrics *m, json_t *obj, dsv3_err *e)
{
    char *text = obj ? json_dumps(obj, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(obj);
    if (!text)
        return err_set(e, "%s: out of memory", m->path);
    int rc = 0;
    if (fprintf(m->f, "%s\n", text) < 0 || fflush(m->f))
        rc = err_errno(e, "%s: write failed", m->path);
    free(text);
    return rc;
}

void metrics_close(metrics *m)
{
    if (m->f)
        fclose(m->f);
    free(m->path);
    memset(m, 0, sizeof *m);
}
