/* fp8_config.h: configs/tiny.json with every dimension a multiple of 128 (hidden 256, MLP
 * 512, experts 128 wide, 4 heads of 64 + 32 / 64, latents 128 and 96, 16 experts, vocabulary
 * 1000): the sizes the FP8 paths (1x128 and 128x128 scale blocks) take, for the GPU tests of
 * FP8 training and of the layers around it. The caller frees it (config_free). */
#ifndef DSV3_FP8_CONFIG_H
#define DSV3_FP8_CONFIG_H

#include "../../lib/config.h"

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

#endif
