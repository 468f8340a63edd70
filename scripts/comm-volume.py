#!/usr/bin/env python3
"""comm-volume.py: bytes each GPU sends per training step for data and expert parallelism,
and the time that takes at a given link rate against the step's compute time.

    scripts/comm-volume.py CONFIG.json --gpus N [--ep E] [--tokens T] [--nodes-limit M]
        [--gpus-per-node G] [--link GBPS] [--ib GBPS] [--tflops R]
    scripts/comm-volume.py CONFIG.json --cpu --gpus N --ep E --tokens T [--mtp]

--cpu: the bytes each rank sends per step in dsv3-train's CPU backend as built (lib/dp,
lib/ep: everything in FP32, MPI/TCP): ZeRO-1 of the replicated part over all N ranks
(reduce-scatter + all-gather, 2 x 4 x (N-1)/N per parameter), the expert gradients summed
over the N/E replicas of each group (reduce-scatter + all-gather as two alltoallv, 2 x 4 x
(R-1)/R per held expert parameter), and per MoE block (with --mtp the MTP modules' blocks
too) and routed slot whose expert is on another rank four rows of hidden x 4 bytes (the
token out and its output back in the forward, the output's gradient out and the input's
gradient back in the backward); uniform routing puts (E-1)/E of the K slots on other ranks.
Per forward also E counts of 8 bytes out per MoE block, and one 16-byte agreement.

The model (docs/cluster.md says why each term is what it is):
  - Parameters split into routed-expert parameters (W1, W3, W2 of every routed expert of
    every MoE layer) and the rest (embedding, attention, dense and shared-expert MLPs,
    router, norms, head), counted from the config as lib/config counts them (MTP left out).
  - Data parallelism, ZeRO-1 (lib/dp): per step a reduce-scatter of the FP32 gradients and
    an all-gather of the updated parameters. A ring moves (n-1)/n of the buffer per GPU in
    each. Non-expert parameters are replicated on all N GPUs; with expert parallelism E, a
    routed expert lives on N/E GPUs, so its gradients reduce over n = N/E.
  - Expert parallelism: per MoE layer and token, each of the K chosen experts on another
    GPU costs the hidden vector out (dispatch) and back (combine), in the forward and again
    (as gradients) in the backward: 4 x K x (E-1)/E x hidden x bytes per token, dispatch in
    FP8 with 1x128 scales as V3 sends it (1 + 4/128 bytes per value), the rest in BF16.
    With node-limited routing (M nodes a token) the cross-node share is at most M nodes'
    worth; this model charges it to the slower link.
  - Compute: 6 x activated parameters x tokens (+ causal attention 6 x layers x T x ctx x
    heads x (qk + v) / 2 x ... omitted here: small at 4K context for these configs) over the
    measured BF16 GEMM rate.
"""
import argparse, json, sys

def counts(c):
    h, L = c["hidden_size"], c["num_hidden_layers"]
    dense = c.get("first_k_dense_replace", 0)
    E, K = c.get("n_routed_experts") or 0, c.get("num_experts_per_tok") or 0
    mi, di = c.get("moe_intermediate_size", 0), c["intermediate_size"]
    nh = c["num_attention_heads"]
    qn, qr, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    kvr, qlr = c["kv_lora_rank"], c.get("q_lora_rank")
    attn = (h * qlr + qlr + qlr * nh * (qn + qr)) if qlr else h * nh * (qn + qr)
    attn += h * (kvr + qr) + kvr + kvr * nh * (qn + vd) + nh * vd * h + 2 * h
    moe_layers = L - dense
    shared = c.get("n_shared_experts", 0) * 3 * h * mi
    expert = 3 * h * mi
    rest = c["vocab_size"] * h * (1 if c.get("tie_word_embeddings") else 2) + h
    rest += L * attn + dense * 3 * h * di + moe_layers * (shared + E * h + E)
    routed = moe_layers * E * expert
    # activated as lib/config counts it: without the input embedding (a lookup, no FLOPs)
    active = rest - c["vocab_size"] * h + moe_layers * K * expert
    return dict(rest=rest, routed=routed, total=rest + routed, active=active,
                moe_layers=moe_layers, E=E, K=K, h=h)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel group size")
    ap.add_argument("--tokens", type=float, default=4096 * 16, help="tokens per GPU per step")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nodes-limit", type=int, default=0,
                    help="node-limited routing: a token's experts on at most M nodes (V3: 4)")
    ap.add_argument("--link", type=float, default=290.0, help="intra-node GB/s per GPU (NVLink bus bandwidth)")
    ap.add_argument("--ib", type=float, default=50.0, help="inter-node GB/s per GPU (400 Gb/s IB)")
    ap.add_argument("--tflops", type=float, default=800.0, help="measured BF16 GEMM TFLOP/s")
    ap.add_argument("--cpu", action="store_true", help="dsv3-train's CPU backend as built (FP32)")
    ap.add_argument("--mtp", action="store_true", help="--cpu: the MTP modules' blocks run too")
    ap.add_argument("--forwards", type=int, default=1, help="--cpu: micro-batches per step")
    a = ap.parse_args()
    c = json.load(open(a.config))
    p = counts(c)
    if a.cpu:
        return cpu(a, c, p)
    N, EP, T = a.gpus, a.ep, a.tokens
    if N % EP:
        sys.exit("comm-volume: --gpus must be a multiple of --ep")
    ring = lambda n: (n - 1) / n if n > 1 else 0.0
    dp_rest = p["rest"] * (4 + 2) * ring(N)             # fp32 grads RS + bf16 params AG
    dp_exp = p["routed"] / EP * (4 + 2) * ring(N // EP)
    fp8 = 1 + 4 / 128
    ep_nv = ep_ib = 0.0
    G = a.gpus_per_node
    passes = fp8 + 2 + 2 + 2          # fwd dispatch fp8 + combine bf16, bwd both bf16
    if EP > 1:
        unit = T * p["moe_layers"] * p["h"] * passes
        if EP <= G:                    # the group inside one node: NVLink only
            ep_nv = unit * p["K"] * (EP - 1) / EP
        else:
            nodes = EP // G
            # copies leaving the node: one per other destination node (V3 forwards inside
            # the node over NVLink); without a node limit, K experts spread over `nodes`
            m = min(a.nodes_limit or p["K"], nodes, p["K"])
            other = m * (nodes - 1) / nodes if a.nodes_limit else p["K"] * (nodes - 1) / nodes
            ep_ib = unit * other
            ep_nv = unit * p["K"] * (G - 1) / EP   # copies to other GPUs of the own node
    inter = N > G
    rate = (a.ib if inter else a.link) * 1e9
    compute = 6 * p["active"] * T / (a.tflops * 1e12)
    print(f"{a.config}: total {p['total']/1e9:.2f}B (routed experts {p['routed']/1e9:.2f}B), "
          f"activated {p['active']/1e9:.2f}B")
    print(f"{N} GPUs, EP {EP}, {T:.0f} tokens per GPU per step")
    print(f"  DP (ZeRO-1) non-expert  {dp_rest/1e9:9.2f} GB/GPU/step  {dp_rest/rate*1e3:9.1f} ms at {rate/1e9:.0f} GB/s")
    print(f"  DP (ZeRO-1) experts     {dp_exp/1e9:9.2f} GB/GPU/step  {dp_exp/rate*1e3:9.1f} ms")
    print(f"  EP all-to-all, NVLink   {ep_nv/1e9:9.2f} GB/GPU/step  {ep_nv/(a.link*1e9)*1e3:9.1f} ms at {a.link:.0f} GB/s")
    print(f"  EP all-to-all, IB       {ep_ib/1e9:9.2f} GB/GPU/step  {ep_ib/(a.ib*1e9)*1e3:9.1f} ms at {a.ib:.0f} GB/s")
    print(f"  compute (6 x active x T){'':11s}{compute*1e3:9.1f} ms at {a.tflops:.0f} TFLOP/s")

def cpu(a, c, p):
    N, EP, T = a.gpus, a.ep, a.tokens
    if N % EP or (EP > 1 and p["E"] % EP):
        sys.exit("comm-volume: --ep must divide --gpus and the routed experts")
    ring = lambda n: (n - 1) / n if n > 1 else 0.0
    R = N // EP
    blocks = p["moe_layers"] + (c.get("num_nextn_predict_layers", 0) if a.mtp else 0)
    held = p["routed"] / EP        # parameters left out of counts(): the MTP modules'
    zero = 8 * (p["total"] - (p["routed"] if EP > 1 else 0)) * ring(N)
    exp = 8 * held * ring(R) if EP > 1 else 0.0
    rows = 4 * 4 * p["h"] * T * p["K"] * ring(EP) * blocks
    counts_b = 8 * p["E"] * (EP - 1) / EP * blocks * a.forwards if EP > 1 else 0
    print(f"{a.config}: total {p['total']/1e6:.3f}M parameters (routed experts "
          f"{p['routed']/1e6:.3f}M), {blocks} MoE blocks")
    print(f"CPU backend, {N} ranks, --ep {EP} ({R} replicas a group), {T:.0f} tokens a rank a step")
    print(f"  ZeRO-1 replicated part   {zero/1e6:10.3f} MB/rank/step")
    print(f"  expert gradients, sum    {exp/1e6:10.3f} MB/rank/step")
    print(f"  EP rows (4 passes, F32)  {rows/1e6:10.3f} MB/rank/step (uniform routing)")
    print(f"  EP counts                {counts_b/1e6:10.6f} MB/rank/step")
    print(f"  memory a rank: parameters + gradients {8*(p['total'] - p['routed'] + held)/1e6:.3f} MB "
          f"(of {8*p['total']/1e6:.3f} MB whole)")

if __name__ == "__main__":
    main()
