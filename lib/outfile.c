#include "outfile.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *tmp_name_for(const char *path)
{
    /* Same directory as the target, so rename() never crosses a filesystem. */
    char *copy1 = strdup(path), *copy2 = strdup(path);
    if (!copy1 || !copy2) {
        free(copy1);
        free(copy2);
        return NULL;
    }
    const char *dir = dirname(copy1), *base = basename(copy2);
    size_t n = strlen(dir) + strlen(base) + 48;
    char *tmp = malloc(n);
    if (tmp)
        snprintf(tmp, n, "%s/.%s.tmp.%ld", dir, base, (long)getpid());
    free(copy1);
    free(copy2);
    return tmp;
}

int outfile_open(outfile *o, const char *path, dsv3_err *e)
{
    memset(o, 0, sizeof *o);
    if (strcmp(path, "-") == 0) {
        o->f = stdout;
        struct stat st;
        o->seekable = fstat(fileno(stdout), &st) == 0 && S_ISREG(st.st_mode) &&
                      lseek(fileno(stdout), 0, SEEK_CUR) == 0;
        return 0;
    }
    o->path = strdup(path);
    struct stat st;
    if (o->path && stat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
        /* a device or a named pipe (-o /dev/null): written in place, never renamed over */
        o->f = fopen(path, "wb");
        if (!o->f) {
            err_errno(e, "%s: cannot open", path);
            outfile_abort(o);
            return -1;
        }
        return 0;
    }
    o->tmp = o->path ? tmp_name_for(path) : NULL;
    if (!o->path || !o->tmp) {
        outfile_abort(o);
        return err_set(e, "%s: out of memory", path);
    }
    o->f = fopen(o->tmp, "w+b");
    if (!o->f) {
        err_errno(e, "%s: cannot create temporary file %s", path, o->tmp);
        outfile_abort(o);
        return -1;
    }
    o->seekable = 1;
    return 0;
}

static int fsync_dir_of(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return -1;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    free(copy);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int outfile_commit(outfile *o, dsv3_err *e)
{
    if (!o->path) {                           /* stdout: flush is all we can do */
        if (fflush(o->f) != 0)
            return err_errno(e, "<stdout>: write failed");
        return 0;
    }
    int rc = 0;
    if (!o->tmp) {                            /* a device or pipe: nothing to rename */
        if (fflush(o->f) != 0)
            rc = err_errno(e, "%s: write failed", o->path);
        if (fclose(o->f) != 0 && rc == 0)
            rc = err_errno(e, "%s: write failed", o->path);
        free(o->path);
        memset(o, 0, sizeof *o);
        return rc;
    }
    if (fflush(o->f) != 0 || fsync(fileno(o->f)) != 0)
        rc = err_errno(e, "%s: write failed", o->path);
    if (fclose(o->f) != 0 && rc == 0)
        rc = err_errno(e, "%s: write failed", o->path);
    o->f = NULL;
    if (rc == 0 && rename(o->tmp, o->path) != 0)
        rc = err_errno(e, "%s: cannot rename %s into place", o->path, o->tmp);
    if (rc == 0)
        fsync_dir_of(o->path);                /* best effort: the data itself is synced */
    if (rc != 0)
        unlink(o->tmp);
    free(o->path);
    free(o->tmp);
    o->path = o->tmp = NULL;
    return rc;
}

void outfile_abort(outfile *o)
{
    if (o->path) {
        if (o->f)
            fclose(o->f);
        if (o->tmp)
            unlink(o->tmp);
    } else if (o->f) {
        fflush(o->f);
    }
    free(o->path);
    free(o->tmp);
    memset(o, 0, sizeof *o);
}

const char *outfile_name(const outfile *o)
{
    return o->path ? o->path : "<stdout>";
}
