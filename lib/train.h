/* train: the training loop of dsv3-train on the model of lib/model.
 *
 * Owns one run: the model (fresh, --init-from a converted HF folder, or a run's checkpoint),
 * the optimizer, the data order, and the loop of updates: micro-batches of B sequences,
 * gradient accumulation to the global batch (every loss normalised by the whole step's
 * counts on all ranks, so an update's loss, its MTP and balance parts included, is the
 * same however the batch is grouped into micro-batches and ranks: docs/train-format.md),
 * clipping, the schedules of lib/sched, the AdamW update, the auxiliary-loss-free bias
 * update over the whole step's routing (the MTP blocks' included), evaluation on the val split, checkpoints (lib/trainckpt) and metrics.jsonl
 * (lib/metrics). Resuming from a checkpoint continues bit for bit: the loss of every later
 * step equals the uninterrupted run's.
 *
 * SFT mode: the loss counts only response tokens (those after an assistant-marker token,
 * up to a user-marker token), and no token attends across the documents packed in a record:
 * the record stays one row, its documents masked from each other and their positions
 * restarting at 0 (model_acts_set_segments; see train_sft_row). Pre-training runs the
 * records unmasked, as V3's recipe does, unless doc_mask is set (then also no target
 * crosses from one document into the next).
 *
 * Data parallelism (opts.comm with several ranks, lib/dp): each rank reads its share of
 * every global batch (the loader's rank split), the statistics of a step are summed over
 * the ranks, and the update is ZeRO-1: gradients reduce-scattered, each rank clipping and
 * updating its shard of the parameters with the moments of that shard alone, the
 * parameters all-gathered. Rank 0 alone logs, writes metrics.jsonl and the model files;
 * each rank writes its optimizer shard into the same checkpoint. A failure on any rank
 * stops every rank (each returns -1); a stop request on any rank stops all after the
 * step, with a checkpoint.
 *
 * Expert parallelism (opts.ep = N > 1, lib/ep): each rank holds one group of every MoE
 * layer's routed experts (parameters, gradients, moments); the routed rows travel to the
 * holders and back inside the forward and backward (model_forward with m.ep set), so
 * every rank runs the same number of forwards (a rank out of rows serves idle). The
 * replicated part is ZeRO-1 over all ranks as above; the expert part is ZeRO-1 over the
 * world / N replicas of each group (gradients reduce-scattered, each replica updating its
 * piece with that piece's moments, parameters all-gathered). Checkpoints stay one full
 * HF folder (one model shard per expert group, with an index), resumable on the same world
 * size and N only. A rank failing inside a pass still takes part in its exchanges until
 * the ranks agree it failed (lib/model: model_ep_fail): every rank then returns -1. */
#ifndef DSV3_TRAIN_H
#define DSV3_TRAIN_H

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

#include "comm.h"
#include "err.h"
#include "loader.h"
#include "model.h"
#include "optim.h"
#include "sched.h"

typedef struct train_opts {
    const char *config;     /* -c: required for a fresh run; checked against the model when
                               the model comes from --init-from or a checkpoint */
    const char *data, *run, *init_from;
    int resume, force;
    uint32_t micro_batch;   /* B: sequences per forward */
    uint64_t global_batch;  /* sequences per update (a multiple of B); 0: global_tokens */
    uint64_t global_tokens; /* tokens per update, rounded down to whole micro-batches; 0: B */
    uint64_t ramp_first;    /* batch-size ramp: sequences at the start (0: no ramp) ... */
    double ramp_span;       /* ... growing linearly to the global batch over this span */
    sched_unit ramp_unit;
    sched_lr lr;
    sched_switch gamma;     /* bias-update speed */
    sched_switch mtp_weight;/* MTP loss weight lambda */
    double alpha;           /* sequence-wise balance loss weight */
    optim_params adam;
    double clip;            /* global gradient norm limit, <= 0: none */
    double init_std;        /* fresh runs: initialisation std (<= 0: the config's) */
    uint64_t max_steps, max_tokens;  /* stop at whichever comes first (0: not set) */
    uint64_t eval_every, eval_batches, save_every;
    int keep;               /* checkpoints kept (0: all) */
    uint64_t seed;
    int skip_nonfinite;     /* 1: skip an update whose loss or gradient is not finite */
    int sft;
    int doc_mask;           /* pre-training: mask attention by document (SFT always does) */
    int64_t sft_user_id, sft_assistant_id;  /* -1: none */
    const char *command;    /* the command line, appended to RUN/command.txt */
    FILE *log;              /* notes and errors of the run (NULL: none); rank 0 only */
    FILE *out;              /* one line per update and per evaluation (NULL: none); rank 0 */
    double peak_tflops;     /* the GPU's BF16 peak for the MFU column (<= 0: from the GPU's
                               name for H100/H200, else no MFU) */
    comm *comm;             /* the job (NULL: one process) */
    volatile sig_atomic_t *stop;  /* set by a signal: checkpoint after this step and return */
    int crash_in_save;      /* test aid: SIGKILL inside the N-th checkpoint write (0: never) */
    int ep_fail_rank, ep_fail_at;  /* test aid: under --ep, rank ep_fail_rank runs out of
                               memory for the ep_fail_at-th block of expert rows it is to
                               receive (0: never): the job must stop on every rank */
    int cuda;               /* 1: forward and backward on the GPU (kernels/gmodel), AdamW
                               too (on each rank's shard under ZeRO); the balance update
                               stays on the host arrays (dsv3-train sets it
                               when a GPU is present unless --device cpu) */
    int fp8;                /* 1 (with cuda): dense linear layers in FP8 (gmodel_set_fp8) */
    int fp8_min_dim;        /* with fp8: the least min(in, out) of a layer run in FP8 (0:
                               every one); -1: the library's bound (GMODEL_FP8_MIN_DIM,
                               or DSV3_FP8_MIN_DIM in the environment) */
    int recompute;          /* 1 (with cuda): RMSNorm outputs and MLA up-projections made
                               again in backward, not kept (GMODEL_RECOMPUTE) */
    int nondet;             /* 1 (with cuda and documents masked): kernels whose sums vary
                               run to run where faster (GMODEL_NONDET); 0: bit-reproducible */
    int ep;                 /* expert parallelism over this many ranks (0/1: off; lib/ep):
                               rank r holds routed-expert group r mod ep only */
    int route_nodes;        /* node-limited routing: a token's experts on at most this many
                               nodes (0: off, the config's group rule) */
    int route_groups;       /* ... the number of nodes the experts are cut into (0: from the
                               EP layout and the launcher's ranks per node) */
} train_opts;

void train_opts_default(train_opts *o);

typedef struct train_result {
    uint64_t step, tokens;
    double loss;            /* of the last update */
    int stopped;            /* 1: ended by *stop */
    char checkpoint[64];    /* the last checkpoint written or resumed from ("" if none) */
} train_result;

int train_run(const train_opts *o, train_result *r, dsv3_err *e);

/* b_i += gamma * sign(mean load - load_i) per MoE layer, from counts summed over all
 * forwards of a step: the rule of model_balance_update applied to a whole accumulated step
 * rather than its last forward. counts is [num_hidden_layers + D][E] (D: the config's MTP
 * modules); the main layers together routed `tokens` tokens, MTP module k's block
 * mtp_slots[k] slots (model_mtp_expert_load's, summed). mtp_slots NULL: the MTP blocks'
 * biases stay (and their rows of counts are not read). */
void train_balance_update(dsv3_model *m, const int64_t *counts, int64_t tokens,
                          const int64_t *mtp_slots, float gamma);

/* The SFT row of one loader row (tokens, targets, mask, segment of L positions): ids, the
 * targets that count (as train_sft_unpack: mask set, same document, response token; -1
 * elsewhere), and seg/pos for model_acts_set_segments (positions restarting at 0 in each
 * document). Returns the number of counted targets, -1 when out of memory. */
int train_sft_row(const uint32_t *tokens, const uint32_t *targets, const uint8_t *mask,
                  const uint32_t *segment, uint32_t L, int64_t user_id, int64_t assistant_id,
                  int32_t *ids, int32_t *tgt, int32_t *seg, int32_t *pos);

/* seg/pos [L] for model_acts_set_segments from a loader row's segment numbers. */
void train_doc_positions(const uint32_t *segment, uint32_t L, int32_t *seg, int32_t *pos);

/* The SFT trainer's former method, kept as the reference train_sft_row is tested against:
 * SFT rows of one loader row (tokens, targets, mask, segment of L positions): one output
 * row of L ids/targets per document segment, the segment moved to position 0 and the rest
 * padded (id 0, target -1); a target counts only where mask is set, it lies in the same
 * segment (at the last position of the record: assumed so) and it is a response token.
 * Response tokens: inside a segment, those after a token equal to assistant_id and before
 * the next user_id; marker tokens themselves are prompt; a segment starts in the prompt.
 * Rows without a counted target are left out. Writes at most one row per segment (segment
 * numbers ascend from 0 in a loader row: segment[L-1] + 1 rows), each L long, to ids/tgt;
 * returns the number written, -1 when out of memory. */
int train_sft_unpack(const uint32_t *tokens, const uint32_t *targets, const uint8_t *mask,
                     const uint32_t *segment, uint32_t L, int64_t user_id,
                     int64_t assistant_id, int32_t *ids, int32_t *tgt);

#endif
