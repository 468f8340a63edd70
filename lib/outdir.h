/* outdir: output folders that are complete or absent.
 *
 * A program writing a checkpoint folder writes every file into a hidden sibling folder
 * (.NAME.tmp.PID beside NAME); outdir_commit syncs it and renames it to NAME, so a run
 * that is interrupted leaves only the hidden folder, never a NAME that looks complete.
 * An existing NAME is refused unless force is set; then it is swapped out in one step
 * (renameat2 RENAME_EXCHANGE, or two renames where the filesystem lacks it) and deleted.
 * Opening also deletes hidden folders for NAME that killed runs left (their PID is gone).
 * lib/ckpt (whole models), dsv3-convert and dsv3-quant write their folders through it. */
#ifndef DSV3_OUTDIR_H
#define DSV3_OUTDIR_H

#include "err.h"

typedef struct outdir {
    char *final;   /* NAME as given */
    char *tmp;     /* the hidden folder being filled */
} outdir;

/* Checks NAME (absent, or a folder when force), creates the hidden folder. */
int outdir_open(outdir *d, const char *dir, int force, dsv3_err *e);

/* Copies the file SRC into FOLDER (the hidden one, d->tmp) as NAME, through lib/outfile. */
int outdir_copy(const char *folder, const char *src, const char *name, dsv3_err *e);

/* Syncs the folder and puts it at NAME. On failure the hidden folder is removed. */
int outdir_commit(outdir *d, dsv3_err *e);

/* Removes the hidden folder and what is in it. */
void outdir_abort(outdir *d);

/* Deletes a folder and everything below it; links are removed, not followed. */
void outdir_remove_tree(const char *dir);

#endif
