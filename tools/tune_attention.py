#!/usr/bin/env python3
"""The attention sweep behind the Triton kernel's tile list and `attn="auto"`'s rule: for each shape, PyTorch
SDPA (as the model calls it) against the Triton varlen kernel with every tile configuration of
`points.kernels.flash_varlen.CONFIGS`, the head dim as one padded piece instead of two exact ones, and the
autotuned dispatch. Times are the minimum wall time over `--repeat` synchronised calls, after warm-up.

    python tools/tune_attention.py --json sweep.json           # on a GPU (about a minute)
    python tools/tune_attention.py --dry-run                   # anywhere: tiny shapes, Triton's interpreter

The causal rows time both sides as the decoder calls them (the K/V written into the cache first, the Triton
kernel reading the cache in place) and, from an empty cache, the two kernels alone.

Shapes (bf16): vision segments of n patches x 16 heads x 80 (count x n), the decoder's causal prefill
(28 query / 4 KV heads x 128) from an empty cache, and a cached prefill (new tokens after past ones in the
KV cache, where SDPA needs an explicit mask). Also: the head dim 80 as one padded piece of 128 (vision), and
the 7 query heads of a KV head in separate tiles instead of one (decoder), each with the first tile config.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton's CPU interpreter; must be set before anything imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from points.kernels import flash_varlen as fv  # noqa: E402
from points.model.attention import AttentionMeta, Packing, causal_attention, varlen_attention  # noqa: E402
from points.model.cache import KVCache  # noqa: E402
from points.tooling.measure import timed  # noqa: E402

VISION = [(64, 256), (16, 1024), (4, 1024), (1, 1024), (8, 2048), (2, 2048), (4, 4096), (1, 4096), (2, 8192),
          (1, 16384)]
CAUSAL = [512, 2048, 8192]
CACHED = [(512, 1024), (2048, 2048)]  # (new tokens, past tokens)
# tried besides CONFIGS (never the best on the H200 of 2026-11-27; kept in the sweep for other cards)
EXTRA = [(128, 128, 8, 2), (128, 32, 4, 4), (64, 32, 4, 4), (64, 64, 8, 2)]
# --dry-run: every kind of row at the fewest tiles that still cover several segments, a segment cut inside a
# tile, grouped query heads and past keys (the interpreter runs each tile in Python)
DRY = dict(vision=[(2, 24), (1, 16)], causal=[16], cached=[(8, 16)], vision_heads=2, llm_heads=(7, 1))
WARMUP = 2  # untimed calls before each timing (autotuning, compilation); none in a dry run (the interpreter)


def _vision_case(count, n, heads, device, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(count * n, heads, 80, generator=g).to(device, dtype) for _ in range(3))
    bounds = [i * n for i in range(count + 1)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    flops = 4 * count * n * n * heads * 80
    return q, k, v, bounds, cu, flops


def sweep_vision(shapes, heads, device, dtype, repeat, configs, warmup=WARMUP):
    rows = []
    for count, n in shapes:
        q, k, v, bounds, cu, flops = _vision_case(count, n, heads, device, dtype)
        row = {"kind": "vision", "segments": count, "length": n, "heads": heads, "head_dim": 80, "flops": flops}
        packing = Packing.of(bounds, device, "sdpa")
        row["sdpa_s"] = timed(lambda: varlen_attention(q, k, v, packing), device, repeat, warmup).min_s
        row["triton_auto_s"] = timed(lambda: fv.flash_attn_varlen(q, k, v, cu, cu, n), device, repeat, warmup).min_s
        row["configs"] = {}
        for name, kw in configs:
            row["configs"][name] = _try(lambda: fv.flash_attn_varlen(q, k, v, cu, cu, n, **kw), device, repeat, warmup)
        row["padded_128_s"] = _try(lambda: fv.flash_attn_varlen(q, k, v, cu, cu, n, split=False, **configs[0][1]),
                                   device, repeat, warmup)
        rows.append(_report(row))
    return rows


def sweep_causal(lengths, cached, heads, device, dtype, repeat, configs, warmup=WARMUP):
    hq, hkv = heads
    rows = []
    g = torch.Generator().manual_seed(1)
    for T, past in [(t, 0) for t in lengths] + list(cached):
        q = torch.randn(1, T, hq, 128, generator=g).to(device, dtype)
        k, v = (torch.randn(1, T, hkv, 128, generator=g).to(device, dtype) for _ in range(2))
        cache = KVCache(1, 1, hkv, 128, past + T, dtype=dtype, device=device)
        cache.k.normal_()
        cache.v.normal_()
        if past:
            cache.reserve(past)

        def meta(kernel, c=cache):
            return AttentionMeta(c.pos[:, None] + torch.arange(T, device=device), past + T, fresh=past == 0, cache=c,
                                 kernel=kernel)

        flops = 4 * T * (past + T / 2) * hq * 128  # the visible half of the new block, all of the past
        row = {"kind": "causal" if not past else "cached", "length": T, "past": past, "heads": hq, "kv_heads": hkv,
               "head_dim": 128, "flops": flops}
        row["sdpa_s"] = timed(lambda: causal_attention(q, k, v, meta("sdpa"), 0), device, repeat, warmup).min_s
        row["triton_auto_s"] = timed(lambda: causal_attention(q, k, v, meta("triton"), 0), device, repeat, warmup).min_s
        qf, kf, vf = q[0], k[0], v[0]
        cu_q = torch.tensor([0, T], dtype=torch.int32, device=device)
        if not past:  # the kernels alone, no cache write: SDPA's causal flash kernel vs the autotuned Triton one
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            row["sdpa_kernel_s"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=True), device, repeat, warmup).min_s
            row["triton_kernel_s"] = timed(lambda: fv.flash_attn_varlen(qf, kf, vf, cu_q, cu_q, T, causal=True),
                                           device, repeat, warmup).min_s
        if past:  # the kernel on the cache in place, as the decoder calls it
            used = torch.tensor([past + T], device=device)
            row["configs"] = {name: _try(lambda: fv.flash_attn_cache(q, cache.k[0], cache.v[0], used, **kw),
                                         device, repeat, warmup) for name, kw in configs}
            row["unpacked_s"] = _try(lambda: fv.flash_attn_cache(q, cache.k[0], cache.v[0], used, pack_gqa=False,
                                                                 **configs[0][1]), device, repeat, warmup)
        else:
            row["configs"] = {name: _try(lambda: fv.flash_attn_varlen(qf, kf, vf, cu_q, cu_q, T, causal=True, **kw),
                                         device, repeat, warmup) for name, kw in configs}
            row["unpacked_s"] = _try(lambda: fv.flash_attn_varlen(qf, kf, vf, cu_q, cu_q, T, causal=True,
                                                                  pack_gqa=False, **configs[0][1]),
                                     device, repeat, warmup)
        rows.append(_report(row))
    return rows


def _try(fn, device, repeat, warmup=WARMUP):
    try:
        return timed(fn, device, repeat, warmup).min_s
    except Exception as e:  # a tile that does not fit this chip's shared memory, say
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _report(row):
    fl = row["flops"]
    best = min(((t, name) for name, t in row["configs"].items() if t), default=(None, None))
    row["best_config"], row["best_config_s"] = best[1], best[0]
    shape = (f"{row['segments']} x {row['length']}" if row["kind"] == "vision"
             else f"{row['length']} new" + (f" after {row['past']}" if row["past"] else ""))
    tf = lambda s: f"{s * 1e3:7.3f} ms ({fl / s / 1e12:5.1f} TF/s)" if s else "   failed"  # noqa: E731
    print(f"{row['kind']:7} {shape:18} sdpa {tf(row['sdpa_s'])} | triton auto {tf(row['triton_auto_s'])}"
          f" = {row['sdpa_s'] / row['triton_auto_s']:.2f}x sdpa | best {best[1]} {tf(best[0])}"
          + (f" | padded 128 {tf(row['padded_128_s'])}" if "padded_128_s" in row else "")
          + (f" | GQA unpacked {tf(row['unpacked_s'])}" if "unpacked_s" in row else "")
          + (f" | kernels alone: sdpa {tf(row['sdpa_kernel_s'])}, triton {tf(row['triton_kernel_s'])}"
             if "sdpa_kernel_s" in row else ""), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one tile configuration")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu needs Triton's interpreter: set TRITON_INTERPRET=1")
    if args.dry_run:
        configs = [("16x16", dict(block_m=16, block_n=16))]
        shapes, warmup = DRY, 0
        args.repeat = 1
    else:
        tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in fv.CONFIGS] + EXTRA
        configs = [(f"{m}x{n} w{w} s{st}", dict(block_m=m, block_n=n, num_warps=w, num_stages=st))
                   for m, n, w, st in tiles]
        shapes, warmup = dict(vision=VISION, causal=CAUSAL, cached=CACHED, vision_heads=16, llm_heads=(28, 4)), WARMUP
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"attention sweep on {name}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}")
    rows = sweep_vision(shapes["vision"], shapes["vision_heads"], device, dtype, args.repeat, configs, warmup)
    rows += sweep_causal(shapes["causal"], shapes["cached"], shapes["llm_heads"], device, dtype, args.repeat, configs,
                         warmup)
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
