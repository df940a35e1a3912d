#!/usr/bin/env python3
"""Where one eager decode step's time goes on the CPU: the few-row products (this project's float kernel,
points.kernels.cpu_gemv, timed around its calls) against everything else, and the largest ATen ops of it.

    python tools/profile_step.py                                  # small preset, bf16, after 512 tokens
    python tools/profile_step.py --dtype float32 --prompt 128 --steps 10

A random checkpoint of the preset (points.tooling.synthetic, kept in --workdir) loaded with points.load, a
prefill of --prompt tokens, then --steps timed steps of batch 1. A measurement, not a test: compare within
one run.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import points
from points.io.checkpoint import DTYPES
from points.kernels import cpu_gemv
from points.tooling.measure import machine
from points.tooling.synthetic import SHAPES, checkpoint_in


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "points-bench")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    pipe = points.load(checkpoint_in(args.workdir, args.preset, dtype, tokenizer="bytes"), dtype=dtype)
    engine = pipe.engine
    cache = engine.new_cache(1, args.prompt + 3 * args.steps + 8)
    engine.prefill(cache, tokens=torch.randint(0, 1000, (1, args.prompt)))
    token = torch.tensor([[5]])
    for _ in range(3):
        engine.step(token, cache)
    spent, real = [0.0], cpu_gemv._run

    def timed_run(*a, **kw):
        t0 = time.perf_counter()
        out = real(*a, **kw)
        spent[0] += time.perf_counter() - t0
        return out

    cpu_gemv._run = timed_run
    try:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step(token, cache)
        step = (time.perf_counter() - t0) / args.steps
    finally:
        cpu_gemv._run = real
    info = machine(torch.device("cpu"))
    products = spent[0] / args.steps
    print(f"# {info['cpu']} ({info['cpu_flags']}), {info['threads']} threads, torch {info['torch']}; {args.preset}, "
          f"{args.dtype}, batch 1 after {args.prompt} tokens")
    print(f"step {step * 1e3:.1f} ms: the products {products * 1e3:.1f} ms, the rest {(step - products) * 1e3:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step(token, cache)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    calls = sum(e.count for e in events) // args.steps
    print(f"ATen ops: {calls} calls a step; the largest:")
    for e in events[:10]:
        print(f"  {e.key:50} {e.self_cpu_time_total / args.steps / 1e3:6.2f} ms  {e.count // args.steps:5d} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
