#!/usr/bin/env python3
"""ref-hf.py: reference fixtures from HF transformers' DeepseekV3ForCausalLM.

Builds tiny DeepSeek-V3 models with random (seeded) weights, runs transformers' forward and
backward in float32 on the CPU, and writes one folder per model under OUT (default
tests/fixtures/hf):

  config.json, model.safetensors   what save_pretrained writes (the checkpoint dsv3 loads;
                                   noq_plain's config is rewritten in the 4.x spelling)
  ref.safetensors                  input_ids (I64 [B,T]), labels (I64 [B,T], -100 ignored),
                                   logits (F32 [B,T,V]), loss (F32 [1]), hidden.K (the
                                   hidden states transformers reports), grad.NAME (dL/dNAME
                                   for every parameter, HF names, experts unfused)

The models differ in what they exercise: q_lora_rank set or null, YaRN (with mscale !=
mscale_all_dim, so both the cos/sin factor and the softmax scale matter) or plain RoPE,
interleaved or not, n_group > 1 with topk_group < n_group, norm_topk_prob on and off, one
or two dense layers. Weights are drawn with std 0.1 (not 0.02) and the router's correction
bias is random, so that routing decisions have margins far above float32 noise: the script
refuses a model whose top-k or group choice is closer than MARGIN, because a C forward that
is right to 1e-6 could then legitimately pick another expert.

Needs torch, transformers (5.x) and safetensors. Run: python3 scripts/ref-hf.py [OUT]
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

MARGIN = 2e-3

COMMON = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=3,
    routed_scaling_factor=2.5, max_position_embeddings=64, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.1, hidden_act="silu",
    attention_bias=False, bos_token_id=0, eos_token_id=1,
)

MODELS = {
    # V3's shape of choices: q compression, YaRN, interleaved rope, grouped routing.
    "qlora_yarn": dict(
        COMMON, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=16,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=16, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.9, mscale_all_dim=0.7),
        batch=2, seq=12),
    # V2-Lite's: no q compression, plain rope, not interleaved, two dense layers.
    "noq_plain": dict(
        COMMON, num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=None,
        n_shared_experts=2, n_group=2, topk_group=1, norm_topk_prob=False,
        rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=500.0),
        batch=1, seq=16, spelling4=True),
}


def unfuse(sd, cfg):
    """transformers 5.x keeps experts fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    checkpoints name them one by one. Returns the checkpoint's names."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{p}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def route_margins(model, cfg, hidden_in):
    """Smallest gap, over tokens and MoE layers, between the last chosen and the first
    unchosen expert score, and between the last kept and first dropped group score."""
    worst = float("inf")
    for layer in model.model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "gate"):
            continue
        x = hidden_in[layer]
        s = torch.sigmoid(x.reshape(-1, cfg.hidden_size) @ mlp.gate.weight.T)
        sc = s + mlp.gate.e_score_correction_bias
        g = sc.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        gs = g.topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
        if cfg.topk_group < cfg.n_group:
            worst = min(worst, (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).min().item())
        keep = gs[:, cfg.topk_group - 1 : cfg.topk_group]
        gsc = g.topk(2, dim=-1)[0].sum(-1)
        mask = (gsc >= keep).repeat_interleave(cfg.n_routed_experts // cfg.n_group, dim=1)
        ch = sc.masked_fill(~mask, 0.0).sort(dim=-1, descending=True)[0]
        k = cfg.num_experts_per_tok
        worst = min(worst, (ch[:, k - 1] - ch[:, k]).min().item())
    return worst


def build(name, spec, out_root, seed):
    spec = dict(spec)
    batch, seq = spec.pop("batch"), spec.pop("seq")
    spelling4 = spec.pop("spelling4", False)
    cfg = DeepseekV3Config(**spec)
    for attempt in range(50):
        torch.manual_seed(seed + 1000 * attempt)
        model = DeepseekV3ForCausalLM(cfg).float().eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layernorm" in n or n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))  # not all ones: tests the weight
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            for m in model.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.copy_(0.1 * torch.randn_like(m.e_score_correction_bias))
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        labels = ids.clone()
        labels[0, seq // 2] = -100  # the ignore index must be honoured
        # Record each MoE layer's input to measure routing margins.
        seen = {}
        hooks = [l.mlp.register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, a[0].detach()))
                 for l in model.model.layers]
        out = model(input_ids=ids, labels=labels, output_hidden_states=True)
        for h in hooks:
            h.remove()
        margin = route_margins(model, cfg, seen)
        if margin > MARGIN:
            break
        print(f"{name}: seed attempt {attempt} has routing margin {margin:.2e}; redrawing")
    else:
        sys.exit(f"{name}: no seed gave routing margins above {MARGIN}")
    out.loss.backward()

    d = os.path.join(out_root, name)
    model.save_pretrained(d, safe_serialization=True)
    saved = load_file(os.path.join(d, "model.safetensors"))
    sd = unfuse({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    grads = unfuse({k: p.grad.detach() for k, p in model.named_parameters()}, cfg)
    # The folder is what save_pretrained wrote; if this transformers writes fused experts,
    # rewrite the file with the checkpoint names DeepSeek and older transformers use.
    if set(saved) != set(sd):
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        print(f"{name}: save_pretrained wrote {len(saved)} tensors; rewrote {len(sd)} unfused")
    ref = {
        "input_ids": ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
    }
    for i, h in enumerate(out.hidden_states):
        ref[f"hidden.{i}"] = h.detach().float().contiguous()
    for k, g in grads.items():
        ref[f"grad.{k}"] = g.float().contiguous()
    save_file(ref, os.path.join(d, "ref.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "routing_margin": f"{margin:.3e}"})
    if spelling4:
        # DeepSeek's released files and transformers 4.x: top-level rope_theta and
        # rope_scaling (null here); dsv3 must read this spelling, and 5.x still loads it.
        cp = os.path.join(d, "config.json")
        c = json.load(open(cp))
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp["rope_theta"]
        c["rope_scaling"] = None
        for k in ("head_dim", "qk_head_dim"):
            c.pop(k)
        json.dump(c, open(cp, "w"), indent=2)
    # Strict reload: no missing or unexpected keys in what we wrote.
    _, info = DeepseekV3ForCausalLM.from_pretrained(d, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys")}
    if bad:
        sys.exit(f"{name}: reload not clean: {bad}")
    print(f"{name}: loss {out.loss.item():.6f}, logits {tuple(out.logits.shape)}, "
          f"routing margin {margin:.2e}, {len(sd)} tensors")


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf"
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for i, (name, spec) in enumerate(MODELS.items()):
        build(name, spec, out_root, seed=1234 + i)


if __name__ == "__main__":
    main()
