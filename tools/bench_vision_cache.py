#!/usr/bin/env python3
"""The vision-feature cache: one image asked N different questions, with the cache and without it.

    python tools/bench_vision_cache.py                    # small preset, bfloat16, a 448x448 image, 8 questions
    python tools/bench_vision_cache.py --preset tiny       # a quick look

Each question puts its own text before the image, so the prefix cache cannot share the image's positions:
only the feature cache can spare the encoder. Prints the vision encoder's time summed over the requests
(Request.vision_seconds) and the whole wall time, both ways, in one sitting. A benchmark, not a test.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import points
from points.io.checkpoint import DTYPES
from points.tooling.measure import machine
from points.tooling.synthetic import SHAPES, checkpoint_in


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--size", type=int, default=448, help="the image's side in pixels")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-vcache-"))
    ckpt = checkpoint_in(work, args.preset, DTYPES[args.dtype])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    print(f"bench_vision_cache: {args.preset} {args.dtype}, {machine(torch.device('cpu'))}", file=sys.stderr)
    result = {}
    for name, mb in (("without", 0), ("with", 256)):
        pipe = points.load(ckpt, prefix_cache=False, vision_cache_mb=mb)
        pipe.chat([{"role": "user", "content": "warm up"}], max_new_tokens=1)
        start, vision, encoded = time.perf_counter(), 0.0, 0
        for i in range(args.questions):
            request = pipe.submit([{"role": "user", "content": [{"type": "text", "text": f"Question {i}: what is here?"},
                                                                {"type": "image", "image": image}]}], max_new_tokens=1)
            request.text()
            vision, encoded = vision + request.vision_seconds, encoded + request.images_encoded
        result[name] = dict(vision_s=vision, wall_s=time.perf_counter() - start, images_encoded=encoded)
        print(f"{name:7s} the cache: vision {vision:7.2f} s over {encoded} encodings, all {result[name]['wall_s']:7.2f} s "
              f"for {args.questions} questions (1 new token each)")
    print(f"the cache spares {100 * (1 - result['with']['wall_s'] / result['without']['wall_s']):.0f}% of the wall time")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
