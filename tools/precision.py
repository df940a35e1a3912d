#!/usr/bin/env python3
"""Measure the decoder's bf16 / fp16 logit gap against the fp32 transformers reference, on the same weights.

    python tools/precision.py --preset tiny --device cpu
    python tools/precision.py --preset 7b-width --device cuda      # real widths, 2 layers (a GPU run)
    python tools/precision.py --preset reader-width                # POINTS-Reader's widths (tied), 2 layers
    python tools/precision.py --preset gui-width                   # POINTS-GUI-G's (Qwen3), 2 layers

The reference (the member's own class: `Qwen2ForCausalLM`, tied for Reader, or `Qwen3ForCausalLM`; random
weights re-drawn as in the tests) is written to disk in the member's released layout (CustomLlama's for
POINTS-1.5) and loaded back through `points.load_decoder`, exactly as in the parity suites.
Prints one table row per dtype: max |error|, error relative to max |logit|, transformers' own gap in the
same dtype, argmax agreement. `--json PATH` also writes the rows.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import points
from points.model import family
from points.tooling import reference

PRESETS = {
    "tiny": (reference.TINY_LLM, 64),
    # the released widths (hidden 3584, ffn 18944, 28 query / 4 KV heads, vocab 152064), 2 layers
    "7b-width": (dict(reference.REAL_LLM, num_layers=2, num_hidden_layers=2), 512),
    # POINTS-Reader's Qwen2.5-3B widths (hidden 2048, ffn 11008, 16 / 2 heads, tied, vocab 151936), 2 layers
    "reader-width": (dict(family.QWEN25_3B, num_hidden_layers=2), 256),
    # POINTS-GUI-G's Qwen3-8B widths (hidden 4096, head_dim 128, q/k norms, vocab 151936), 2 layers
    "gui-width": (dict(family.QWEN3_8B, num_hidden_layers=2), 256),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, help="sequence length (batch 1); default by preset")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    llm, length = PRESETS[args.preset]
    length = args.tokens or length
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    naming = llm.get("model_type", "custom_llama")
    with torch.device(dev):
        ref = reference.reference_qwen3_decoder(llm) if naming == "qwen3" else reference.reference_decoder(llm)
    vision = dict(reference.TINY_VISION, hidden_size=llm["hidden_size"])
    decoder_tensors = (reference.custom_llama_tensors(ref) if naming == "custom_llama" else
                       {f"llm.{k}": v for k, v in ref.state_dict().items()})  # (Qwen names as transformers has them)
    tensors = decoder_tensors | reference.vision_tensors(*reference.reference_vision(vision))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = reference.save_checkpoint(Path(tmp) / "ckpt", reference.checkpoint_config(llm, vision),
                                          {k: v.cpu() for k, v in tensors.items()})
        del tensors
        tokens = torch.randint(0, llm["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0)).to(dev)
        rows = []
        with torch.no_grad():
            expected = ref(tokens).logits.float()
            scale = expected.abs().max().item()
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                model = points.load_decoder(ckpt, dtype=dtype, device=dev)
                got = model(tokens)
                del model
                theirs = None
                if dtype != torch.float32:
                    ref_low = copy.deepcopy(ref).to(dtype)
                    theirs = (ref_low(tokens).logits.float() - expected).abs().max().item()
                    del ref_low
                err = (got - expected).abs().max().item()
                agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
                rows.append(dict(dtype=str(dtype).removeprefix("torch."), max_abs=err, rel=err / scale,
                                 transformers_own=theirs, argmax_agree=agree, max_abs_logit=scale))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\ndecoder logit gap vs fp32 transformers, preset {args.preset}, {length} tokens, {name}, "
          f"torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    print(f"{'dtype':9} {'max abs err':>12} {'rel':>9} {'transformers own':>17} {'argmax agree':>13}")
    for r in rows:
        own = "-" if r["transformers_own"] is None else f"{r['transformers_own']:.3g}"
        print(f"{r['dtype']:9} {r['max_abs']:12.3g} {r['rel']:9.2e} {own:>17} {r['argmax_agree']:13.4f}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "device": name, "tokens": length, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
