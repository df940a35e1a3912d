#!/usr/bin/env python3
"""Throughput of `points run` against a loop calling `Pipeline.chat` one item at a time and against fixed,
length-sorted batches (what `points run` did before the scheduler), same weights, same process, same
replies (checked).

    python tools/bench_run.py                                  # small preset, bf16, 32 items x 128 new tokens
    python tools/bench_run.py --new-range 8 256                # each item its own max_new_tokens in [8, 256]
    python tools/bench_run.py --preset tiny --items 8 --new 16 --dtype float32   # a quick look

Two mixes: text only (prompt lengths spread over 16-400 tokens), and the same with a quarter of the items
carrying a small image (448 x 336). The run side is `points.tooling.run.process`, the loop `points run`
uses (the continuous-batching scheduler, --batch-size rows, a journal fsynced per finished item); the fixed
side sorts the items by (image count, prompt length), cuts batches of --batch-size and runs each batch from
its prefill until its last row ends (a row that ends early idles), on the same engine. Load time is left
out of all three. Reports items/s, generated tokens/s and the ratios; then the compute-bound part alone
(one new token each: vision, prefill, one step) against its matmul floor (2 x weights x tokens for the
decoder and the vision encoder, over the matmul rate measured in the run).
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
from points.runtime.generation import GenerationConfig, Reply, prepare
from points.runtime.sampling import Picker
from points.runtime.vision import padded_embeds
from points.tooling import run as runner
from points.tooling.measure import machine, matmul_rate
from points.tooling.synthetic import SHAPES, checkpoint_in
from points.tooling.measure import engine_generate

WORDS = ("river mountain light question answer window garden music paper story city water stone "
         "morning evening journey number colour").split()


def items(n: int, images: bool, folder: Path, new: tuple[int, int], seed: int = 0) -> list[runner.Item]:
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
        out.append(runner.Item(i, f"item-{i}", [{"role": "user", "content": content}], i + 1,
                               {"max_new_tokens": rng.randint(*new)}))
    return out


def fixed_batches(pipe, its: list[runner.Item], batch_size: int) -> tuple[dict, int]:
    """The fixed, length-sorted batches (greedy): each batch prefilled at once (right-padded, its images
    packed into one encode), then decoded until its last row ends. -> ({id: reply}, tokens generated)."""
    tok, model, engine = pipe.tokenizer, pipe.model, pipe.engine
    prepared = []
    for it in its:
        cfg = GenerationConfig(**it.fields)
        prompt, ids = prepare(tok, pipe.processor, it.messages, cfg, model.decoder.cfg.max_seq_len)
        prepared.append((0 if prompt.grid_thw is None else len(prompt.grid_thw), len(ids), it, cfg, prompt, ids))
    prepared.sort(key=lambda p: (p[0], p[1], p[2].index))
    replies, tokens, stop = {}, 0, {tok.im_end_id, tok.eos_id}
    for start in range(0, len(prepared), batch_size):
        batch = prepared[start:start + batch_size]
        lengths = [p[1] for p in batch]
        with torch.inference_mode():
            embeds = padded_embeds(model, [p[5] for p in batch], [p[4] for p in batch], tok.eos_id, engine.attn)
        rows = [Reply(tok, ()) for _ in batch]
        most = max(p[3].max_new_tokens for p in batch)
        pick = Picker(len(batch), model.decoder.cfg.vocab_size, engine.device)
        for step, chosen in enumerate(engine_generate(engine, pick, most, embeds=embeds,
                                                      lengths=torch.tensor(lengths))):
            for row, t, p in zip(rows, chosen.tolist(), batch):
                row.push(t, t in stop, step == p[3].max_new_tokens - 1)
            if all(r.done for r in rows):
                break
        for row, p in zip(rows, batch):
            replies[p[2].id] = row.text
            tokens += row.tokens
    return replies, tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--new", type=int, default=128, help="new tokens per item")
    p.add_argument("--new-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="each item its own max_new_tokens, uniform in [LO, HI] (instead of --new)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mixes", nargs="+", choices=["text", "images"], default=["text", "images"])
    p.add_argument("--workdir", type=Path, default=None, help="where the random checkpoint is kept between runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-bench-run-"))
    pipe = points.load(checkpoint_in(work, args.preset, dtype), max_batch=args.batch_size)
    new = tuple(args.new_range) if args.new_range else (args.new, args.new)
    info = machine(torch.device("cpu"))
    d = pipe.model.cfg.decoder
    rate = matmul_rate(2048, d.hidden_size, d.ffn_size, dtype, torch.device("cpu"))
    print(f"points run vs a Pipeline.chat loop and fixed batches: preset {args.preset}, {args.dtype}, {args.items} "
          f"items x {new[0]}-{new[1]} new tokens, batch size {args.batch_size}, on {info['cpu']} "
          f"({info.get('threads')} threads), torch {torch.__version__}; matmul rate {rate / 1e9:.0f} GFLOP/s")
    results = []
    for mix in args.mixes:
        its = items(args.items, mix == "images", work, new)
        # the loop: one chat per item (a warm-up first); no prefix cache on any side
        pipe.prefix = None
        pipe.chat(its[0].messages, max_new_tokens=4)
        t0 = time.perf_counter()
        single = [pipe.chat(it.messages, **it.fields) for it in its]
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed, fixed_tokens = fixed_batches(pipe, its, args.batch_size)
        t_fixed = time.perf_counter() - t0
        # points run's loop, with its journal
        with tempfile.TemporaryDirectory() as tmp:
            journal = runner.Journal(Path(tmp) / "out.jsonl.journal.0")
            t0 = time.perf_counter()
            tokens = runner.process(pipe, its, {}, journal, None)
            t_run = time.perf_counter() - t0
            journal.close()
            got = {r["id"]: r.get("reply") for r in runner.read_records(journal.path)}
        same = sum(got[it.id] == s for it, s in zip(its, single))
        same_fixed = sum(fixed[it.id] == s for it, s in zip(its, single))
        # the compute-bound part: the same batches with one new token (vision + prefill + one step), against
        # its matmul floor (2 x parameters x tokens, for the decoder and for the vision encoder)
        with tempfile.TemporaryDirectory() as tmp:
            journal = runner.Journal(Path(tmp) / "j.0")
            t0 = time.perf_counter()
            one = [runner.Item(it.index, it.id, it.messages, it.line, {"max_new_tokens": 1}) for it in its]
            runner.process(pipe, one, {}, journal, None)
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
        row = dict(mix=mix, items=len(its), new_tokens=list(new), batch_size=args.batch_size, loop_s=t_loop,
                   run_s=t_run, fixed_s=t_fixed, items_per_s_loop=len(its) / t_loop, items_per_s_run=len(its) / t_run,
                   items_per_s_fixed=len(its) / t_fixed, tokens_per_s_run=tokens / t_run,
                   tokens_per_s_fixed=fixed_tokens / t_fixed, ratio=t_loop / t_run, ratio_fixed=t_fixed / t_run,
                   identical_replies=same, identical_fixed=same_fixed, tokens=tokens, images=n_img,
                   prefill_vision_s=t_first, prefill_vision_floor_s=floor_first, prompt_tokens=prompt_tokens,
                   image_patches=patches)
        results.append(row)
        print(f"  {mix:6}  loop {len(its) / t_loop:6.3f} items/s   fixed batches {len(its) / t_fixed:6.3f} items/s "
              f"({fixed_tokens / t_fixed:6.1f} tok/s)   run {len(its) / t_run:6.3f} items/s ({tokens / t_run:6.1f} tok/s)"
              f"   run/loop {t_loop / t_run:5.2f}x   run/fixed {t_fixed / t_run:5.2f}x   replies identical: "
              f"{same}/{len(its)} (fixed {same_fixed}/{len(its)})" + (f"   ({n_img} with an image)" if n_img else ""),
              flush=True)
        print(f"          vision + prefill + 1 token, batched: {t_first:.1f} s for {prompt_tokens} prompt tokens"
              + (f" and {patches} patches" if patches else "") + f"; matmul floor {floor_first:.1f} s "
              f"({floor_first / t_first:.0%} of it)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=info, preset=args.preset, dtype=args.dtype,
                                             matmul_flops_per_s=rate, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
