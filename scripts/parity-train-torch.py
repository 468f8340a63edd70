#!/usr/bin/env python3
"""parity-train-torch.py: the PyTorch side of scripts/parity-train-torch.sh.

Trains HF transformers' DeepseekV3ForCausalLM from the checkpoint folder INIT (what
dsv3-train --init-from reads) on the records of the token stream in IDS (one document a
line, as dsv3-shard make reads it; the stream is each document followed by EOS, record k is
stream[kL .. kL+L+1), inputs its first L tokens, targets its last L: dsv3-pack's greedy
packing). Every step is one update over all records (the shell script makes the stream
exactly GB records and dsv3-train takes them all each step, in its own order, which does
not change an update's loss or gradient): micro-batches of B records, the loss of the step
the mean cross-entropy over all its targets, clipping to CLIP, AdamW (betas 0.9/0.95, eps
1e-8, weight decay 0.1 on 2-D tensors only, as lib/optim), constant learning rate LR.

Two runs: fp32 (weights, compute and optimizer in float32) and bf16 (float32 master
weights and optimizer, the forward and backward under torch.autocast bfloat16: the peer of
dsv3's GPU backend). Prints one line per step: 'torch MODE step S loss X gnorm G'.

Usage: parity-train-torch.py INIT IDS L B GB STEPS LR CLIP EOS
Needs torch and transformers (5.x).
"""
import sys

import torch
import transformers
from transformers import DeepseekV3ForCausalLM


def records(ids_path, L, eos):
    stream = []
    for line in open(ids_path):
        stream += [int(t) for t in line.split()] + [eos]
    n = (len(stream) - 1) // L
    if n * L + 1 != len(stream):
        sys.exit(f"parity-train-torch: the stream has {len(stream)} tokens, not k*L+1")
    x = torch.tensor([stream[k * L: k * L + L] for k in range(n)])
    y = torch.tensor([stream[k * L + 1: k * L + L + 1] for k in range(n)])
    return x, y


def train(mode, init, x, y, B, steps, lr, clip):
    model = DeepseekV3ForCausalLM.from_pretrained(init, dtype=torch.float32).cuda()
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim == 2]
    other = [p for n, p in params if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    x, y = x.cuda(), y.cuda()
    n_tgt = y.numel()
    V = model.config.vocab_size
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, x.shape[0], B):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
                logits = model(input_ids=x[i:i + B]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V),
                                                     y[i:i + B].reshape(-1), reduction="sum")
            (loss / n_tgt).backward()
            total += loss.item()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], clip)
        opt.step()
        print(f"torch {mode} step {step} loss {total / n_tgt:.6f} gnorm {gnorm.item():.6f}",
              flush=True)


def main():
    init, ids = sys.argv[1], sys.argv[2]
    L, B, GB, steps = (int(a) for a in sys.argv[3:7])
    lr, clip, eos = float(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
    x, y = records(ids, L, eos)
    if x.shape[0] != GB:
        sys.exit(f"parity-train-torch: {x.shape[0]} records, expected {GB}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for mode in ("fp32", "bf16"):
        train(mode, init, x, y, B, steps, lr, clip)


if __name__ == "__main__":
    main()
