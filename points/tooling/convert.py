"""`points convert SRC DST [--dtype D] [--quantize int8|int4 [--quantize-lm-head] [--group-size G] [--symmetric]]`
(also `python weights_convert.py SRC DST`): a released POINTS-1.5 checkpoint -> this project's layout, written
atomically (an interrupted run leaves no DST). --quantize int8 writes the decoder's projections as weight-only
int8 with one scale per output channel, --quantize int4 as 4-bit codes with a scale and an offset per group of
--group-size inputs (32, 64, 128; default 128; --symmetric: no offsets) (points.io.quantized); `points.load`
maps them back as they are."""

import argparse

from points.io.atomic import MAX_SHARD_BYTES
from points.tooling.options import add_weight_options, check_weight_options, exit_code, quantize_options


def main(argv=None, prog: str = "points convert") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("src", help="checkpoint directory (released layout, or ours)")
    p.add_argument("dst", help="output directory; must not exist (written atomically)")
    add_weight_options(p, device=None)
    p.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9, help="largest shard (default 5)")
    args = p.parse_args(argv)
    check_weight_options(p, args)
    if not 1 <= args.max_shard_gb * 1e9 < float("inf"):
        p.error(f"--max-shard-gb {args.max_shard_gb:g}: expected a size in GB > 0 (at least one byte; default 5)")
    return exit_code(lambda: _convert(args))


def _convert(args) -> int:
    from points.io.checkpoint import convert

    out = convert(args.src, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 1e9),
                  **quantize_options(args))
    print(f"wrote {out}")
    return 0
