#!/usr/bin/env python3
"""Weight-only int8 products, streamed: the decoder's own weight shapes over all its layers (distinct weights,
so nothing stays in cache), one pass = every projection of every layer once (plus lm_head with --lm-head),
per kernel that could run a quantized decode step:

- `F.linear` in the model dtype (the unquantized reference),
- int8 dequantized eagerly (`F.linear(x, w.to(dtype)) * scale`: the portable fallback),
- `torch.ops.aten._weight_int8pack_mm` (PyTorch's int8 weight-only kernel),
- on the CPU, this project's own kernel (`points.kernels.cpu_int8`, AVX2, built on first use),
- on CUDA, this project's Triton kernel (`points.kernels.triton_int8`; tested in the interpreter by
  tests/test_quantize.py, not timed there),
- the same dequantize-multiply under `torch.compile` (inductor fuses the cast into the product),
- int4, group-wise (128 inputs per scale and zero point): `aten._weight_int4pack_mm_for_cpu` on the CPU,
  `aten._weight_int4pack_mm` on CUDA (bf16 activations; the comparison), and on the CPU this project's
  `points.kernels.cpu_int4` on each instruction set this CPU has (`--int4-group`, default 128; any dtype),
  and the dequantized blocks Int4Linear takes for many rows (points.runtime.cpu_blocks).

    python tools/bench_int8.py                                  # small preset, CPU, fp32 and bf16, 1 and 4 rows
    python tools/bench_int8.py --preset 7b --device cuda --dtype bfloat16

Reports ms per pass, the weight bytes read per second and the fraction of the copy bandwidth measured in the
same run (the floor), and each kernel against `F.linear` in the same dtype. On CUDA each pass is captured in
one CUDA graph so that launches do not count. A benchmark, not a test: compare within one run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from points.io.checkpoint import DTYPES
from points.kernels import cpu_int4, cpu_int8
from points.io.quantized import quantize_int4, quantize_int8
from points.runtime.quantize import HAS_TRITON, int4_linear
from points.tooling.measure import BURSTS, copy_bandwidth, machine
from points.tooling.synthetic import SHAPES, hf_config
from points.io.config import from_hf_dict


def shapes(preset: str, layers: int | None, lm_head: bool) -> list[tuple[int, int]]:
    d = from_hf_dict(hf_config(*SHAPES[preset])).decoder
    q, kv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    one = [(q + 2 * kv, d.hidden_size), (d.hidden_size, q), (2 * d.ffn_size, d.hidden_size), (d.hidden_size, d.ffn_size)]
    out = one * (layers or d.n_layers)
    return out + ([(d.vocab_size, d.hidden_size)] if lm_head else [])


def pack_int4(w: torch.Tensor, device: torch.device, group: int = 128):
    """Asymmetric 4-bit per group of `group` inputs in the kernels' layout: (packed weight, scales and zeros
    [in / group, out, 2] bf16); dequantized: (q - 8) * scale + zero."""
    n, k = w.shape
    wf = w.float().reshape(n, k // group, group)
    lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = torch.round((wf - lo) / scale).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], -1).to(torch.bfloat16).contiguous()
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8), sz


def int4_mm(x, packed, sz):
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
    return torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)


def timed_pass(fn, device: torch.device, repeat: int) -> float:
    """Seconds per pass: the min over `repeat` passes (CUDA: one graph per pass, replayed)."""
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--layers", type=int, help="layers to stream over (default: all of the preset's)")
    p.add_argument("--lm-head", action="store_true", help="also the output projection")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--int4-group", type=int, choices=[32, 64, 128], default=128)
    p.add_argument("--bursts", type=int, default=BURSTS, help=f"copy-bandwidth bursts (default {BURSTS}; 1: a quick look)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                   help="torch.compile's backend for the compiled row (default inductor; eager / aot_eager trace it "
                        "as dynamo does without generating kernels, for a quick check that it compiles, as in "
                        "`points bench`)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"]))]
    torch._dynamo.config.recompile_limit = 256  # one graph per weight shape, row count and dtype
    bw = copy_bandwidth(device, bursts=args.bursts)
    info = machine(device)
    sh = shapes(args.preset, args.layers, args.lm_head)
    print(f"int8 weight-only products, preset {args.preset}, {len(sh)} weights per pass, on "
          f"{info.get('gpu', info['cpu'])}, torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s")
    g = torch.Generator(device).manual_seed(0)
    results = []
    for dtype in dtypes:
        weights = [(torch.randn(s, generator=g, device=device) * 0.02).to(dtype) for s in sh]
        qweights = [quantize_int8(w) for w in weights]
        b16, b8 = sum(w.nbytes for w in weights), sum(q.nbytes + s.nbytes for q, s in qweights)

        def dq(x, w, s):
            return F.linear(x, w.to(x.dtype)) * s

        compiled = torch.compile(dq, dynamic=False, backend=args.compile_backend)
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, generator=g, device=device).to(dtype) for k in {s[1] for s in sh}}
            variants = {
                "F.linear": (lambda: [F.linear(xs[w.shape[1]], w) for w in weights], b16),
                "int8, dequantized eagerly": (lambda: [dq(xs[q.shape[1]], q, s) for q, s in qweights], b8),
                "int8, _weight_int8pack_mm": (lambda: [torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]], q, s)
                                                       for q, s in qweights], b8),
            }
            if device.type == "cpu" and cpu_int8.available():
                variants["int8, points.kernels.cpu_int8"] = (
                    lambda: [cpu_int8.int8_gemv(xs[q.shape[1]], q, s) for q, s in qweights], b8)
            elif device.type == "cpu":
                print(f"  points.kernels.cpu_int8 not available: {cpu_int8.reason()}")
            if HAS_TRITON and device.type == "cuda":
                from points.kernels.triton_int8 import int8_mm

                variants["int8, points.kernels.triton_int8"] = (
                    lambda: [int8_mm(xs[q.shape[1]], q, s) for q, s in qweights], b8)
            if dtype == torch.bfloat16:
                try:
                    packed4 = [pack_int4(w, device) for w in weights]
                    b4 = sum(p_.nbytes + z.nbytes for p_, z in packed4)
                    variants["int4 (group 128), _weight_int4pack_mm"] = (
                        lambda: [int4_mm(xs[w.shape[1]], p_, z) for w, (p_, z) in zip(weights, packed4)], b4)
                except Exception as e:  # noqa: BLE001
                    print(f"  int4 packing not available: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            if HAS_TRITON and device.type == "cuda":
                from points.kernels.triton_int4 import int4_mm as triton_int4_mm

                ours4 = [quantize_int4(w, args.int4_group) for w in weights]
                b4 = sum(q.nbytes + s.nbytes + o.nbytes for q, s, o in ours4)
                variants[f"int4 (group {args.int4_group}), points.kernels.triton_int4"] = (
                    lambda: [triton_int4_mm(xs[w.shape[1]], q, s, o, group_size=args.int4_group)
                             for w, (q, s, o) in zip(weights, ours4)], b4)
            if device.type == "cpu" and cpu_int4.available():
                ours4 = [quantize_int4(w, args.int4_group) for w in weights]
                b4 = sum(q.nbytes + s.nbytes + o.nbytes for q, s, o in ours4)
                for which in cpu_int4.isas():
                    variants[f"int4 (group {args.int4_group}), cpu_int4 {which}"] = (
                        lambda which=which: [cpu_int4.int4_gemv(xs[w.shape[1]], q, s, o, group_size=args.int4_group,
                                                                which=which) for w, (q, s, o) in zip(weights, ours4)], b4)
                variants[f"int4 (group {args.int4_group}), dequantized blocks"] = (  # (Int4Linear's many-row path)
                    lambda: [int4_linear(xs[w.shape[1]], q, s, o, None, args.int4_group, "dequantize")
                             for w, (q, s, o) in zip(weights, ours4)], b4)
            if not args.no_compile:
                backend = "" if args.compile_backend == "inductor" else f" ({args.compile_backend} backend)"
                variants["int8, compiled dequantize-multiply" + backend] = (
                    lambda: [compiled(xs[q.shape[1]], q, s) for q, s in qweights], b8)
            base = None
            for name, (fn, nbytes) in variants.items():
                try:
                    t = timed_pass(fn, device, args.repeat)
                except Exception as e:  # noqa: BLE001  (a kernel this device or dtype lacks)
                    print(f"  {str(dtype).removeprefix('torch.'):8} rows {rows}  {name:36} not available: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                base = base or t
                row = dict(dtype=str(dtype).removeprefix("torch."), rows=rows, kernel=name, s_per_pass=t,
                           weight_bytes=nbytes, bytes_per_s=nbytes / t, of_copy=nbytes / t / bw, vs_linear=base / t)
                results.append(row)
                print(f"  {row['dtype']:8} rows {rows}  {name:36} {t * 1e3:9.2f} ms  {nbytes / t / 1e9:7.1f} GB/s "
                      f"({row['of_copy']:4.0%} of copy)  {row['vs_linear']:5.2f}x F.linear", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=info, preset=args.preset, copy_bytes_per_s=bw,
                                             rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
