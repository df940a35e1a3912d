#!/usr/bin/env python3
"""Throughput of `points run` against a loop calling `Pipeline.chat` one item at a time, same weights, same
process, same replies (checked).

    python tools/bench_run.py                                  # small preset, bf16, 32 items x 128 new tokens
    python tools/bench_run.py --preset tiny --items 8 --new 16 --dtype float32   # a quick look

Two mixes: text only (prompt lengths spread over 16-400 tokens), and the same with a quarter of the items
carrying a small image (448 x 336). The run side is `points.tooling.run.process`, the loop `points run`
uses (length-sorted batches of --batch-size, a journal fsynced per batch); load time is left out of both.
Reports items/s, generated tokens/s and the ratio; then the compute-bound part alone (the same batches with
one new token: vision, prefill, one step) against its matmul floor (2 x weights x tokens for the decoder and
the vision encoder, over the matmul rate measured in the run).
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
from points.runtime.generation import GenerationConfig
from points.tooling import run as runner
from points.tooling.measure import machine, matmul_rate
from points.tooling.synthetic import SHAPES, checkpoint_in

WORDS = ("river mountain light question answer window garden music paper story city water stone "
         "morning evening journey number colour").split()


def items(n: int, images: bool, folder: Path, seed: int = 0) -> list[runner.Item]:
    rng = random.Random(seed)
    picture = folder / "picture.png"
    if images and not picture.exists():
        y, x = np.mgrid[0:336, 0:448]
        Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(picture)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 380)))
        content = [{"type": "text", "text": f"Item {i}: {words}. Summarise."}]
        if images and i % 4 == 0:
            content.insert(0, {"type": "image", "image": str(picture)})
        out.append(runner.Item(i, f"item-{i}", [{"role": "user", "content": content}], i + 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--new", type=int, default=128, help="new tokens per item")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mixes", nargs="+", choices=["text", "images"], default=["text", "images"])
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint is kept between runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-bench-run-"))
    pipe = points.load(checkpoint_in(work, args.preset, dtype))
    info = machine(torch.device("cpu"))
    d = pipe.model.cfg.decoder
    rate = matmul_rate(2048, d.hidden_size, d.ffn_size, dtype, torch.device("cpu"))
    print(f"points run vs a Pipeline.chat loop: preset {args.preset}, {args.dtype}, {args.items} items x {args.new} "
          f"new tokens, batch size {args.batch_size}, on {info['cpu']} ({info.get('threads')} threads), "
          f"torch {torch.__version__}; matmul rate {rate / 1e9:.0f} GFLOP/s")
    cfg = GenerationConfig(max_new_tokens=args.new)
    results = []
    for mix in args.mixes:
        its = items(args.items, mix == "images", work)
        # the loop: one chat per item (a warm-up first)
        pipe.chat(its[0].messages, max_new_tokens=4)
        t0 = time.perf_counter()
        single = [pipe.chat(it.messages, max_new_tokens=args.new) for it in its]
        t_loop = time.perf_counter() - t0
        # points run's loop, with its journal
        with tempfile.TemporaryDirectory() as tmp:
            journal = runner.Journal(Path(tmp) / "out.jsonl.journal.0")
            t0 = time.perf_counter()
            tokens = runner.process(pipe, its, cfg, args.batch_size, journal, None)
            t_run = time.perf_counter() - t0
            journal.close()
            got = {r["id"]: r.get("reply") for r in runner.read_records(journal.path)}
        same = sum(got[it.id] == s for it, s in zip(its, single))
        # the compute-bound part: the same batches with one new token (vision + prefill + one step), against
        # its matmul floor (2 x parameters x tokens, for the decoder and for the vision encoder)
        with tempfile.TemporaryDirectory() as tmp:
            journal = runner.Journal(Path(tmp) / "j.0")
            t0 = time.perf_counter()
            runner.process(pipe, its, GenerationConfig(max_new_tokens=1), args.batch_size, journal, None)
            t_first = time.perf_counter() - t0
            journal.close()
        prompt_tokens = sum(pipe.encode(it.messages).input_ids.shape[1] for it in its)
        patches = sum(int(pipe.encode(it.messages).grid_thw.prod()) for it in its
                      if len(it.messages[0]["content"]) == 2)
        dec_params = sum(m.weight.numel() for n, m in pipe.model.decoder.named_modules()
                         if isinstance(m, torch.nn.Linear) and n != "lm_head")
        vis_params = sum(p_.numel() for p_ in pipe.model.vision.parameters()) + sum(
            p_.numel() for p_ in pipe.model.projector.parameters()) // 4
        floor_first = (2 * dec_params * prompt_tokens + 2 * vis_params * patches) / rate
        n_img = sum(1 for it in its if len(it.messages[0]["content"]) == 2)
        row = dict(mix=mix, items=len(its), new_tokens=args.new, batch_size=args.batch_size, loop_s=t_loop,
                   run_s=t_run, items_per_s_loop=len(its) / t_loop, items_per_s_run=len(its) / t_run,
                   tokens_per_s_run=tokens / t_run, ratio=t_loop / t_run, identical_replies=same, images=n_img,
                   prefill_vision_s=t_first, prefill_vision_floor_s=floor_first, prompt_tokens=prompt_tokens,
                   image_patches=patches)
        results.append(row)
        print(f"  {mix:6}  loop {len(its) / t_loop:6.3f} items/s   run {len(its) / t_run:6.3f} items/s "
              f"({tokens / t_run:6.1f} tok/s)   {t_loop / t_run:5.2f}x   replies identical: {same}/{len(its)}"
              + (f"   ({n_img} with an image)" if n_img else ""), flush=True)
        print(f"          vision + prefill + 1 token, batched: {t_first:.1f} s for {prompt_tokens} prompt tokens"
              + (f" and {patches} patches" if patches else "") + f"; matmul floor {floor_first:.1f} s "
              f"({floor_first / t_first:.0%} of it)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=info, preset=args.preset, dtype=args.dtype,
                                             matmul_flops_per_s=rate, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
