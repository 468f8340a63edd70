#!/usr/bin/env python3
"""bench-train-torch.py: the PyTorch peer of scripts/bench-train.sh.

Training steps of HF transformers' DeepseekV3ForCausalLM on the same config
($BENCH_CONFIG, default configs/1b-moe.json; MTP off), the same micro-batch (B x 4096 random tokens) and global
batch (GB sequences, gradient accumulation), on the same GPU: bf16 weights, torch's fused
AdamW (betas 0.9/0.95, weight decay 0.1), clipping to 1.0. Prints each step's tokens/s and
the median over the steps after the first, with the same FLOP count as bench-train.sh when
given FLOPS_PER_TOKEN and CEILING_TFLOPS (MFU).

Usage: python3 scripts/bench-train-torch.py B GB STEPS [FLOPS_PER_TOKEN CEILING_TFLOPS]
Needs torch and transformers (5.x).
"""
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def build(attn):
    cfg = json.load(open(os.environ.get("BENCH_CONFIG", "configs/1b-moe.json")))
    cfg["num_nextn_predict_layers"] = 0
    cfg.pop("architectures", None)
    config = DeepseekV3Config(**cfg)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    model.train()
    return model, config


def main():
    B, GB, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    fpt = float(sys.argv[4]) if len(sys.argv) > 5 else 0.0
    ceil = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    T = 4096
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    for attn in ("sdpa", "eager"):
        try:
            model, config = build(attn)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                    weight_decay=0.1, fused=True)
            tps = []
            for step in range(steps):
                torch.cuda.synchronize()
                t0 = time.time()
                for _ in range(GB // B):
                    ids = torch.randint(0, config.vocab_size, (B, T), device="cuda")
                    out = model(input_ids=ids, labels=ids)
                    out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                dt = time.time() - t0
                tps.append(GB * T / dt)
                print(f"torch step {step + 1} loss {out.loss.item():.4f} "
                      f"{tps[-1]:.0f} tokens/s {dt:.2f} s", flush=True)
            med = statistics.median(tps[1:] if len(tps) > 1 else tps)
            mem = torch.cuda.max_memory_allocated() / 2**30
            mfu = f", MFU {100 * med * fpt / (ceil * 1e12):.1f}% of {ceil:.0f} TFLOP/s" if fpt else ""
            name = os.path.basename(os.environ.get("BENCH_CONFIG", "configs/1b-moe.json"))
            print(f"PyTorch HF DeepseekV3 {name} ({attn} attention, bf16, B={B}, global {GB} x {T}): "
                  f"{med:.0f} tokens/s{mfu}, peak memory {mem:.1f} GiB", flush=True)
            return
        except Exception as ex:  # noqa: BLE001 - report and try the next attention
            print(f"# {attn} attention failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
