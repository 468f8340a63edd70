/* trainckpt: the training checkpoints of a run folder, written so a crash never leaves a
 * half-written one where a resume would pick it up.
 *
 * Owns the layout of RUN/ (docs/train-format.md):
 *   RUN/step-NNNNNN/   model.safetensors + config.json (model_save: HF names, F32, the
 *                      balance biases included), optim.safetensors (optim_save),
 *                      state.json (train_state below)
 *                      (a job of N > 1 data-parallel ranks writes instead one
 *                      optim-rankRRRRR-of-NNNNN.safetensors per rank: optim_save_shard)
 *   RUN/latest         "step-NNNNNN\n": the newest complete checkpoint
 * A checkpoint is built as RUN/.step-NNNNNN.tmp.PID, every file synced, the folder synced,
 * then renamed to step-NNNNNN and RUN synced; `latest` is replaced atomically after. Only
 * then are checkpoints beyond the last K removed. A stale .tmp folder left by a crash is
 * never read and is removed by trainckpt_clean. Several ranks write into one temporary folder
 * (trainckpt_begin, each rank's files, trainckpt_commit by rank 0, with the ranks agreeing
 * between the phases: lib/train). */
#ifndef DSV3_TRAINCKPT_H
#define DSV3_TRAINCKPT_H

#include <stdint.h>

#include "err.h"
#include "loader.h"
#include "model.h"
#include "optim.h"

/* Everything besides weights and moments that the next step depends on. */
typedef struct train_state {
    uint64_t step;          /* updates done (skipped non-finite batches included) */
    uint64_t tokens;        /* input tokens consumed by them */
    uint64_t skipped;       /* batches skipped for a non-finite loss or gradient */
    loader_pos data;        /* the train loader's next position */
    uint64_t seed;          /* --seed of the run */
    uint64_t rng;           /* the trainer's splitmix64 state, advanced once per step */
    char tokenizer_id[17];  /* the data's, from its manifest (16 hex digits) */
    uint32_t seq_len;       /* the data's L */
    uint32_t world;         /* data-parallel ranks of the job that wrote it (1 if absent) */
    uint32_t ep;            /* its expert-parallel ranks, --ep (1 if absent) */
    int route_known;        /* 1: the routing below was recorded (states written before
                               "route_nodes" existed leave it 0: routing unknown) */
    uint32_t route_nodes;   /* --route-nodes M of the run (0: off) */
    uint32_t route_groups;  /* the nodes the experts were cut into (resolved, M > 0 only) */
} train_state;

/* Writes RUN/step-NNNNNN (NNNNNN = st->step, 6 digits or more) and points `latest` at it;
 * then keeps only the newest `keep` checkpoints (keep 0: all). crash_at is a test aid:
 * 1 kills the process with SIGKILL after the weights are written and before the rename
 * (what a power cut mid-save leaves); 0 in real use. */
int trainckpt_save(const char *run, const dsv3_model *m, const optim *o, const train_state *st,
                   int keep, int crash_at, dsv3_err *e);

/* The phases of trainckpt_save, for jobs of several ranks. trainckpt_begin (one rank)
 * removes a stale RUN/.step-NNNNNN.tmp.ID and creates it empty; its path goes into tmp.
 * trainckpt_commit (one rank, after every file is in tmp) writes state.json, syncs tmp,
 * renames it to step-NNNNNN, syncs RUN, points `latest` at it and keeps the newest `keep`;
 * on failure it removes tmp. */
int trainckpt_begin(const char *run, uint64_t step, long id, char *tmp, size_t n, dsv3_err *e);
int trainckpt_commit(const char *run, const char *tmp, const train_state *st, int keep,
                     dsv3_err *e);

/* The name of rank r's optimizer shard among `world` ranks: optim-rankRRRRR-of-NNNNN.safetensors. */
void trainckpt_shard_name(char *buf, size_t n, int rank, int world);

/* Fills o (whatever range it owns) from checkpoint DIR written by a job of `world` ranks:
 * optim.safetensors when world is 1, else the shard files that overlap o's range (which
 * may be cut for another world size: the layout is flat, so this is a re-slice). */
int trainckpt_load_optim(const char *dir, uint32_t world, optim *o, const dsv3_model *m,
                         dsv3_err *e);

/* The newest complete checkpoint of RUN into name (e.g. "step-000120"): the one `latest`
 * names, or when `latest` is missing or names none, the highest step-* folder holding a
 * state.json. Returns 1 when found, 0 when RUN holds none, -1 on error. */
int trainckpt_find(const char *run, char *name, size_t n, dsv3_err *e);

/* Reads DIR/state.json. */
int trainckpt_read_state(const char *dir, train_state *st, dsv3_err *e);

/* Removes .step-*.tmp.* folders that a crash left in RUN. */
void trainckpt_clean(const char *run);

/* Removes a folder and the files in it (one level: checkpoints hold no subfolders). */
int trainckpt_remove_dir(const char *dir, dsv3_err *e);

#endif
