"""`points bench`: this implementation side by side with transformers on the same weights, in one process.

    points bench --preset small                   # CPU: Qwen2.5-0.5B-shaped decoder + the real vision encoder
    points bench --preset 7b --device cuda --dtype bfloat16
    points bench --preset tiny --repeat 1 --quick # a quick look that every row runs (figures mean little)

A random-weight checkpoint of the preset's shapes is written in the released layout
(points.tooling.synthetic), loaded with `points.load`; the transformers reference (Qwen2ForCausalLM, the
Qwen2-VL vision tower and PatchMerger; points.tooling.reference) is built on the very same tensors (no
copy). Each row runs one warm-up and then --repeat timed runs of both, reporting min and median, the ratio (transformers' time / ours, > 1 = we are faster),
the row's physical floor on this machine and the fraction of it we reach. Floors: decode = the bytes one
step must read (weights but the embedding table, plus the visible KV cache) over the measured copy
bandwidth; prefill and vision = their matmul FLOPs over the measured matmul rate; load = the weights'
bytes over the copy bandwidth. Load time and peak resident memory are measured in fresh processes, for
the released layout and for the same weights converted into ours (`points convert`), --repeat runs each
(the first one reads the files from disk). Each JSON row names what it measured (`kind`: vision / prefill /
decode / load, with its images and patches, tokens, batch and prompt lengths, compiled, layout).
`--json` writes every figure with the machine's description; `--profile` prints the decode step's top ops.
A benchmark, not a test: compare within one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from points.io.atomic import write_text_atomically
from points.io.outputs import check_output, check_output_dir
from points.tooling.options import add_weight_options, check_weight_options, exit_code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="points bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "small", "7b"], default="small")
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
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    check_weight_options(p, args)
    if args.transposed and args.quantize:
        p.error("--transposed and --quantize are two different weight layouts; pick one")
    return exit_code(lambda: _bench(args))


def _bench(args) -> int:
    import torch

    from points.pipeline import resolve_device
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
                   quantize=args.quantize, quantize_lm_head=args.quantize_lm_head, compile_backend=args.compile_backend,
                   sizes=QUICK if args.quick else SIZES)
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
