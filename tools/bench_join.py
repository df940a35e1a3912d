#!/usr/bin/env python3
"""A long prompt joining a running batch: the running stream's longest pause, with the prompt prefilled in one
step (--max-prefill-tokens at least its length: what the scheduler did before chunked prefill) and in chunks.

    python tools/bench_join.py                       # small preset, float32, a ~3,000-token prompt
    python tools/bench_join.py --preset tiny --words 300

Request A (a short prompt) decodes; after a few of its tokens request B (a long text prompt) arrives. The
steps are driven here one by one (A gets one token per step, tested in tests/test_scheduler.py), so A's
longest pause is the longest step from B's arrival to B's first token. Printed beside it: A's steady step
before B arrived, B's time to first token, and B's prefill alone (on an idle scheduler, one step), whose
0.25x is the goal for the pause; the floor of that prefill is 2 x parameters x tokens over the matmul rate
measured here. A benchmark, not a test: compare within one run.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import points
from points.io.checkpoint import DTYPES
from points.tooling.measure import machine, matmul_rate, prefill_flops
from points.tooling.synthetic import SHAPES, checkpoint_in

WORDS = ("river mountain light question answer window garden music paper story city water stone morning "
         "evening journey number colour").split()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--words", type=int, default=2900, help="the long prompt's words (default: %(default)s)")
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 256])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-join-"))
    ckpt = checkpoint_in(work, args.preset, dtype)
    pipe = points.load(ckpt, dtype=dtype, prefix_cache=False, max_batch=2, vision_cache_mb=0)
    s = pipe.scheduler
    rng = random.Random(0)
    long_text = " ".join(rng.choice(WORDS) for _ in range(args.words))
    short = [{"role": "user", "content": "Tell me a story about a river."}]
    long_conv = [{"role": "user", "content": long_text + " Summarise."}]
    n_long = len(pipe.encode(long_conv).input_ids[0])
    d = pipe.model.decoder.cfg
    rate = matmul_rate(2048, d.hidden_size, d.ffn_size, dtype, torch.device("cpu"))
    floor = prefill_flops(d, n_long) / rate
    info = machine(torch.device("cpu"))
    print(f"bench_join: preset {args.preset}, {args.dtype}, {info['cpu']} ({info.get('threads')} threads, "
          f"{info['cpu_flags']}), torch {torch.__version__}; the long prompt: {n_long} tokens; matmul "
          f"{rate / 1e9:.0f} GFLOP/s, its prefill floor {floor:.2f} s", flush=True)
    pipe.chat(short, max_new_tokens=2)  # warm-up

    def alone() -> float:
        s.max_prefill_tokens = 1 << 20
        r = pipe.submit(long_conv, max_new_tokens=1)
        r.text()
        return r.first_token_at - r.submitted_at

    def joined(budget: int) -> dict:
        s.max_prefill_tokens = budget
        a = pipe.submit(short, max_new_tokens=1000)
        steady = []
        for _ in range(6):  # A's prefill, then steady decode steps
            t = time.perf_counter()
            s.step()
            steady.append(time.perf_counter() - t)
        b = pipe.submit(long_conv, max_new_tokens=1)
        gaps = []
        while b.first_token_at is None:
            t = time.perf_counter()
            s.step()
            gaps.append(time.perf_counter() - t)
        a.cancel()
        while s.step():
            pass
        return {"budget": budget, "steps": len(gaps), "longest_pause_s": max(gaps), "steady_step_s": min(steady[2:]),
                "ttft_s": b.first_token_at - b.submitted_at}

    rows = []
    first_alone = alone()
    for budget in [1 << 20, *args.budgets]:
        rows.append(joined(budget))
    last_alone = alone()
    prefill = min(first_alone, last_alone)
    print(f"B's prefill alone: {first_alone:.2f} s, {last_alone:.2f} s (first, last of the sitting): "
          f"{floor / prefill:.0%} of its floor")
    print(f"{'B prefilled':>22} {'steps':>6} {'A longest pause':>16} {'x B alone':>10} {'A steady step':>14} "
          f"{'B TTFT':>8}")
    for r in rows:
        label = "in one step" if r["budget"] >= n_long else f"chunks of {r['budget']}"
        print(f"{label:>22} {r['steps']:6d} {r['longest_pause_s']:14.2f} s {r['longest_pause_s'] / prefill:9.2f}x "
              f"{r['steady_step_s']:12.3f} s {r['ttft_s']:7.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "preset": args.preset, "dtype": args.dtype,
                                         "prompt_tokens": n_long, "prefill_alone_s": [first_alone, last_alone],
                                         "floor_s": floor, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
