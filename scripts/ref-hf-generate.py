#!/usr/bin/env python3
"""ref-hf-generate.py: greedy generation of dsv3 (lib/infer on the CPU, and kernels/ginfer on
the GPU) against HF transformers' DeepseekV3ForCausalLM.generate() on the same random tiny
models, 64 new tokens each. For docs/PARITY.md.

Each model is drawn with seeded random weights (std 0.1, norms 1 +- 0.2, random correction
bias, as scripts/ref-hf.py draws them), saved as the checkpoint dsv3 loads (experts under
their one-by-one names), and given a random prompt. transformers generates greedily in
float32 on the CPU (do_sample=False, EOS off, min_new_tokens = max_new_tokens = 64) and
reports the logits of every step; then build/tests/bench/greedy_ids runs the same prompt
through dsv3 on the CPU (float32) and, when a GPU is there, through the GPU engine in fp32
and in bf16. The CPU and GPU fp32 tokens must equal transformers' for all 64 steps; bf16 may
part where transformers' top-2 logit gap is within bf16 rounding: the step and gap are
printed. Exit status 1 when a float32 engine differs.

Dimensions are multiples of 8 (the GPU kernels' requirement). Needs torch, transformers 5.x,
safetensors. Run: python3 scripts/ref-hf-generate.py [BUILD_DIR [WORK_DIR]]
"""
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

N_NEW = 64

COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
    routed_scaling_factor=2.5, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.1, hidden_act="silu",
    attention_bias=False, bos_token_id=0, eos_token_id=1,
)

MODELS = {
    "qlora_yarn": dict(
        COMMON, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=32,
        n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64, beta_fast=32.0,
                             beta_slow=1.0, mscale=0.9, mscale_all_dim=0.7)),
    "noq_plain": dict(
        COMMON, num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=None,
        n_shared_experts=2, n_group=2, topk_group=1, norm_topk_prob=False,
        rope_interleave=False, rope_parameters=dict(rope_type="default", rope_theta=500.0)),
}


def unfuse(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{p}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v.contiguous()
    return out


def build(name, spec, root, seed):
    cfg = DeepseekV3Config(**spec)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.1 * torch.randn_like(m.e_score_correction_bias))
    d = os.path.join(root, name)
    model.save_pretrained(d, safe_serialization=True)
    saved = load_file(os.path.join(d, "model.safetensors"))
    sd = unfuse({k: v.detach() for k, v in model.state_dict().items()})
    if set(saved) != set(sd):
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return model, cfg, d


def dsv3(build_dir, d, device, prompt):
    exe = os.path.join(build_dir, "tests/bench/greedy_ids")
    r = subprocess.run([exe, d, device, str(N_NEW)] + [str(t) for t in prompt],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"greedy_ids {device}: {r.stderr.strip()}")
    return [int(t) for t in r.stdout.split()]


def main():
    build_dir = sys.argv[1] if len(sys.argv) > 1 else "build"
    root = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="dsv3-hf-gen-")
    torch.set_default_dtype(torch.float32)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0 \
        if os.path.exists("/usr/bin/nvidia-smi") else False
    bad = 0
    for i, (name, spec) in enumerate(MODELS.items()):
        model, cfg, d = build(name, spec, root, 4321 + i)
        g = torch.Generator().manual_seed(99 + i)
        prompt = torch.randint(2, cfg.vocab_size, (1, 12), generator=g)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=N_NEW, min_new_tokens=N_NEW, eos_token_id=None,
                                 pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)
        hf = out.sequences[0, prompt.shape[1]:].tolist()
        gaps = []
        for s in out.scores:
            top = torch.topk(s[0].float(), 2).values
            gaps.append((top[0] - top[1]).item())
        print(f"{name}: transformers greedy {N_NEW} tokens, smallest top-2 logit gap "
              f"{min(gaps):.3g} (step {gaps.index(min(gaps))})")
        devices = ["cpu"] + (["cuda-fp32", "cuda"] if gpu else [])
        for dev in devices:
            ids = dsv3(build_dir, d, dev, prompt[0].tolist())
            same = 0
            while same < N_NEW and ids[same] == hf[same]:
                same += 1
            verdict = "identical" if same == N_NEW else \
                f"first differs at step {same} (transformers' top-2 gap there {gaps[same]:.3g})"
            print(f"{name}: dsv3 {dev}: {same}/{N_NEW} tokens equal: {verdict}")
            if same < N_NEW and dev != "cuda":
                bad = 1
    print("RESULT", "FAIL" if bad else "ok")
    sys.exit(bad)


if __name__ == "__main__":
    main()
