#!/usr/bin/env python3
"""Time and peak memory of the vision encoder on a packed batch, at the released shapes.

    python tools/bench_vision.py                      # 4 images of 1024x1024: 4 x 74 x 74 = 21,904 patches
    python tools/bench_vision.py --images 448x448 --dtype bfloat16 --repeat 3

Random weights of the real shapes (32 blocks, 1280 wide, 16 heads of 80); image sizes go through the
processor's resize rule (factor 28, max 12,845,056 pixels). Reports the time per encode (min and median of
--repeat runs after a warm-up), the floor (the encode's FLOPs over this machine's measured matmul rate in
the same dtype) and the fraction of it reached, the process's peak resident memory next to the weights'
size, and what one dense [L, L] attention mask or score matrix would have needed. A benchmark, not a test: run it on a quiet
machine and compare within one run.
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

from points.io.checkpoint import DTYPES
from points.io.processor import RELEASE_MAX_PIXELS, smart_resize
from points.model.vision import VisionEncoder
from points.tooling import reference
from points.tooling.measure import matmul_rate, timed, vision_flops  # (shared with points bench)


def resized_grid(height: int, width: int) -> tuple[int, int, int]:
    """(1, h, w) in 14-px patches, as the image processor resizes an image of that size."""
    h, w = smart_resize(height, width, max_pixels=RELEASE_MAX_PIXELS)
    return 1, h // 14, w // 14


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", default=["1024x1024"] * 4, help="HxW of each packed image")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--depth", type=int, default=32, help="blocks (32 = the release)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    cfg = reference.model_config(reference.REAL_LLM, dict(reference.REAL_VISION, depth=args.depth)).vision
    base = peak_rss_gb()
    with torch.device(args.device):
        encoder = VisionEncoder(cfg).to(dtype).eval().requires_grad_(False)
    weights = sum(t.numel() * t.element_size() for t in encoder.parameters()) / 1e9
    grid = torch.tensor([resized_grid(*map(int, s.split("x"))) for s in args.images])
    n = int(grid.prod(-1).sum())
    pixels = torch.randn(n, cfg.patch_dim, device=args.device)

    with torch.no_grad():  # the first run is a warm-up when repeating
        t = timed(lambda: encoder(pixels, grid), device, repeat=args.repeat, warmup=1 if args.repeat > 1 else 0)
    flops = vision_flops(cfg, grid)
    rate = matmul_rate(min(n, 8192), cfg.embed_dim, cfg.mlp_dim, dtype, device)
    seg_sq = sum(int(t) * int(h * w) ** 2 for t, h, w in grid.tolist())
    row = dict(images=args.images, grid=grid.tolist(), patches=n, dtype=args.dtype, device=args.device,
               depth=args.depth, threads=torch.get_num_threads(), torch=torch.__version__,
               time_min_s=t.min_s, time_median_s=t.median_s, weights_gb=weights,
               tflop=flops / 1e12, matmul_gflops=rate / 1e9, floor_s=flops / rate,
               peak_rss_gb=peak_rss_gb(), rss_before_model_gb=base,
               dense_mask_gb=n * n / 1e9, dense_scores_fp32_gb=n * n * 4 * cfg.n_heads / 1e9,
               per_image_scores_fp32_gb=seg_sq * 4 * cfg.n_heads / 1e9)
    if args.device.startswith("cuda"):
        row["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(f"vision encoder, {len(args.images)} images packed = {n} patches, {args.dtype} on {args.device} "
          f"({row['threads']} threads), {args.depth} blocks")
    print(f"  time per encode: min {row['time_min_s']:.2f} s, median {row['time_median_s']:.2f} s")
    print(f"  floor: {row['tflop']:.2f} TFLOP at the measured matmul rate {row['matmul_gflops']:.0f} GFLOP/s = "
          f"{row['floor_s']:.2f} s; reached {row['floor_s'] / row['time_min_s']:.0%} of it")
    print(f"  peak resident memory {row['peak_rss_gb']:.2f} GB (process, {base:.2f} GB before the model); "
          f"weights {weights:.2f} GB")
    print(f"  for comparison: one dense [L, L] bool mask {row['dense_mask_gb']:.2f} GB; dense fp32 scores over "
          f"{cfg.n_heads} heads {row['dense_scores_fp32_gb']:.1f} GB; per-image fp32 scores "
          f"{row['per_image_scores_fp32_gb']:.1f} GB (never materialised here either)")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
