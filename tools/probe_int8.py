#!/usr/bin/env python3
"""Probe (one GPU call) for weight-only quantized decode: the 7B decoder's one-row (and 4-row) products over
all 28 layers' distinct weights plus lm_head, each variant captured in one CUDA graph so that launches do not
count: bf16 F.linear; int8 weights (per-output-channel scales) dequantized eagerly; the same dequantize-matmul
under torch.compile (inductor fuses it); aten._weight_int8pack_mm; int4 aten._weight_int4pack_mm (group 128).
Prints ms per pass and the weight bytes read per second against the copy bandwidth. The int4 row re-uses one
layer's packed weights for every layer (packing all 28 takes long), so part of it may be read from L2: an upper
bound."""

import argparse
import sys

import torch
import torch.nn.functional as F

from points.tooling.bench import copy_bandwidth

SHAPES = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]  # qkv, out, up_gate, down


def graph_time(fn, repeat=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    shapes = [s for _ in range(args.layers) for s in SHAPES] + [(152064, 3584)]
    g = torch.Generator(dev).manual_seed(0)
    w16 = [torch.randn(s, device=dev, generator=g, dtype=torch.bfloat16) * 0.02 for s in shapes]
    scales = [w.float().abs().amax(1) / 127 for w in w16]
    w8 = [torch.round(w.float() / s[:, None]).clamp(-127, 127).to(torch.int8) for w, s in zip(w16, scales)]
    s16 = [s.to(torch.bfloat16) for s in scales]
    bytes16 = sum(w.numel() * 2 for w in w16)
    bytes8 = sum(w.numel() + s.numel() * 2 for w, s in zip(w8, s16))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {bw / 1e12:.2f} TB/s; "
          f"bf16 weights {bytes16 / 1e9:.2f} GB, int8 {bytes8 / 1e9:.2f} GB", flush=True)

    def dq(x, w, s):
        return F.linear(x, w.to(x.dtype)) * s

    torch._dynamo.config.recompile_limit = 64  # one graph per weight shape and row count (the default 8 would
    cdq = torch.compile(dq, dynamic=False)     # let the later shapes fall back to eager without a word)
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, device=dev, dtype=torch.bfloat16) for k in (3584, 18944)}
        res = {}
        res["bf16 F.linear"] = (graph_time(lambda: [F.linear(xs[w.shape[1]], w) for w in w16]), bytes16)
        res["int8 eager dequant"] = (graph_time(lambda: [dq(xs[w.shape[1]], w, s) for w, s in zip(w8, s16)]), bytes8)
        try:
            res["int8 compiled dequant"] = (graph_time(lambda: [cdq(xs[w.shape[1]], w, s) for w, s in zip(w8, s16)]), bytes8)
        except Exception as e:
            print(f"  compiled: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        try:
            res["int8 _weight_int8pack_mm"] = (graph_time(lambda: [torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]], w, s)
                                                                  for w, s in zip(w8, s16)]), bytes8)
        except Exception as e:
            print(f"  _weight_int8pack_mm: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        try:
            packed = []
            for w in w16[: len(SHAPES)] + w16[-1:]:
                wf = w.float().reshape(w.shape[0], -1, 128)
                lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
                scale = ((hi - lo).clamp(min=1e-6) / 15)
                q = torch.round((wf - lo) / scale).clamp(0, 15).to(torch.int32).reshape(w.shape)
                zero = lo + 8 * scale
                sz = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], -1).to(torch.bfloat16).contiguous()
                qu = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                packed.append((torch.ops.aten._convert_weight_to_int4pack(qu, 8), sz))
            pk = [packed[i % len(SHAPES)] for i in range(len(shapes) - 1)] + [packed[-1]]
            b4 = sum(w.numel() // 2 + sz.numel() * 2 for w, (_, sz) in zip(w16, pk))
            res["int4 _weight_int4pack_mm (weights re-used per layer)"] = (graph_time(
                lambda: [torch.ops.aten._weight_int4pack_mm(xs[w.shape[1]], p_, 128, sz) for w, (p_, sz) in zip(w16, pk)]), b4)
        except Exception as e:
            print(f"  int4: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for k, (t, nb) in res.items():
            print(f"rows {rows}: {k:55} {t * 1e3:7.3f} ms per pass  {nb / t / 1e12:5.2f} TB/s ({nb / t / bw:.0%} of copy)"
                  f"  {res['bf16 F.linear'][0] / t:.2f}x bf16", flush=True)


if __name__ == "__main__":
    sys.exit(main())
