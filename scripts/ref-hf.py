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

mtp_bal adds what transformers does not compute: num_nextn_predict_layers (D = 2) Multi-
Token Prediction modules and the sequence-wise balance loss, from a PyTorch reference written
here from the V3 report's equations (section 2.2 eq. 21-25, 2.1.2 eq. 17-20) on top of
transformers' own modules (embedding, RMSNorm, decoder layer, rotary embedding, lm_head):

  module k (1..D) sees T-k tokens: h'_i = eh_proj [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]
  (embedding half first: the column order of eh_proj in DeepSeek's released weights, as
  vLLM and SGLang apply them; the report writes the halves the other way round), h^0 the
  main model's last hidden state before model.norm; h^k = block_k(h'); logits
  lm_head(shared_head.norm(h^k)) predict t_{i+k+1}; L_MTP = lambda/D sum_k CE_k.
  L_bal = alpha * sum over MoE blocks (main and MTP) of the mean over sequences of
  sum_i f_i P_i, f_i = E/(K T) #(tokens choosing i), P_i = mean_t s_{i,t} / sum_j s_{j,t}.

Its checkpoint holds the MTP layers as DeepSeek's does (model.layers.L.{enorm, hnorm,
eh_proj, block tensors, shared_head.norm} and copies embed_tokens and shared_head.head), and
ref.safetensors adds mtp_logits.K (F32 [B,T-K-1,V]), mtp_loss (F32 [D]), balance, total,
mtp_lambda and balance_alpha, with grad.NAME of d(total)/dNAME for every parameter, MTP
ones included.

The models differ in what they exercise: q_lora_rank set or null, YaRN (with mscale !=
mscale_all_dim, so both the cos/sin factor and the softmax scale matter) or plain RoPE,
interleaved or not, n_group > 1 with topk_group < n_group, norm_topk_prob on and off, one
or two dense layers. Weights are drawn with std 0.1 (not 0.02) and the router's correction
bias is random, so that routing decisions have margins far above float32 noise: the script
refuses a model whose top-k or group choice is closer than MARGIN, because a C forward that
is right to 1e-6 could then legitimately pick another expert.

Needs torch, transformers (5.x) and safetensors. Run: python3 scripts/ref-hf.py [OUT [NAME...]]
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer,
                                                                  DeepseekV3RMSNorm)

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
    # Two MTP modules and the balance loss (weights far above V3's 0.3 and 0.0001, so that
    # their gradients show).
    "mtp_bal": dict(
        COMMON, num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=16,
        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True,
        rope_interleave=True, num_nextn_predict_layers=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
        batch=2, seq=10, mtp_lambda=0.3, balance_alpha=0.1),
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


def choose(s, bias, cfg):
    """DeepSeek-V3's group-limited top-k on affinities s [N,E] with the selection bias."""
    sc = s + bias
    per = cfg.n_routed_experts // cfg.n_group
    g = sc.view(-1, cfg.n_group, per).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(g).scatter_(1, g.topk(cfg.topk_group, dim=-1)[1], 1.0)
    mask = keep.repeat_interleave(per, dim=1) > 0
    return sc.masked_fill(~mask, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1)[1]


def margins(cfg, gates):
    """Smallest gap, over tokens and MoE blocks, between the last chosen and the first
    unchosen expert score, and between the last kept and first dropped group score.
    gates: (weight, bias, x) per MoE block."""
    worst = float("inf")
    for w, b, x in gates:
        sc = torch.sigmoid(x.reshape(-1, cfg.hidden_size) @ w.T) + b
        per = cfg.n_routed_experts // cfg.n_group
        g = sc.view(-1, cfg.n_group, per)
        gs = g.topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
        if cfg.topk_group < cfg.n_group:
            worst = min(worst, (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).min().item())
        keep = gs[:, cfg.topk_group - 1: cfg.topk_group]
        mask = (g.topk(2, dim=-1)[0].sum(-1) >= keep).repeat_interleave(per, dim=1)
        ch = sc.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True)[0]
        k = cfg.num_experts_per_tok
        worst = min(worst, (ch[:, k - 1] - ch[:, k]).min().item())
    return worst


def balance(cfg, w, bias, x, B, T):
    """Sequence-wise balance loss of one MoE block without alpha (report eq. 17-20), mean
    over the B sequences; x [B*T, H] the router's input."""
    s = torch.sigmoid(x.reshape(B, T, cfg.hidden_size) @ w.T)       # [B,T,E]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    idx = choose(s.detach().reshape(B * T, E), bias, cfg).reshape(B, T, K)
    f = torch.zeros(B, E).scatter_add_(1, idx.reshape(B, T * K), torch.ones(B, T * K))
    f = f * E / (K * T)
    P = (s / s.sum(-1, keepdim=True)).mean(1)                          # [B,E]
    return (f * P).sum(-1).mean()


class MTP(torch.nn.Module):
    """One MTP module of the report's section 2.2, with transformers' parts."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * H, H, bias=False)
        self.block = DeepseekV3DecoderLayer(cfg, layer_idx)
        self.head_norm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)

    def forward(self, main, emb, h):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        T = x.shape[1]
        pos = torch.arange(T)[None]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        out = self.block(x, attention_mask=mask, position_ids=pos,
                         position_embeddings=main.model.rotary_emb(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        return out, main.lm_head(self.head_norm(out))


def mtp_name(k, L):
    """HF/DeepSeek checkpoint name of an MTP module's parameter k at layer index L."""
    if k.startswith("block."):
        return f"model.layers.{L}.{k[6:]}"
    if k.startswith("head_norm."):
        return f"model.layers.{L}.shared_head.norm.{k[10:]}"
    return f"model.layers.{L}.{k}"


def randomize(module):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))  # not all ones: tests the weight
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for m in module.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.1 * torch.randn_like(m.e_score_correction_bias))


def mtp_and_balance(model, cfg, ids, labels, h0, main_gates, lam, alpha, seed):
    """The MTP modules and the balance loss (see the top of this file). Returns the modules,
    each module's logits [B,T-k,V] and loss, the balance loss, and the MTP blocks' gates."""
    B, T = ids.shape
    D = cfg.num_nextn_predict_layers if lam else 0
    torch.manual_seed(seed)
    mtps = [MTP(cfg, cfg.num_hidden_layers + k).float() for k in range(D)]
    for mm in mtps:
        randomize(mm)
    prev, logits, losses, gates = h0, [], [], []
    for k in range(1, D + 1):
        mm, Tk = mtps[k - 1], T - k
        cap = {}
        hook = mm.block.mlp.register_forward_hook(lambda m, a, o: cap.__setitem__("x", a[0]))
        out, lk = mm(model, model.model.embed_tokens(ids[:, k:]), prev[:, :Tk])
        hook.remove()
        gates.append((mm.block.mlp.gate.weight, mm.block.mlp.gate.e_score_correction_bias,
                      cap["x"], Tk))
        losses.append(torch.nn.functional.cross_entropy(
            lk[:, :Tk - 1].reshape(-1, cfg.vocab_size), labels[:, k + 1:].reshape(-1),
            ignore_index=-100))
        logits.append(lk)
        prev = out
    bal = sum(balance(cfg, w, b, x, B, t) for w, b, x, t in main_gates + gates) * alpha
    return mtps, logits, losses, bal, gates


def build(name, spec, out_root, seed):
    spec = dict(spec)
    batch, seq = spec.pop("batch"), spec.pop("seq")
    spelling4 = spec.pop("spelling4", False)
    lam, alpha = spec.pop("mtp_lambda", 0.0), spec.pop("balance_alpha", 0.0)
    extra = bool(lam or alpha)
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
        if extra:
            # Router inputs with their graph (balance loss) and the last hidden state
            # before model.norm (h^0 of the MTP modules).
            live = {}
            hooks += [l.mlp.register_forward_hook(
                lambda m, a, o, l=l: live.__setitem__(l, a[0])) for l in model.model.layers]
            hooks.append(model.model.norm.register_forward_hook(
                lambda m, a, o: live.__setitem__("h0", a[0])))
        out = model(input_ids=ids, labels=labels, output_hidden_states=True)
        for h in hooks:
            h.remove()
        margin = route_margins(model, cfg, seen)
        if extra:
            main_gates = [(l.mlp.gate.weight, l.mlp.gate.e_score_correction_bias, live[l], seq)
                          for l in model.model.layers if hasattr(l.mlp, "gate")]
            mtps, mtp_logits, mtp_losses, bal, mtp_gates = mtp_and_balance(
                model, cfg, ids, labels, live["h0"], main_gates, lam, alpha,
                seed + 1000 * attempt + 7)
            margin = min(margin, margins(cfg, [(w, b, x.detach()) for w, b, x, _ in mtp_gates]))
        if margin > MARGIN:
            break
        print(f"{name}: seed attempt {attempt} has routing margin {margin:.2e}; redrawing")
    else:
        sys.exit(f"{name}: no seed gave routing margins above {MARGIN}")
    if extra:
        D = len(mtps)
        total = out.loss + bal + (lam / D * sum(mtp_losses) if D else 0)
        total.backward()
    else:
        out.loss.backward()

    d = os.path.join(out_root, name)
    model.save_pretrained(d, safe_serialization=True)
    saved = load_file(os.path.join(d, "model.safetensors"))
    sd = unfuse({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    grads = unfuse({k: p.grad.detach() for k, p in model.named_parameters()}, cfg)
    if extra:
        # The MTP layers as DeepSeek's checkpoint lays them out, with the embedding and head
        # copies.
        for k, mm in enumerate(mtps):
            L = cfg.num_hidden_layers + k
            sd.update(unfuse({mtp_name(n, L): v.detach() for n, v in mm.state_dict().items()},
                             cfg))
            grads.update(unfuse({mtp_name(n, L): p.grad.detach()
                                 for n, p in mm.named_parameters()}, cfg))
            sd[f"model.layers.{L}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
            sd[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
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
    if extra:
        for k, lg in enumerate(mtp_logits):
            ref[f"mtp_logits.{k + 1}"] = lg.detach().float().contiguous()
        ref["mtp_loss"] = torch.stack(mtp_losses).detach().float().reshape(-1)
        ref["balance"] = bal.detach().float().reshape(1)
        ref["total"] = total.detach().float().reshape(1)
        ref["mtp_lambda"] = torch.tensor([lam], dtype=torch.float32)
        ref["balance_alpha"] = torch.tensor([alpha], dtype=torch.float32)
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
    # transformers builds no MTP modules: their tensors (layer index >= num_hidden_layers)
    # are the only unexpected keys allowed.
    info["unexpected_keys"] = [k for k in info["unexpected_keys"]
                               if not (k.startswith("model.layers.") and
                                       int(k.split(".")[2]) >= cfg.num_hidden_layers)]
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys")}
    if bad:
        sys.exit(f"{name}: reload not clean: {bad}")
    print(f"{name}: loss {out.loss.item():.6f}, logits {tuple(out.logits.shape)}, "
          f"routing margin {margin:.2e}, {len(sd)} tensors")
    if extra:
        print(f"{name}: MTP losses {[round(x.item(), 6) for x in mtp_losses]}, "
              f"balance {bal.item():.6g}, total {total.item():.6f}")


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf"
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    only = sys.argv[2:]  # model names to build (default: all)
    for i, (name, spec) in enumerate(MODELS.items()):
        if not only or name in only:
            build(name, spec, out_root, seed=1234 + i)


if __name__ == "__main__":
    main()
