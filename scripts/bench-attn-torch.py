#!/usr/bin/env python3
"""The peer figure for kernels/attention: torch's scaled_dot_product_attention (causal,
bf16) on the shapes tests/gpu/test_attention.c times, forward and backward, median of 10
event-timed runs after 3 warm-ups, printed as the same '# bench' lines."""
import sys

try:
    import torch
    import torch.nn.functional as F
except Exception as ex:  # no torch here: say so and leave
    print(f"# bench torch unavailable: {ex}")
    sys.exit(0)

SHAPES = [("V3 MLA B=1 T=4096 nh=128 192/128", 1, 4096, 128, 192, 128),
          ("1B-MoE B=8 T=4096 nh=16 96/64", 8, 4096, 16, 96, 64)]


def timed(fn, iters=10):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    if not torch.cuda.is_available():
        print("# bench torch: no CUDA device")
        return
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name, B, T, nh, dk, dv in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(B, nh, T, dk, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, nh, T, dk, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, nh, T, dv, device="cuda", dtype=torch.bfloat16, generator=g)
        do = torch.randn(B, nh, T, dv, device="cuda", dtype=torch.bfloat16, generator=g)
        fwd = 2.0 * B * nh * (T * (T + 1) / 2) * (dk + dv)
        try:
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            print(f"# bench torch sdpa fwd {name:<28} {ms:8.3f} ms {fwd / ms / 1e9:7.1f} TFLOP/s")
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)

            def bwd():
                torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True)

            bms = timed(bwd)
            print(f"# bench torch sdpa bwd {name:<28} {bms:8.3f} ms "
                  f"{2.5 * fwd / bms / 1e9:7.1f} TFLOP/s")
        except Exception as ex:
            print(f"# bench torch sdpa {name}: failed: {ex}")


main()
