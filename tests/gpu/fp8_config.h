/* fp8_config.h: configs/tiny.json with every dimension a multiple of 128 (hidden 256, MLP
 * 512, experts 128 wide, 4 heads of 64 + 32 / 64, latents 128 and 96, 16 experts, vocabulary
 * 1000): the sizes the FP8 paths (1x128 and 128x128 scale blocks) take, for the GPU tests of
 * FP8 training and of the layers around it. The caller frees it (config_free). */
#ifndef DSV3_FP8_CONFIG_H
#define DSV3_FP8_CONFIG_H

#include "../../lib/config.h"
#include "../../lib/model.h"
#include "../test.h"

static __attribute__((unused)) int fp8_sized_config(dsv3_config *c, dsv3_err *e)
{
    if (config_load(c, "configs/tiny.json", e))
        return -1;
    c->hidden_size = 256;
    c->intermediate_size = 512;
    c->moe_intermediate_size = 128;
    c->num_attention_heads = 4;
    c->qk_nope_head_dim = 64;
    c->qk_rope_head_dim = 32;
    c->v_head_dim = 64;
    c->kv_lora_rank = 128;
    c->q_lora_rank = 96;
    c->n_routed_experts = 16;
    c->vocab_size = 1000;
    return 0;
}

/* That config with a MoE in every layer of 8 experts, every one chosen for every token (no
 * router near tie can flip a choice between two runs), random weights of std 0.05. */
static __attribute__((unused)) int fp8_all_experts_model(dsv3_model *m, dsv3_err *e)
{
    dsv3_config c;
    if (fp8_sized_config(&c, e))
        return -1;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 8;
    c.n_group = 1;
    c.topk_group = 1;
    c.first_k_dense_replace = 0;
    int rc = model_init(m, &c, e);
    config_free(&c);
    if (rc)
        return -1;
    model_init_random(m, test_rand(), 0.05);
    return 0;
}

#endif
