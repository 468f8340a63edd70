/* outdir: output folders complete or absent. See outdir.h. */
#include "outdir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "outfile.h"

static int remove_one(const char *path, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)ftw;
    return type == FTW_DP ? rmdir(path) : unlink(path);
}

void outdir_remove_tree(const char *dir)
{
    nftw(dir, remove_one, 16, FTW_DEPTH | FTW_PHYS);
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

/* The parent folder of DIR (malloc'd). */
static char *parent_of(const char *dir)
{
    char *c = strdup(dir);
    if (!c)
        return NULL;
    char *p = strdup(dirname(c));
    free(c);
    return p;
}

/* Removes .BASE.tmp.PID folders in PARENT whose process is gone: what a killed run left. */
static void remove_stale(const char *parent, const char *base)
{
    DIR *dd = opendir(parent);
    if (!dd)
        return;
    char prefix[4200], p[4400];
    snprintf(prefix, sizeof prefix, ".%s.tmp.", base);
    size_t pl = strlen(prefix);
    struct dirent *de;
    while ((de = readdir(dd))) {
        char *end;
        if (strncmp(de->d_name, prefix, pl))
            continue;
        long pid = strtol(de->d_name + pl, &end, 10);
        if (*end || pid <= 0 || pid == (long)getpid())
            continue;
        if (kill((pid_t)pid, 0) == -1 && errno == ESRCH) {
            snprintf(p, sizeof p, "%s/%s", parent, de->d_name);
            outdir_remove_tree(p);
        }
    }
    closedir(dd);
}

int outdir_open(outdir *d, const char *dir, int force, dsv3_err *e)
{
    memset(d, 0, sizeof *d);
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode))
            return err_set(e, "%s: exists and is not a folder", dir);
        if (!force)
            return err_set(e, "%s: exists (use --force to replace it)", dir);
    }
    char *c1 = strdup(dir), *c2 = strdup(dir);
    size_t need = strlen(dir) + 64;
    d->tmp = malloc(need);
    d->final = strdup(dir);
    if (!c1 || !c2 || !d->tmp || !d->final) {
        free(c1);
        free(c2);
        outdir_abort(d);
        return err_set(e, "%s: out of memory", dir);
    }
    size_t l = strlen(c2);
    while (l > 1 && c2[l - 1] == '/')  /* so basename names the folder */
        c2[--l] = 0;
    char *parent = dirname(c1), *base = basename(c2);
    remove_stale(parent, base);
    snprintf(d->tmp, need, "%s/.%s.tmp.%ld", parent, base, (long)getpid());
    free(c1);
    free(c2);
    outdir_remove_tree(d->tmp);  /* a leftover of an earlier crash with our pid */
    if (mkdir(d->tmp, 0777)) {
        int rc = err_errno(e, "%s: cannot create %s", dir, d->tmp);
        free(d->tmp);
        free(d->final);
        memset(d, 0, sizeof *d);
        return rc;
    }
    return 0;
}

int outdir_copy(const char *folder, const char *src, const char *name, dsv3_err *e)
{
    char path[4400];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", folder, name) >= sizeof path)
        return err_set(e, "%s/%s: path too long", folder, name);
    FILE *in = fopen(src, "rb");
    if (!in)
        return err_errno(e, "%s", src);
    outfile of;
    if (outfile_open(&of, path, e)) {
        fclose(in);
        return -1;
    }
    char buf[1 << 16];
    size_t n;
    int bad = 0;
    while (!bad && (n = fread(buf, 1, sizeof buf, in)) > 0)
        bad = fwrite(buf, 1, n, of.f) != n;
    if (ferror(in)) {
        fclose(in);
        outfile_abort(&of);
        return err_errno(e, "%s: read failed", src);
    }
    fclose(in);
    if (bad) {
        outfile_abort(&of);
        return err_errno(e, "%s: write failed", path);
    }
    return outfile_commit(&of, e);
}

/* Puts the finished folder at final, swapping out any folder already there. */
static int swap_in(const outdir *d, dsv3_err *e)
{
    struct stat sb;
    if (stat(d->final, &sb) != 0) {
        if (rename(d->tmp, d->final))
            return err_errno(e, "%s: cannot rename %s into place", d->final, d->tmp);
        return 0;
    }
    if (!S_ISDIR(sb.st_mode))
        return err_set(e, "%s: exists and is not a folder", d->final);
    if (renameat2(AT_FDCWD, d->tmp, AT_FDCWD, d->final, RENAME_EXCHANGE) == 0) {
        outdir_remove_tree(d->tmp);  /* now the old folder */
        return 0;
    }
    char old[4400];
    snprintf(old, sizeof old, "%s.old", d->tmp);
    if (rename(d->final, old))
        return err_errno(e, "%s: cannot move the old folder aside", d->final);
    if (rename(d->tmp, d->final)) {
        int saved = errno;
        rename(old, d->final);
        errno = saved;
        return err_errno(e, "%s: cannot rename %s into place", d->final, d->tmp);
    }
    outdir_remove_tree(old);
    return 0;
}

int outdir_commit(outdir *d, dsv3_err *e)
{
    int rc = fsync_dir(d->tmp) ? err_errno(e, "%s: cannot sync", d->tmp) : 0;
    if (!rc)
        rc = swap_in(d, e);
    if (rc) {
        outdir_abort(d);
        return -1;
    }
    char *parent = parent_of(d->final);
    if (parent) {  /* the rename is durable once the parent is synced */
        fsync_dir(parent);
        free(parent);
    }
    free(d->tmp);
    free(d->final);
    memset(d, 0, sizeof *d);
    return 0;
}

void outdir_abort(outdir *d)
{
    if (d->tmp)
        outdir_remove_tree(d->tmp);
    free(d->tmp);
    free(d->final);
    memset(d, 0, sizeof *d);
}
