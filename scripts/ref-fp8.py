#!/usr/bin/env python3
"""Makes tests/fixtures/fp8/torch_ref.bin with PyTorch as the outside reference for lib/fp8:
float32 inputs (log-uniform over E4M3's range, every tie between neighbouring codes, signed
zeros, the subnormal edges) with torch's float8_e4m3fn conversion of each, and one 300x257
weight quantized by DeepSeek's formula (s = block amax / 448, q = (w / s).to(e4m3fn),
dequantized w' = q.float() * s, stored as bf16 the way DeepSeek's weight_dequant does).

Layout (little endian): magic b"FP8REF1\\0", u32 n, n f32 inputs, n u8 codes; u32 rows,
u32 cols, rows*cols f32 weight, rows*cols u8 q, nb f32 scale_inv, rows*cols u16 bf16 dequant.
Run where torch is (the device image); tests/unit/test_fp8.c reads the file."""
import struct, sys
import torch

def main(out):
    g = torch.Generator().manual_seed(20261127)
    mag = torch.exp2(torch.rand(20000, generator=g, dtype=torch.float64) * 18 - 11)
    sign = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0).double()
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    mids = (codes[:-1] + codes[1:]) / 2
    x = torch.cat([mag * sign, mids, -mids, codes, -codes,
                   torch.tensor([0.0, -0.0, 2.0**-10, 2.0**-10 * 1.0000001, 447.9, 448.0])])
    x = x.float()
    q = x.to(torch.float8_e4m3fn).view(torch.uint8)
    R, C = 200, 257
    w = torch.randn(R, C, generator=g) * torch.exp2(torch.randint(-8, 8, (R, 1), generator=g).float())
    nbr, nbc = (R + 127) // 128, (C + 127) // 128
    s = torch.empty(nbr, nbc)
    qw = torch.empty(R, C, dtype=torch.uint8)
    deq = torch.empty(R, C, dtype=torch.bfloat16)
    for i in range(nbr):
        for j in range(nbc):
            blk = w[i*128:(i+1)*128, j*128:(j+1)*128]
            sc = blk.abs().max() / 448.0
            s[i, j] = sc
            qb = (blk / sc).to(torch.float8_e4m3fn)
            qw[i*128:(i+1)*128, j*128:(j+1)*128] = qb.view(torch.uint8)
            deq[i*128:(i+1)*128, j*128:(j+1)*128] = (qb.float() * sc).to(torch.bfloat16)
    with open(out, "wb") as f:
        f.write(b"FP8REF1\0" + struct.pack("<I", x.numel()))
        f.write(x.numpy().tobytes() + q.numpy().tobytes())
        f.write(struct.pack("<II", R, C))
        f.write(w.numpy().tobytes() + qw.numpy().tobytes() + s.numpy().tobytes())
        f.write(deq.view(torch.int16).numpy().tobytes())
    print(f"{out}: {x.numel()} values, torch {torch.__version__}")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/fp8/torch_ref.bin")
