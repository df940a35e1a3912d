#!/usr/bin/env python3
"""Probe (one GPU call): where the vision encoder's time goes at small images. Eager (SDPA / Triton), the
encoder under torch.compile (inductor fuses the float32 LayerNorm, rotary and QuickGELU passes), and the same
with CUDA graphs. Random weights, released shapes, bf16. Prints ms per encode (min of --repeat) and the
fraction of the matmul floor reached.

    python tools/probe_vision.py                  # on a GPU
    python tools/probe_vision.py --device cpu --depth 1 --repeat 1    # anywhere, to see it run"""

import argparse
import sys

import torch

from points.io.processor import RELEASE_MAX_PIXELS, ImageProcessor
from points.tooling.measure import matmul_rate, timed, vision_flops, vision_grid
from points.tooling.synthetic import SHAPES, hf_config
from points.io.config import from_hf_dict
from points.model.vision import VisionEncoder


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--depth", type=int, default=32)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = from_hf_dict(hf_config(*SHAPES["7b"])).vision
    cfg = type(cfg)(**{**vars(cfg), "depth": args.depth}) if args.depth != cfg.depth else cfg
    proc = ImageProcessor(max_pixels=RELEASE_MAX_PIXELS)
    rate = max(matmul_rate(4096, cfg.embed_dim, cfg.mlp_dim, dtype, dev), matmul_rate(4096, cfg.mlp_dim, cfg.embed_dim, dtype, dev))
    for sizes in ([(448, 448)], [(1008, 756)]):
        grid = vision_grid(sizes, proc)
        pixels = torch.randn(int(grid.prod(-1).sum()), cfg.patch_dim, device=dev)
        floor = vision_flops(cfg, grid) / rate
        res = {}
        for attn in ("sdpa", "triton") if dev.type == "cuda" else ("sdpa",):
            with torch.device(dev):
                enc = VisionEncoder(cfg, attn).to(dtype).eval().requires_grad_(False)

            def encode(enc=enc):
                return enc(pixels, grid)
            with torch.inference_mode():
                res[f"eager {attn}"] = timed(encode, dev, args.repeat, 2).min_s
                for mode in (None, "reduce-overhead") if attn == "sdpa" else ():
                    # the whole encoder in one compiled function: with CUDA graphs, per-block graphs would
                    # overwrite the output the next block reads
                    torch._dynamo.reset()
                    whole = torch.compile(enc, mode=mode, dynamic=False)
                    try:
                        res[f"compiled {attn} {mode or 'default'}"] = timed(
                            lambda whole=whole: whole(pixels, grid).clone(), dev, args.repeat, 3).min_s
                    except Exception as e:
                        print(f"  {attn} {mode}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        print(f"{sizes[0][0]}x{sizes[0][1]} x{len(sizes)} ({int(grid.prod(-1).sum())} patches), floor {floor * 1e3:.2f} ms: "
              + ", ".join(f"{k} {v * 1e3:.2f} ms ({floor / v:.0%})" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
