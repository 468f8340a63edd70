/* epckpt: the files of a training checkpoint written by expert-parallel ranks.
 *
 * Owns how the expert groups held on different ranks become one HF folder again: rank g of
 * the first replica (g < N) writes model-0000(g+1)-of-0000N.safetensors with its group's
 * routed experts (rank 0 also every replicated tensor: embedding, attention, router, shared
 * experts, norms, head, the MTP modules' copies), and rank 0 writes config.json and the
 * model.safetensors.index.json naming every tensor's file, as lib/ckpt's sharded folders;
 * model_load reads the folder whole (any process) or one group of it (model_load_ep). The
 * optimizer: each rank's ZeRO-1 shard of the replicated part under lib/trainckpt's name
 * optim-rankRRRRR-of-WWWWW.safetensors, and the moments of expert group g in
 * optim-experts-GGGGG-of-NNNNN.safetensors (one replica), or with D replicas each
 * replica's piece of them in optim-experts-GGGGG-of-NNNNN-partRRRRR-of-DDDDD.safetensors
 * (the moments are sharded over the replicas, lib/train).
 *
 * It also owns the reassembly of those moments for a job of another layout (epckpt_load_optim):
 * every tensor's moments are found by its place in the writing job's layout (the replicated
 * part in checkpoint order, then each group's experts; or the whole model's order when that
 * job was not expert-parallel) and copied, bits unchanged, into the reading optimizer's range
 * of its own layout, whatever --ep, world size and shard it has. */
#ifndef DSV3_EPCKPT_H
#define DSV3_EPCKPT_H

#include <stddef.h>

#include "ep.h"
#include "err.h"
#include "model.h"
#include "optim.h"

/* This rank's part of the model files in DIR (ranks >= N write nothing). */
int epckpt_save_model(const dsv3_model *m, const ep *p, const char *dir, dsv3_err *e);

/* The name of expert group g's optimizer file among n groups. */
void epckpt_optim_name(char *buf, size_t n, int group, int groups);

/* The name of replica r's piece of group g's moments among `replicas` (ep_piece): the
 * group's name when replicas is 1, else optim-experts-GGGGG-of-NNNNN-partRRRRR-of-DDDDD. */
void epckpt_optim_piece_name(char *buf, size_t n, int group, int groups, int replica,
                             int replicas);

/* Fills o (whatever range of m's layout it owns: a ZeRO-1 shard of the replicated part, a
 * replica's piece of the held experts, or everything) and its step count from the optimizer
 * files of checkpoint DIR, written by a job of `world` ranks with --ep `ep` (1: a single
 * process's optim.safetensors or data-parallel optim-rank shards; > 1: optim-rank shards
 * of the replicated part and the expert groups' files, whole or in replica pieces). Any
 * layout of m reads any of these: the moments are copied exactly. Only the files holding
 * o's elements are read (and one for the step count when it holds none); a missing or
 * mismatched file is an error naming it. */
int epckpt_load_optim(const char *dir, uint32_t world, uint32_t ep, optim *o,
                      const dsv3_model *m, dsv3_err *e);

#endif
