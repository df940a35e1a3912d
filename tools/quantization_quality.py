#!/usr/bin/env python3
"""How far weight-only int8 moves the decoder: logit error against the float32 model on fixed prompts, and
greedy agreement, per scheme, with and without lm_head; the bf16 model's own gap beside it for scale.

    python tools/quantization_quality.py                       # tiny (the parity model's shapes) and small
    python tools/quantization_quality.py --presets small --prompts 16 --new 64

Random weights (`points.tooling.synthetic.random_decoder`: norm weights near 1, the rest N(0, 0.02)), so the logits are flatter than a
trained model's and the greedy figures are a pessimistic proxy: a near-tie flips under any perturbation.
Metrics, over `--prompts` random prompts of 64 tokens (teacher-forced): the largest absolute logit error and
the largest logit, the relative error ||a - b|| / ||a||, and how often the top-1 token agrees; then greedy
decoding of `--new` tokens from each prompt: the share of prompts whose whole continuation is identical and
the mean share of tokens before the first difference.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from points.model.decoder import Decoder
from points.runtime.engine import Engine
from points.runtime.quantize import quantize_decoder
from points.runtime.sampling import Picker
from points.tooling import reference
from points.tooling.synthetic import SHAPES, random_decoder
from points.tooling.measure import engine_generate

PRESETS = {"tiny": (reference.TINY_LLM, reference.TINY_VISION), "small": SHAPES["small"]}


def compare(ref: Decoder, other: Decoder, prompts: torch.Tensor, new: int) -> dict:
    with torch.inference_mode():
        a, b = ref(prompts), other(prompts)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "small"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = []
    print(f"{'preset':6} {'variant':22} {'max |err|':>10} {'max |logit|':>11} {'rel err':>9} {'top-1 agree':>11} "
          f"{'greedy same':>11} {'greedy prefix':>13}")
    for preset in args.presets:
        ref = random_decoder(PRESETS[preset])
        prompts = torch.randint(0, ref.cfg.vocab_size, (args.prompts, 64), generator=torch.Generator().manual_seed(1))
        fresh = lambda: random_decoder(PRESETS[preset])  # noqa: E731  (the same draws every time)
        variants = {"bf16 (no quantization)": lambda: fresh().to(torch.bfloat16),
                    "int8": lambda: quantize_decoder(fresh()),
                    "int8 + lm_head": lambda: quantize_decoder(fresh(), lm_head=True)}
        for name, make in variants.items():
            r = dict(preset=preset, variant=name, **compare(ref, make(), prompts, args.new))
            rows.append(r)
            print(f"{preset:6} {name:22} {r['max_abs_err']:10.4f} {r['max_abs_logit']:11.3f} {r['rel_err']:9.2e} "
                  f"{r['top1_agree']:11.4f} {r['greedy_identical']:11.3f} {r['greedy_prefix']:13.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(prompts=args.prompts, new=args.new, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
