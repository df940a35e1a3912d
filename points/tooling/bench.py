"""`points bench`: this implementation side by side with transformers on the same weights, in one process.

    points bench --preset small                   # CPU: Qwen2.5-0.5B-shaped decoder + the real vision encoder
    points bench --preset 7b --device cuda --dtype bfloat16
    points bench --preset gui-8b --device cuda --dtype bfloat16   # POINTS-GUI-G's shapes (Qwen3-8B decoder)
    points bench --preset tiny --repeat 1 --quick # a quick look that every row runs (figures mean little)

--preset: any named size of the family (points.model.family): POINTS-1.5's tiny / small / 7b and each
member's <member>-tiny and released size (reader-3b, gui-8b, versavit-8b). A random-weight checkpoint of
those shapes is written in the member's released layout (points.tooling.synthetic), loaded with
`points.load`; the transformers reference (points.tooling.reference: the member's decoder class, the Qwen2-VL
vision tower and PatchMerger) is built on the very same tensors (no copy): Qwen2ForCausalLM for POINTS-1.5,
Qwen2ForCausalLM with tie_word_embeddings for POINTS-Reader, Qwen3ForCausalLM (q/k norms, head_dim given
apart) for POINTS-GUI-G and VersaViT; images are resized under the member's processor rules.

Each row runs one warm-up and then --repeat timed runs of both, reporting min and median, the ratio
(transformers' time / ours, > 1 = we are faster), the row's physical floor on this machine and the fraction of
it we reach. Floors: decode = the bytes one step must read (weights but the embedding table, a tied head
counted once as the head, plus the visible KV cache) over the measured copy bandwidth; prefill and vision =
their matmul FLOPs (vision: encoder and projector) over the measured matmul rate; load = the checkpoint's
weight bytes (a tied head once) over the copy bandwidth. Load time and peak resident memory are measured in
fresh processes, for the released layout and for the same weights converted into ours (`points convert`),
--repeat runs each (the first one reads the files from disk). Each JSON row names what it measured (`kind`:
vision / prefill / decode / load, with its images and patches, tokens, batch and prompt lengths, compiled,
layout). `--json` writes every figure with the machine's description; `--profile` prints the decode step's top
ops. A benchmark, not a test: compare within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from points.io.atomic import write_text_atomically
from points.io.outputs import check_output, check_output_dir
from points.io.quantized import describe_asked
from points.model.family import size_names
from points.tooling.options import add_weight_options, check_weight_options, exit_code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="points bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=size_names(), default="small", metavar="SIZE",
                   help="a named size of the family (default small): " + ", ".join(size_names()))
    add_weight_options(p, device="auto", dtype="float32", device_help="auto: cuda when this machine has it, else cpu ")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per row after one warm-up (default 5)")
    p.add_argument("--rows", nargs="+", choices=["vision", "prefill", "decode", "load"],
                   default=["vision", "prefill", "decode", "load"])
    p.add_argument("--compile", action="store_true", help="also time the compiled decode step (every batch row)")
    p.add_argument("--compile-backend", choices=["inductor", "aot_eager", "eager"], default="inductor",
                   help="torch.compile's backend for --compile (default inductor; eager / aot_eager trace the step "
                        "as dynamo does without generating kernels, for a quick check that it compiles)")
    p.add_argument("--attn", choices=["auto", "sdpa", "triton"], default="auto",
                   help="our vision and prefill attention (points.runtime.attention; default auto)")
    p.add_argument("--transposed", action="store_true",
                   help="also time decoding with the opt-in CPU layout of points.runtime.layout (float32, CPU)")
    p.add_argument("--profile", action="store_true", help="print the decode step's top ops")
    p.add_argument("--quick", action="store_true",
                   help="every row at a fraction of its work (small images and prompts, 8 decode steps): to see that "
                        "each row runs; the figures mean little")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the random checkpoints are kept between runs (default: a temporary directory)")
    p.add_argument("--prefill", type=int, nargs="+", metavar="TOKENS", default=None,
                   help="the prefill rows' prompt lengths (default 512 2048; --quick 64 128)")
    p.add_argument("--decode-prompt", type=int, metavar="TOKENS", default=None,
                   help="the decode rows' prompt: batch 1's length, batch 4's the longest of four at 1, 0.78, 0.59 "
                        "and 0.39 of it (default 512; --quick 64)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.prefill is not None and min(args.prefill) < 1:
        p.error(f"--prefill {min(args.prefill)}: expected prompt lengths >= 1")
    if args.decode_prompt is not None and args.decode_prompt < 4:
        p.error(f"--decode-prompt {args.decode_prompt}: expected a prompt length >= 4")
    check_weight_options(p, args)
    if args.transposed and args.quantize:
        p.error("--transposed and --quantize are two different weight layouts; pick one")
    return exit_code(lambda: _bench(args))


def _bench(args) -> int:
    import torch

    from points.pipeline import resolve_device
    import dataclasses

    from points.tooling.benchmark import QUICK, SIZES, run

    if args.json is not None:
        check_output(args.json, flag="--json")  # before the measuring, not after it
    if args.workdir is not None:
        check_output_dir(args.workdir, flag="--workdir")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(auto if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    if args.transposed and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError("--transposed: the transposed layout is for float32 on the CPU")
    options = dict(compile_step=args.compile, profile=args.profile, transposed=args.transposed, attn=args.attn,
                   quantize=describe_asked(args.quantize, args.quantize_lm_head, args.group_size, args.symmetric),
                   compile_backend=args.compile_backend,
                   sizes=QUICK if args.quick else SIZES)
    if args.prefill is not None:
        options["sizes"] = dataclasses.replace(options["sizes"], prefill=tuple(args.prefill))
    if args.decode_prompt is not None:
        n = args.decode_prompt
        options["sizes"] = dataclasses.replace(options["sizes"], decode_prompt=n,
                                               ragged=(n, round(n * 400 / 512), round(n * 300 / 512), round(n * 200 / 512)))
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="points-bench-") as tmp:
            result = run(args.preset, device, dtype, args.repeat, Path(tmp), set(args.rows), **options)
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args.preset, device, dtype, args.repeat, args.workdir, set(args.rows), **options)
    if args.json:
        write_text_atomically(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
