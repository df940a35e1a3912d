#!/usr/bin/env python3
"""The kernels issue's two figures, each against its baseline in the same run:

1. vision attention: the Triton varlen kernel vs PyTorch SDPA looped per image, 4 images x 4096 patches
   packed, 16 heads x 80, bf16; effective TFLOP/s (4 * sum(n^2) * H * D FLOPs).
2. decode: tokens/s at batch 1 after a 512-token prompt, our eager step, our compiled step, and
   transformers' Qwen2ForCausalLM.generate on the same weights (random, the released shapes); the floor
   is the weights' bytes over the device's measured copy bandwidth.

    python tools/bench_kernels.py                       # on a GPU: the real shapes
    python tools/bench_kernels.py --preset tiny --no-compile   # anywhere (CPU: Triton's interpreter)
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton's CPU interpreter; must be set before anything imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from points.model.decoder import Decoder  # noqa: E402
from points.runtime.engine import Engine  # noqa: E402
from points.runtime.sampling import Picker  # noqa: E402
from points.tooling import reference  # noqa: E402
from points.tooling.bench import copy_bandwidth, timed  # noqa: E402  (the one timing helper and floor)

PRESETS = {  # vision (images, patches each, heads, head dim), decoder llm config, prompt, new tokens
    "7b": ((4, 4096, 16, 80), reference.REAL_LLM, 512, 128),
    "tiny": ((2, 64, 2, 80), reference.TINY_LLM, 16, 8),
}


def bench_vision_attention(shape, dtype, device):
    from points.runtime.attention import varlen_attention

    n_img, n, h, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n_img * n, h, d, generator=g).to(device, dtype) for _ in range(3))
    bounds = [i * n for i in range(n_img + 1)]
    flops = 4 * n_img * n * n * h * d
    rows = {}
    for backend in ("sdpa", "triton"):
        t = timed(lambda: varlen_attention(q, k, v, bounds, backend), device)
        rows[backend] = dict(min_s=t.min_s, median_s=t.median_s, tflops=flops / t.min_s / 1e12)
    return rows


def bench_decode(llm, prompt_len, new, dtype, device, compile_step):
    cfg = reference.model_config(llm).decoder
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg).to(dtype).eval().requires_grad_(False)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)

    def ours(engine, steps):
        def run():  # greedy, chosen inside the (compiled) step
            for _ in engine.generate(Picker(1, cfg.vocab_size, device), steps + 1, tokens=prompt):
                pass
        return run

    def per_token(make):
        full = timed(make(new), device, repeat=3).min_s
        prefill = timed(make(0), device, repeat=3).min_s
        return max(full - prefill, 1e-9) / new

    rows = {"points eager": per_token(lambda s: ours(Engine(model), s))}
    if compile_step:
        compiled = Engine(model, compile=True)
        rows["points compiled"] = per_token(lambda s: ours(compiled, s))
    hf = reference.transformers_decoder(model)  # the same tensors, shared, not copied

    def theirs(steps):
        def run():
            with torch.inference_mode():
                hf.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                            pad_token_id=0)
        return run

    rows["transformers"] = per_token(theirs)
    return rows, weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vision_shape, llm, prompt_len, new = PRESETS[args.preset]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    vis = bench_vision_attention(vision_shape, torch.bfloat16 if device.type == "cuda" else torch.float16, device)
    dec, weights = bench_decode(llm, prompt_len, new, dtype, device, not args.no_compile)
    bw = copy_bandwidth(device)
    floor = weights / bw
    print(f"\npoints kernels, preset {args.preset}, {name}, torch {torch.__version__}")
    n_img, n, h, d = vision_shape
    print(f"vision attention ({n_img} x {n} patches, {h} heads x {d}): SDPA per image {vis['sdpa']['min_s'] * 1e3:.3f} ms"
          f" ({vis['sdpa']['tflops']:.1f} TFLOP/s), Triton {vis['triton']['min_s'] * 1e3:.3f} ms "
          f"({vis['triton']['tflops']:.1f} TFLOP/s): {vis['sdpa']['min_s'] / vis['triton']['min_s']:.2f}x")
    print(f"decode, batch 1, {prompt_len}-token prompt, {str(dtype).removeprefix('torch.')}, weights {weights / 1e9:.2f} GB, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s -> floor {1 / floor:.0f} tokens/s")
    for label, s in dec.items():
        print(f"  {label:16} {1 / s:8.1f} tokens/s  ({dec['transformers'] / s:.2f}x transformers, "
              f"{floor / s:.0%} of the floor)")
    if args.json:
        args.json.write_text(json.dumps(dict(preset=args.preset, device=name, torch=torch.__version__, vision=vis,
                                             decode_s_per_token=dec, weights_bytes=weights, copy_bytes_per_s=bw), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
