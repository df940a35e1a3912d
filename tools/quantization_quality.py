#!/usr/bin/env python3
"""How far weight-only int8 and int4 move the decoder: logit error against the float32 model on fixed prompts, and
greedy agreement, per scheme (int4: each group size, with and without offsets), with and without lm_head; the bf16
model's own gap beside it for scale, and for each int4 variant a yardstick: plain round-to-nearest fake
quantization of the same groups computed here (min-max per group, float activations, no packing, no kernel),
with our error's ratio to it (the goal: within 1.05x).

    python tools/quantization_quality.py                       # tiny (the parity model's shapes) and small
    python tools/quantization_quality.py --presets small --prompts 16 --new 64

Random weights (`points.tooling.synthetic.random_decoder`: norm weights near 1, the rest N(0, 0.02)), so the
logits are flatter than a trained model's and the greedy figures are a pessimistic proxy: a near-tie flips under
any perturbation. Metrics, over `--prompts` random prompts of 64 tokens, teacher-forced one token a step through
the engine (the decode path, so int4's CPU kernel, which rounds the activations to int8, is what is measured):
the largest absolute logit error and the largest logit, the relative error ||a - b|| / ||a||, and how often the
top-1 token agrees; then greedy decoding of `--new` tokens from each prompt: the share of prompts whose whole
continuation is identical and the mean share of tokens before the first difference.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from points.model.decoder import Decoder
from points.runtime.engine import Engine
from points.runtime.linears import quantize_decoder
from points.runtime.quantize import quantized_linears
from points.runtime.sampling import Picker
from points.tooling import reference
from points.tooling.synthetic import SHAPES, random_decoder
from points.tooling.measure import engine_generate

PRESETS = {"tiny": (reference.TINY_LLM, reference.TINY_VISION), "small": SHAPES["small"]}


def stepped_logits(model: Decoder, prompts: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, T, vocab], one token a step through the engine (the decode path)."""
    engine = Engine(model)
    cache = engine.new_cache(prompts.shape[0], prompts.shape[1])
    out = [engine.prefill(cache, tokens=prompts[:, :1])]
    for i in range(1, prompts.shape[1]):
        out.append(engine.step(prompts[:, i:i + 1], cache))
    return torch.stack(out, dim=1)


def compare(ref: Decoder, other: Decoder, prompts: torch.Tensor, new: int, a: torch.Tensor) -> dict:
    """`other` against `ref` (whose stepped logits are `a`)."""
    b = stepped_logits(other, prompts)
    gens = []
    for model in (ref, other):
        engine = Engine(model)
        pick = Picker(prompts.shape[0], model.cfg.vocab_size, torch.device("cpu"))
        gens.append(torch.stack(list(engine_generate(engine, pick, new, tokens=prompts)), dim=1))
    same = gens[0] == gens[1]
    prefix = torch.where(same.all(1), torch.tensor(new), (~same).int().argmax(1))
    return {"max_abs_err": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
            "rel_err": ((a - b).norm() / a.norm()).item(),
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "greedy_identical": same.all(1).float().mean().item(),
            "greedy_prefix": (prefix.float() / new).mean().item()}


def round_to_nearest(decoder: Decoder, group: int, symmetric: bool, lm_head: bool) -> Decoder:
    """The yardstick: every projection int4 quantizes (and lm_head) replaced by its plain round-to-nearest
    fake quantization in float32, written here from the definition (per group of `group` inputs: min-max with
    15 steps, or max |w| with 7 steps each side), the activations left in float."""
    with torch.no_grad():
        for parent, name in quantized_linears(decoder, lm_head):
            linear = getattr(parent, name)
            w = linear.weight.float()
            n = w.shape[1]
            pad = -n % group
            g = torch.cat([w, w[:, -1:].expand(-1, pad)], 1).reshape(w.shape[0], -1, group)
            if symmetric:
                step = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-30)
                fake = (g / step).round().clamp(-8, 7) * step
            else:
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                step = ((hi - lo) / 15).clamp_min(1e-30)
                fake = ((g - lo) / step).round().clamp(0, 15) * step + lo
            linear.weight.copy_(fake.reshape(w.shape[0], -1)[:, :n])
    return decoder


INT4_VARIANTS = [(128, False, False), (128, True, False), (64, False, False), (32, False, False), (128, False, True)]


def _print(r: dict) -> None:
    ratio = f"{r['rel_err_vs_yardstick']:11.3f}x" if "rel_err_vs_yardstick" in r else ""
    print(f"{r['preset']:6} {r['variant']:24} {r['max_abs_err']:10.4f} {r['max_abs_logit']:11.3f} {r['rel_err']:9.2e} "
          f"{r['top1_agree']:11.4f} {r['greedy_identical']:11.3f} {r['greedy_prefix']:13.3f} {ratio:>12}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "small"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    print(f"{'preset':6} {'variant':24} {'max |err|':>10} {'max |logit|':>11} {'rel err':>9} {'top-1 agree':>11} "
          f"{'greedy same':>11} {'greedy prefix':>13} {'vs yardstick':>12}")
    for preset in args.presets:
        ref = random_decoder(PRESETS[preset])
        prompts = torch.randint(0, ref.cfg.vocab_size, (args.prompts, 64), generator=torch.Generator().manual_seed(1))
        a = stepped_logits(ref, prompts)
        fresh = lambda: random_decoder(PRESETS[preset])  # noqa: E731  (the same draws every time)
        variants = {"bf16 (no quantization)": lambda: fresh().to(torch.bfloat16),
                    "int8": lambda: quantize_decoder(fresh()),
                    "int8 + lm_head": lambda: quantize_decoder(fresh(), lm_head=True)}
        for group, symmetric, lm_head in INT4_VARIANTS:
            label = f"int4 g{group}{' sym' if symmetric else ''}{' + lm_head' if lm_head else ''}"
            variants[label] = lambda g=group, s=symmetric, h=lm_head: quantize_decoder(
                fresh(), "int4", lm_head=h, group_size=g, symmetric=s)
            variants[f"  RTN {label[5:]}"] = lambda g=group, s=symmetric, h=lm_head: round_to_nearest(fresh(), g, s, h)
        yardstick = {}
        for name, make in variants.items():
            r = dict(preset=preset, variant=name, **compare(ref, make(), prompts, args.new, a))
            if name.startswith("int4"):
                yardstick[name[5:]] = r
            elif name.startswith("  RTN"):
                ours = yardstick[name[6:]]
                ours["rel_err_vs_yardstick"] = ours["rel_err"] / r["rel_err"]
                _print(rows[-1])  # (ours, now with its ratio)
            rows.append(r)
            if not name.startswith("int4"):
                _print(r)
    if args.json:
        args.json.write_text(json.dumps(dict(prompts=args.prompts, new=args.new, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
