/* hfdir: an HF checkpoint folder opened for reading, whatever its size.
 *
 * The folder holds config.json and either model.safetensors or
 * model.safetensors.index.json ({"weight_map": {tensor: file}}) and the shards it names.
 * Every shard is memory-mapped (lib/safetensors checks each header), so a tensor is a
 * pointer into the page cache and a converter touches one at a time. Opening checks that
 * the folder is consistent: every shard the index names exists and parses, every tensor
 * the index lists is in the shard it names, every tensor of a shard is listed for that
 * shard (so no tensor is in two shards), no file name leaves the folder. Other files
 * (generation_config.json, tokenizer files, a training checkpoint's optimizer state) are
 * not read. Lookup by name is a binary search over all shards. */
#ifndef DSV3_HFDIR_H
#define DSV3_HFDIR_H

#include "config.h"
#include "err.h"
#include "safetensors.h"

typedef struct hfdir_entry {
    const char *name;      /* the tensor's name (owned by its st_file) */
    int file;              /* index into files */
    const st_tensor *t;
} hfdir_entry;

typedef struct hfdir {
    char *dir;
    dsv3_config cfg;       /* config.json, checked */
    st_file *files;        /* shards sorted by file name, or the one model.safetensors */
    char **file_names;     /* their names inside the folder */
    int n_files;
    int indexed;           /* 1: read through model.safetensors.index.json */
    hfdir_entry *ent;      /* every tensor, sorted by name */
    int n_ent;
    uint64_t data_bytes;   /* sum of the tensors' sizes */
} hfdir;

int hfdir_open(hfdir *h, const char *dir, dsv3_err *e);
void hfdir_close(hfdir *h);

/* The tensor of that name (and its shard's index in *file when file is not NULL), or NULL. */
const st_tensor *hfdir_find(const hfdir *h, const char *name, int *file);

/* Its position in ent, or -1. */
int hfdir_index(const hfdir *h, const char *name);

#endif
