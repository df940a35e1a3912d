#!/usr/bin/env python3
"""One-row products (the decode step's matrix-vector reads), streamed over many distinct weights so that
nothing stays in cache, per weight layout and kernel: PyTorch's usual row-major [out, in] against the same
values stored transposed (strides (1, out)), which some CPUs' BLAS reads faster, and this project's own
float kernel (`points.kernels.cpu_gemv`, row-major weights) on each instruction set the CPU has.

    python tools/bench_linear.py                          # 40 weights of [9728, 896] (Qwen2.5-0.5B's up_gate)
    python tools/bench_linear.py --shape 896x4864 --dtype bfloat16 --rows 4

Reports time per product (min of --repeat passes over all weights, after a warm-up pass) and the weight
bytes read per second, next to this machine's copy bandwidth (the floor). A weight re-read in a loop stays
in cache and reads up to 2x too fast; hence the streaming. A benchmark, not a test: compare within one run.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from points.io.checkpoint import DTYPES
from points.tooling.measure import copy_bandwidth, machine


def stream(x: torch.Tensor, weights: list[torch.Tensor], repeat: int, product=F.linear) -> float:
    """Seconds per product: min over `repeat` passes of one product per weight."""
    best = float("inf")
    with torch.inference_mode():
        for w in weights:  # warm-up pass
            product(x, w)
        for _ in range(repeat):
            t0 = time.perf_counter()
            for w in weights:
                product(x, w)
            best = min(best, (time.perf_counter() - t0) / len(weights))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="9728x896", help="OUTxIN of each weight (default: 9728x896)")
    p.add_argument("--count", type=int, default=40, help="distinct weights streamed over (default 40)")
    p.add_argument("--rows", type=int, default=1, help="rows of the input (batch; default 1)")
    p.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    device = torch.device("cpu")
    bw = copy_bandwidth(device)
    info = machine(device)
    print(f"one-row products over {args.count} distinct [{out_f}, {in_f}] weights, {args.rows} row(s); "
          f"{info['cpu']} ({info['cpu_flags']}), {info['threads']} threads, torch {info['torch']}; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s")
    from points.kernels import cpu_gemv

    isas = cpu_gemv.ISAS[:cpu_gemv.ISAS.index(cpu_gemv.isa()) + 1] if cpu_gemv.available() else ()
    result = {"machine": info, "copy_bytes_per_s": bw, "shape": [out_f, in_f], "count": args.count,
              "rows": args.rows, "results": []}
    g = torch.Generator().manual_seed(0)
    for name in args.dtype:
        dtype = DTYPES[name]
        x = torch.randn(args.rows, in_f, generator=g).to(dtype)
        row_major = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(args.count)]
        transposed = [w.t().contiguous().t() for w in row_major]  # same values and shape, strides (1, out)
        nbytes = out_f * in_f * dtype.itemsize
        runs = [("torch row-major", row_major, F.linear), ("torch transposed", transposed, F.linear)]
        runs += [(f"points {isa}", row_major, lambda x, w, isa=isa: cpu_gemv.float_gemv(x, w, which=isa))
                 for isa in isas if isa != "avx512_bf16" or dtype == torch.bfloat16]
        for layout, weights, product in runs:
            s = stream(x, weights, args.repeat, product)
            result["results"].append({"dtype": name, "layout": layout, "s": s, "bytes_per_s": nbytes / s})
            print(f"  {name:9} {layout:20} {s * 1e6:8.0f} us  {nbytes / s / 1e9:6.1f} GB/s  "
                  f"({nbytes / s / bw:.0%} of the copy bandwidth)")
        del row_major, transposed
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
