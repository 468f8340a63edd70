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
 * (the moments are sharded over the replicas, lib/train). */
#ifndef DSV3_EPCKPT_H
#define DSV3_EPCKPT_H

#include <stddef.h>

#include "ep.h"
#include "err.h"
#include "model.h"

/* This rank's part of the model files in DIR (ranks >= N write nothing). */
int epckpt_save_model(const dsv3_model *m, const ep *p, const char *dir, dsv3_err *e);

/* The name of expert group g's optimizer file among n groups. */
void epckpt_optim_name(char *buf, size_t n, int group, int groups);

/* The name of replica r's piece of group g's moments among `replicas` (ep_piece): the
 * group's name when replicas is 1, else optim-experts-GGGGG-of-NNNNN-partRRRRR-of-DDDDD. */
void epckpt_optim_piece_name(char *buf, size_t n, int group, int groups, int replica,
                             int replicas);

#endif
