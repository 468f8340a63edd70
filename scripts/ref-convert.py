#!/usr/bin/env python3
"""ref-convert.py: do dsv3-convert's and dsv3-quant's folders load in HF transformers, and
do they give the reference's logits? A device check (torch, transformers 5.x, safetensors;
a GPU for the FP8 part).

Steps, all under WORK (default /tmp/ref-convert):
  1. src/   the starting HF folder: --src DIR, or a random DeepseekV3ForCausalLM made here
            (seeded; every dimension a linear layer reads is a multiple of 128, as
            transformers' FP8 kernels need) saved by save_pretrained in float32.
  2. ref    the reference logits: --ref FILE (safetensors with input_ids I64 [B,T] and
            logits F32 [B,T,V], e.g. dsv3-sample's or a fixture's ref.safetensors), or the
            logits transformers computes from src/ in float32 on the CPU.
  3. dsv3-convert --no-mtp --dtype f32 src -> f32/, --dtype bf16 -> bf16/,
     dsv3-quant bf16 -> fp8/, dsv3-quant --dequant fp8 -> dq/, and --verify of each.
  4. Each folder loaded with DeepseekV3ForCausalLM.from_pretrained, strictly (no missing,
     unexpected or mismatched keys), attention "eager":
       f32/  float32, CPU    logits must equal the reference (max |diff| <= 1e-4 * max|ref|:
                             the same weights and code; only summation order may differ)
       bf16/ float32, CPU    weights rounded to BF16: reported (max |diff|, argmax agreement)
       bf16/ bfloat16, GPU   the baseline of the FP8 model
       fp8/  FP8, GPU        transformers' fine-grained FP8 (quantization_config in
                             config.json): cosine similarity to bf16/ on the GPU must be
                             >= 0.99; if this transformers or GPU cannot run it, the error
                             is recorded and the check reported as not run
       dq/   float32, CPU    reported against bf16/ (FP8's rounding error)
Results: OUT/ref-convert.json (every number, the versions, pass/fail) and logits-*.safetensors.
Exit status 0 when every check that ran passed.

Run on the device (build here, carry build/):
    python3 scripts/ref-convert.py --bin build/bin --out "$OUT"
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

MODEL = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, max_position_embeddings=256, rms_norm_eps=1e-6,
    tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu",
    attention_bias=False, bos_token_id=0, eos_token_id=1, rope_interleave=True,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)


def unfuse(sd):
    """transformers 5.x may keep experts fused; checkpoints name them one by one."""
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
            out[k] = v
    return out


def make_src(d, seed):
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**MODEL)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.copy_(0.05 * torch.randn_like(m.e_score_correction_bias))
    model.save_pretrained(d, safe_serialization=True)
    path = os.path.join(d, "model.safetensors")
    saved = load_file(path)
    sd = unfuse({k: v.detach() for k, v in model.state_dict().items()})
    if set(saved) != set(sd):
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})


def load(d, dtype, device, results, key):
    """from_pretrained, strictly. On the CPU without device_map (no accelerate needed); on
    the GPU with device_map="cuda" (how an FP8 checkpoint must be placed), else moved."""
    kw = dict(dtype=dtype, output_loading_info=True, attn_implementation="eager")
    if device == "cuda":
        try:
            model, info = DeepseekV3ForCausalLM.from_pretrained(d, device_map="cuda", **kw)
        except (ImportError, ValueError) as ex:
            if "quantization_config" in json.load(open(os.path.join(d, "config.json"))):
                raise
            print(f"{key}: device_map failed ({ex}); loading on the CPU and moving")
            model, info = DeepseekV3ForCausalLM.from_pretrained(d, **kw)
            model = model.to("cuda")
    else:
        model, info = DeepseekV3ForCausalLM.from_pretrained(d, **kw)
    bad = {k: list(v) for k, v in info.items()
           if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    results[key] = {"strict_load": not bad, "load_problems": bad}
    return model.eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def compare(a, b):
    d = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return {"max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item(),
            "max_abs_ref": b.abs().max().item(), "cosine": cos,
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def run(cmd, results):
    p = subprocess.run(cmd, capture_output=True, text=True)
    results.setdefault("commands", []).append({"cmd": " ".join(cmd), "rc": p.returncode,
                                               "stderr": p.stderr.strip()[-2000:]})
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="build/bin")
    ap.add_argument("--work", default="/tmp/ref-convert")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--src")
    ap.add_argument("--ref")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    torch.set_default_dtype(torch.float32)
    gpu = torch.cuda.is_available()
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if gpu else None, "checks": {}}
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    os.makedirs(a.out, exist_ok=True)
    w = lambda n: os.path.join(a.work, n)  # noqa: E731
    src = a.src or w("src")
    if not a.src:
        make_src(src, a.seed)
    if a.ref:
        r = load_file(a.ref)
        ids, ref = r["input_ids"].long(), r["logits"].float()
    else:
        g = torch.Generator().manual_seed(a.seed)
        ids = torch.randint(0, MODEL["vocab_size"], (2, 24), generator=g)
        ref = logits_of(load(src, torch.float32, "cpu", res, "src"), ids)
    save_file({"input_ids": ids.contiguous(), "logits": ref.contiguous()},
              os.path.join(a.out, "logits-ref.safetensors"))
    B = a.bin
    run([f"{B}/dsv3-convert", "--quiet", "--no-mtp", "--dtype", "f32", src, "-o", w("f32")], res)
    run([f"{B}/dsv3-convert", "--quiet", "--no-mtp", src, "-o", w("bf16")], res)
    run([f"{B}/dsv3-quant", "--quiet", w("bf16"), "-o", w("fp8")], res)
    run([f"{B}/dsv3-quant", "--quiet", "--dequant", w("fp8"), "-o", w("dq")], res)
    for d in ("f32", "bf16", "fp8", "dq"):
        run([f"{B}/dsv3-convert", "--quiet", "--verify", w(d)], res)
    C = res["checks"]

    lf = logits_of(load(w("f32"), torch.float32, "cpu", C, "f32"), ids)
    C["f32"].update(compare(lf, ref))
    C["f32"]["pass"] = C["f32"]["strict_load"] and \
        C["f32"]["max_abs_diff"] <= 1e-4 * max(1.0, C["f32"]["max_abs_ref"])
    lb = logits_of(load(w("bf16"), torch.float32, "cpu", C, "bf16_as_f32"), ids)
    C["bf16_as_f32"].update(compare(lb, ref))
    C["bf16_as_f32"]["pass"] = C["bf16_as_f32"]["strict_load"]
    ld = logits_of(load(w("dq"), torch.float32, "cpu", C, "dequant_as_f32"), ids)
    C["dequant_as_f32"].update(compare(ld, lb))
    C["dequant_as_f32"]["pass"] = C["dequant_as_f32"]["strict_load"]
    save_file({"f32": lf, "bf16_as_f32": lb, "dequant_as_f32": ld},
              os.path.join(a.out, "logits-cpu.safetensors"))
    if gpu:
        lg = logits_of(load(w("bf16"), torch.bfloat16, "cuda", C, "bf16_gpu"), ids)
        C["bf16_gpu"].update(compare(lg, ref))
        C["bf16_gpu"]["pass"] = C["bf16_gpu"]["strict_load"]
        try:
            m8 = load(w("fp8"), torch.bfloat16, "cuda", C, "fp8_gpu")
            kinds = sorted({type(m).__name__ for m in m8.modules() if "FP8" in type(m).__name__
                            or "Fp8" in type(m).__name__})
            l8 = logits_of(m8, ids)
            C["fp8_gpu"].update(compare(l8, lg))
            C["fp8_gpu"]["fp8_modules"] = kinds
            C["fp8_gpu"]["pass"] = C["fp8_gpu"]["strict_load"] and bool(kinds) and \
                C["fp8_gpu"]["cosine"] >= 0.99
            save_file({"bf16_gpu": lg, "fp8_gpu": l8}, os.path.join(a.out, "logits-gpu.safetensors"))
        except Exception as ex:  # an unsupported transformers/GPU is a finding, not a crash
            C["fp8_gpu"] = {"not_run": f"{type(ex).__name__}: {ex}",
                            "trace": traceback.format_exc()[-3000:]}
    else:
        C["fp8_gpu"] = {"not_run": "no CUDA GPU: transformers' fine-grained FP8 needs one"}
    ok = all(c.get("pass", True) for c in C.values())
    res["pass"] = ok
    with open(os.path.join(a.out, "ref-convert.json"), "w") as f:
        json.dump(res, f, indent=2)
    for k, c in C.items():
        if "not_run" in c:
            print(f"{k:16s} NOT RUN: {c['not_run'][:300]}")
        else:
            print(f"{k:16s} {'ok  ' if c.get('pass') else 'FAIL'} strict={c['strict_load']} "
                  f"max|diff|={c['max_abs_diff']:.3e} (max|ref| {c['max_abs_ref']:.3f}) "
                  f"cos={c['cosine']:.6f} argmax={c['argmax_agree']:.3f}")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
