#!/usr/bin/env python3
"""Rows per second of `points eval` against `points run` on the same items, in one process, alternated.

    python tools/bench_eval.py --workdir /tmp/bench-eval                 # small preset, bf16, 16 MMStar-like rows
    python tools/bench_eval.py --preset tiny --rows 4 --new 4 --dtype float32   # a quick look

The rows: a multiple-choice TSV in VLMEvalKit's format (base64 PNGs of 448 x 336, four options, a hint on half
of them) named MMStar, so `points eval` asks them with the wrapper's prompt and its 840 x 840 minimum. The same
items for `points run`: a JSONL whose messages are exactly what `points eval` submits (the wrapper's text, the
image as VLMEvalKit writes it, the same pixel bounds), the images as files. Both commands run whole (their
`main`, model load included: the same checkpoint each time) with the same batch size and max_new_tokens,
greedy; the replies must be equal. What differs is `points eval`'s own work: the TSV parsed, each image
decoded from base64 and written as VLMEvalKit writes it (a PNG) when its row is asked, the prediction file and
the score written. A benchmark, not a test: compare within one run.
"""

import argparse
import base64
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from points.io.benchmark_tsv import read_tsv
from points.tooling import evaluate, run, vlmeval
from points.tooling.measure import machine
from points.tooling.synthetic import checkpoint_in


def write_rows(folder: Path, n: int) -> tuple[Path, Path]:
    """(MMStar.tsv, items.jsonl with the same questions asked as points eval asks them)."""
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]
    rows = []
    for i in range(n):
        im = Image.new("RGB", (448, 336), (40 * i % 255, 90, 160))
        ImageDraw.Draw(im).text((20, 20), f"figure {i}", fill="white")
        b = io.BytesIO()
        im.save(b, format="PNG")
        rows.append([str(i), base64.b64encode(b.getvalue()).decode(), f"What does figure {i} show?",
                     "Look at the colours." if i % 2 else "", "a chart", "a photo", "a map", "a table", "ABCD"[i % 4],
                     "coarse perception", "perception", "val"])
    tsv = folder / "MMStar.tsv"
    with open(tsv, "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header, *rows])
    lines = []
    for r in read_tsv(tsv):
        messages = vlmeval.messages(r, vlmeval.BENCHMARKS["MMStar"])
        image = folder / f"{r.index}.png"
        image.write_bytes(messages[0]["content"][0]["image"])
        messages[0]["content"][0]["image"] = str(image)
        lines.append(json.dumps({"id": r.index, "messages": messages}))
    items = folder / "items.jsonl"
    items.write_text("\n".join(lines) + "\n")
    return tsv, items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new", type=int, default=16, help="max_new_tokens of both (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2, help="runs of each, alternated (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine(torch.device("cpu"))
    print(json.dumps(info), flush=True)
    ckpt = checkpoint_in(work, args.preset, getattr(torch, args.dtype))
    folder = Path(tempfile.mkdtemp(prefix="rows-", dir=work))
    tsv, items = write_rows(folder, args.rows)
    common = ["--model", str(ckpt), "--max-new-tokens", str(args.new), "--batch-size", str(args.batch_size),
              "--progress", "off"]
    times = {"points eval": [], "points run": []}
    replies = {}
    for k in range(args.repeat):
        for name in ("points eval", "points run"):
            out = folder / f"{name.split()[1]}-{k}"
            start = time.perf_counter()
            if name == "points eval":
                code = evaluate.main(["--data", str(tsv), "--output", str(out), *common])
                got = out / "POINTSV15-Qwen-2.5-7B-Chat_MMStar.jsonl"
            else:
                out.mkdir()
                got = out / "out.jsonl"
                code = run.main(["--input", str(items), "--output", str(got), *common])
            times[name].append(time.perf_counter() - start)
            assert code == 0, name
            replies[name] = [json.loads(line)["reply"] for line in got.read_text().splitlines()]
    same = replies["points eval"] == replies["points run"]
    best = {name: min(t) for name, t in times.items()}
    for name, t in best.items():
        print(f"{name:<12} {args.rows / t:6.3f} rows/s  ({t:.2f} s for {args.rows} rows, model load included; runs "
              f"{', '.join(f'{x:.2f}' for x in times[name])} s)", flush=True)
    ratio = best["points run"] / best["points eval"]
    print(f"points eval / points run: {ratio:.3f}x rows/s; the same replies: {same}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "seconds": times, "ratio": ratio, "same": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
