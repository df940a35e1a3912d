"""`points finetune`: LoRA (default) or full fine-tuning on conversations; packed, resumable, torchrun-aware.

    points finetune --model DIR --data TRAIN.jsonl --output OUT                      # LoRA rank 8, q k v out up gate down
    points finetune --model DIR --data TRAIN.jsonl --output OUT --quantize int4        # QLoRA: the base in int4
    points finetune --model DIR --data TRAIN.jsonl --output OUT --full --freeze vision,projector
    torchrun --nproc-per-node 2 -m points finetune ...                               # data parallel (gloo / nccl)

Data: one JSON object per line, {"id": ..., "messages": [...]} as for `points run`, whose assistant turns are
the targets: the loss is on each assistant turn's tokens and its closing <|im_end|>; the prompt, system text
and image positions are masked. Every line is checked and encoded before training starts (a bad one is named
with its line). Conversations are packed into rows of at most --batch-tokens tokens with no attention across
them (points.runtime.training); a step is --grad-accum rows per process, its loss the mean over all of the
step's target tokens (so one process with --grad-accum 2 and two with 1 take the same steps). AdamW, linear
warm-up and cosine decay; float32 or bf16 autocast (trainable weights always float32: the master copy).

Under torchrun each process takes its share of a step's rows. LoRA runs under DistributedDataParallel (every
process holds the model; the adapters' gradients are summed in buckets while the backward runs); --full
defaults to FSDP2 (`fully_shard` on each decoder block, the embeddings, lm_head and the rest: each process
keeps 1/N of the weights, their gradients and AdamW's state, gathering a unit's weights for its forward and
backward; a tied head, POINTS-Reader's, is its embedding's Parameter, so the two modules are one unit), or DDP
with --parallel ddp. Either way the gradients are summed, not averaged, so a step's loss is the same mean over all
of its target tokens as on one process.

With --quantize (int8 or int4, `--group-size`, `--symmetric`, `--quantize-lm-head` as for every command) the
decoder's projections are quantized as they are read and stay frozen in their codes while the float adapters
train (QLoRA); a checkpoint converted with `points convert --quantize` trains the same way without the flag.
An adapter from a quantized base loads onto the float DIR as well (points.runtime.lora.load_adapter).

OUT holds, at the end, the adapter (adapter.safetensors + adapter.json: `points.load(DIR, adapter=OUT)`,
`points merge DIR OUT MERGED`) or, with --full, a whole checkpoint in the model's layout (`points.load(OUT)`;
a tied decoder trains and writes one matrix for its embedding and head, as the official model does),
and log.jsonl: one line per optimizer step {"step", "loss", "tokens", "lr"}. Every --save-every steps a
checkpoint (the trainable weights, AdamW's state, the RNG states, the step) is written atomically
(OUT/checkpoint-STEP, then OUT/latest names it); the same command after an interruption (even kill -9)
resumes from it and takes exactly the steps an uninterrupted run takes. Exit codes: 0 done, 2 bad arguments or
data, 1 a file that cannot be written.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from points.tooling.options import add_progress_option, add_quantize_options, check_weight_options, exit_code

PARTS = ("vision", "projector", "decoder")


# what --lora-targets takes (points.runtime.lora.TARGETS; said here so that --help needs no torch)
TARGETS_HELP = ("comma-separated, of q,k,v,out,up,gate,down (the decoder's projections), vision, projector "
                "(default: the decoder's seven)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (released layout or ours)")
    p.add_argument("--data", required=True, type=Path, help="JSONL: {\"id\", \"messages\"} per line")
    p.add_argument("--output", required=True, type=Path, help="the run's directory (resumed when it holds one)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 8)")
    kind.add_argument("--full", action="store_true", help="train every weight not frozen (no adapter)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="default: %(default)s")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="default: %(default)s")
    p.add_argument("--lora-targets", default=None, help=TARGETS_HELP)
    p.add_argument("--freeze", default="", help=f"with --full: parts kept as they are, of {','.join(PARTS)}")
    p.add_argument("--epochs", type=int, default=1, help="default: %(default)s")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 LoRA, 1e-5 full)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's (default: %(default)s)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per packed row (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="rows per process per step (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--seed", type=int, default=0, help="data order and adapter init (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (default: %(default)s)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="under torchrun: DDP (every process holds the model; the default with LoRA) or FSDP2 "
                        "(weights, gradients and optimizer state sharded; --full only, its default)")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype: bfloat16 runs under autocast, trainable weights stay float32 (default: "
                        "%(default)s)")
    add_quantize_options(p)  # (QLoRA from the float checkpoint: its projections quantized as read)
    add_progress_option(p)
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    from points.runtime.lora import DECODER_TARGETS, TARGETS

    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-tokens", args.batch_tokens, 16),
                               ("--grad-accum", args.grad_accum, 1), ("--save-every", args.save_every, 1),
                               ("--warmup", args.warmup, 0)):
        if value < least:
            p.error(f"{flag} {value}: expected an integer >= {least}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps {args.max_steps}: expected an integer >= 1")
    if args.lora_rank is not None and args.lora_rank < 1:
        p.error(f"--lora-rank {args.lora_rank}: expected an integer >= 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr}: expected a finite number > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay {args.weight_decay}: expected a finite number >= 0")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        p.error(f"--lora-alpha {args.lora_alpha}: expected a finite number > 0")
    if not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-dropout {args.lora_dropout}: expected a number in [0, 1)")
    if args.lora_targets is None:
        args.lora_targets = ",".join(DECODER_TARGETS)
    targets = [t for t in args.lora_targets.split(",") if t]
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        p.error(f"--lora-targets {args.lora_targets!r}: expected comma-separated names of {','.join(TARGETS)}")
    args.lora_targets = tuple(targets)
    freeze = [f for f in args.freeze.split(",") if f]
    if any(f not in PARTS for f in freeze):
        p.error(f"--freeze {args.freeze!r}: expected comma-separated parts of {','.join(PARTS)}")
    if freeze and not args.full:
        p.error("--freeze goes with --full (LoRA trains only its adapters: choose them with --lora-targets)")
    if args.full and len(set(freeze)) == len(PARTS):
        p.error(f"--freeze {args.freeze}: every part frozen leaves nothing to train")
    args.freeze = tuple(freeze)
    check_weight_options(p, args)
    if args.quantize and args.full:
        p.error("--quantize goes with LoRA (the codes stay frozen: QLoRA); --full trains the float weights")
    if args.parallel == "fsdp" and not args.full:
        p.error("--parallel fsdp goes with --full (LoRA's adapters are small: DDP, the default, replicates them)")
    if args.parallel is None:
        args.parallel = "fsdp" if args.full else "ddp"
    if args.lr is None:
        args.lr = 1e-5 if args.full else 2e-4


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check(p, args)
    return exit_code(lambda: _finetune(args))


def _finetune(args) -> int:
    from points.io.outputs import check_output_dir
    from points.tooling.jobs import Dist
    from points.tooling.trainer import train

    check_output_dir(args.output, sources={"--model": args.model})
    dist = Dist(args.device)
    try:
        return train(args, dist)
    finally:
        dist.close()
