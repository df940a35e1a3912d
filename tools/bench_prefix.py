#!/usr/bin/env python3
"""Time to first token of a conversation's second turn, with and without the prefix cache, same weights.

    python tools/bench_prefix.py                         # small preset, float32, a 448x448 image + ~1000 tokens
    python tools/bench_prefix.py --preset tiny --history 200 --repeat 1      # a quick look

Turn 1: one 448 x 448 image and about --history tokens of text, answered (16 new tokens). Turn 2: the whole
turn 1, its reply, and a short question. The time to first token is `Pipeline.chat(turn 2, max_new_tokens=1)`
(vision, prefill, the first token's choice). With the cache, turn 1 runs (untimed) before each timed turn 2,
so every timing reuses exactly turn 1; without it, turn 2 is prefilled from nothing. Also prints the matmul
floor of each (2 x weights x prefilled tokens, decoder and vision, over the matmul rate measured in the run).
A benchmark, not a test: compare within one run.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import points
from points.io.checkpoint import DTYPES
from points.runtime.prefix import PrefixCache
from points.tooling.measure import machine, matmul_rate
from points.tooling.synthetic import SHAPES, checkpoint_in


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--history", type=int, default=1000, help="about this many text tokens in turn 1")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-bench-prefix-"))
    pipe = points.load(checkpoint_in(work, args.preset, dtype))
    d = pipe.model.cfg.decoder
    rate = matmul_rate(2048, d.hidden_size, d.ffn_size, dtype, torch.device("cpu"))
    info = machine(torch.device("cpu"))
    y, x = np.mgrid[0:448, 0:448]
    image = Image.fromarray(np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8))
    rng = random.Random(0)
    words = "the river mountain light window garden music paper story city water stone".split()
    text = " ".join(rng.choice(words) for _ in range(args.history))
    turn1 = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    pipe.prefix = PrefixCache()
    reply = pipe.chat(turn1, max_new_tokens=16)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what comes next?"}]
    n1, n2 = pipe.encode(turn1).input_ids.shape[1], pipe.encode(turn2).input_ids.shape[1]
    patches = int(pipe.encode(turn1).grid_thw.prod())
    print(f"prefix cache: preset {args.preset}, {args.dtype}, on {info['cpu']} ({info.get('threads')} threads), "
          f"torch {torch.__version__}; turn 1 {n1} tokens ({patches // 4} image tokens), turn 2 {n2} tokens; "
          f"matmul rate {rate / 1e9:.0f} GFLOP/s")

    def ttft() -> float:
        t = time.perf_counter()
        pipe.chat(turn2, max_new_tokens=1)
        return time.perf_counter() - t

    timings = {}
    for mode in ("cache", "no cache"):
        best, reused = float("inf"), 0
        for _ in range(args.repeat):
            if mode == "cache":
                pipe.prefix = PrefixCache()
                pipe.chat(turn1, max_new_tokens=16)
                before = pipe.prefix.reused_tokens
            else:
                pipe.prefix = None
            best = min(best, ttft())
            if mode == "cache":
                reused = pipe.prefix.reused_tokens - before
        timings[mode] = (best, reused)
    dec_params = sum(m.weight.numel() for n, m in pipe.model.decoder.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
    vis_params = sum(q.numel() for q in pipe.model.vision.parameters())
    rows = []
    for mode, (t, reused) in timings.items():
        new_tokens = n2 - reused
        floor = (2 * dec_params * new_tokens + (0 if reused >= n1 - 1 else 2 * vis_params * patches)) / rate
        rows.append(dict(mode=mode, ttft_s=t, reused_tokens=reused, prefilled_tokens=new_tokens, floor_s=floor))
        print(f"  {mode:8}  first token after {t * 1e3:8.1f} ms   {reused:5} tokens reused, {new_tokens:5} prefilled   "
              f"matmul floor {floor * 1e3:7.1f} ms ({floor / t:.0%})")
    speedup = timings["no cache"][0] / timings["cache"][0]
    print(f"  second turn's first token {speedup:.1f}x sooner with the prefix cache")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=info, preset=args.preset, dtype=args.dtype, turn1_tokens=n1,
                                             turn2_tokens=n2, rows=rows, speedup=speedup), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
