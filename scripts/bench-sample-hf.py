#!/usr/bin/env python3
"""bench-sample-hf.py: the peer of scripts/bench-sample.sh's GPU runs: transformers'
DeepseekV3ForCausalLM.generate() on the same checkpoint folder (bf16 on cuda:0), greedy,
N new tokens (EOS off) after the same prompt ids, at each batch size of B (comma-separated).
Prints the prefill time (the first token) and the decode tokens/s of the rest, timed after a
warm-up run. Run: python3 scripts/bench-sample-hf.py MODEL_DIR N B[,B...] ID..."""
import sys
import time

import torch
from transformers import DeepseekV3ForCausalLM


def run(model, ids, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1,
                   min_new_tokens=1, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                   min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)


def main():
    d, n = sys.argv[1], int(sys.argv[2])
    batches = [int(b) for b in sys.argv[3].split(",")]
    prompt = [int(x) for x in sys.argv[4:]]
    model = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to("cuda").eval()
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}")
    for b in batches:
        ids = torch.tensor([prompt] * b, device="cuda")
        with torch.no_grad():
            run(model, ids, 4)  # warm-up
            pre, dec = run(model, ids, n)
        print(f"hf transformers generate: batch {b}, prompt {len(prompt)} tokens, prefill "
              f"{pre * 1e3:.1f} ms, decode {(n - 1) * b / dec:.1f} tokens/s ({n - 1} steps)",
              flush=True)


if __name__ == "__main__":
    main()
