/* ckpt: model checkpoints as HF folders, written whole or not at all.
 *
 * Owns the folder-level format: config.json plus either one model.safetensors or, when the
 * tensors exceed a maximum shard size, model-0000k-of-0000n.safetensors shards and the
 * model.safetensors.index.json that maps each tensor to its shard ({"metadata":
 * {"total_size": bytes}, "weight_map": {name: file}}), as transformers' save_pretrained
 * writes them. Tensors keep the checkpoint order of lib/model (with the MTP layers' copies
 * of the embedding and head, as DeepSeek's release stores them) and go to shards greedily
 * in that order. Output in F32 or BF16 (round to nearest even).
 *
 * Atomic, through lib/outdir: everything is written into a hidden sibling folder
 * (.NAME.tmp.PID), each file synced, the folder synced, then renamed into place; an
 * existing folder of that name is
 * swapped out in one step (renameat2 RENAME_EXCHANGE, or two renames where the filesystem
 * lacks it) and then deleted, so a reader sees the old checkpoint or the new one, never a
 * mixture. Reading is model_load (index or single file). */
#ifndef DSV3_CKPT_H
#define DSV3_CKPT_H

#include <stdint.h>

#include "model.h"
#include "safetensors.h"

typedef struct ckpt_opts {
    st_dtype dtype;             /* ST_F32 (0, the default) or ST_BF16 */
    uint64_t max_shard_bytes;   /* 0: no limit, one model.safetensors */
} ckpt_opts;

/* Writes m into the folder DIR (replacing a folder of that name). opts may be NULL. */
int ckpt_save(const dsv3_model *m, const char *dir, const ckpt_opts *opts, dsv3_err *e);

/* Reads DIR as model_load_flags does. */
int ckpt_load(dsv3_model *m, const char *dir, int flags, dsv3_err *e);

#endif
