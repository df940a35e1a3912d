#!/usr/bin/env python3
"""Full fine-tuning's memory per process: one process, two under DDP, two under FSDP2 (`points finetune --full`
under torchrun, gloo on the CPU), the same checkpoint, data and steps.

    python tools/bench_shard.py                    # a Qwen2.5-0.5B-shaped decoder cut to 4 layers, float32
    python tools/bench_shard.py --layers 2 --steps 1 --workdir /tmp/s     # a quick look

Each run is a process of its own whose RUSAGE_CHILDREN maximum resident set is the peak of its largest
descendant: the largest worker's peak. Next to it, the training state each worker holds by arithmetic: the
trainable weights, their gradients and AdamW's two moments (4 x 4 bytes a parameter), whole under DDP, 1/N
of it under FSDP2 (plus the block being gathered). The vision encoder is the tiny preset's and frozen, so
that the decoder's state is what is measured. The three runs take the same global batch, so their losses
must agree (exit 1 if not).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from points.tooling.measure import machine
from points.tooling.synthetic import SHAPES, write_checkpoint

TEXTS = ["The sky is blue because air scatters short wavelengths more than long ones.",
         "A haiku has three lines of five, seven and five syllables.",
         "Two plus two is four, and four times four is sixteen.",
         "Paris is the capital of France; Rome is the capital of Italy."]

PEAK = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stdout.write(done.stderr[-3000:] if done.returncode else "")
print("PEAK", done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def data(path: Path, n: int) -> Path:
    lines = [json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": f"Say something about topic {i}."},
        {"role": "assistant", "content": " ".join(TEXTS[j % len(TEXTS)] for j in range(i, i + 3))}]})
        for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cmd: list[str], env: dict) -> int:
    done = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, env=env)
    last = done.stdout.strip().splitlines()[-1].split()
    if last[0] != "PEAK" or last[1] != "0":
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return int(last[2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=Path("bench-shard"))
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    llm = dict(SHAPES["small"][0], num_layers=args.layers, num_hidden_layers=args.layers)
    vision = dict(SHAPES["tiny"][1], hidden_size=llm["hidden_size"])
    ckpt = args.workdir / f"points-small-{args.layers}-layers-float32"
    if not ckpt.exists():
        args.workdir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(ckpt, (llm, vision), dtype=torch.float32)
    train = data(args.workdir / "train.jsonl", 8 * args.steps)
    common = ["finetune", "--model", str(ckpt), "--data", str(train), "--full", "--freeze", "vision",
              "--batch-tokens", str(args.batch_tokens), "--max-steps", str(args.steps), "--lr", "1e-5",
              "--save-every", "1000", "--progress", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    info = machine(torch.device("cpu"))
    print(f"# {info['cpu']} ({info['cpu_flags']}), torch {info['torch']}; decoder {args.layers} x "
          f"{llm['hidden_size']}, vocabulary {llm['vocab_size']}, float32, one thread per process")
    rows = []
    for name, launcher, extra in (
            ("1 process", [sys.executable, "-m", "points"], ["--grad-accum", "2"]),
            ("2 processes, DDP", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                  "points"], ["--grad-accum", "1", "--parallel", "ddp"]),
            ("2 processes, FSDP2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                    "points"], ["--grad-accum", "1", "--parallel", "fsdp"])):
        out = args.workdir / name.replace(" ", "-").replace(",", "")
        subprocess.run(["rm", "-rf", str(out)], check=True)
        peak = run([*launcher, *common, *extra, "--output", str(out)], env)
        losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        rows.append({"run": name, "peak_rss_bytes": peak, "losses": losses})
        print(f"{name:22s} largest process's peak {peak / 1e9:6.2f} GB   losses {[f'{x:.6f}' for x in losses]}")
    from points.io.tensors import TensorFiles

    first = rows[0]["losses"]
    agree = all(len(r["losses"]) == len(first) and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(r["losses"], first))
                for r in rows)
    print(f"the three runs' losses agree to 1e-6 relative: {'yes' if agree else 'NO'}")
    files = TensorFiles(ckpt)
    n_params = sum(files.get(n).numel() for n in files.names if not n.startswith("vision_encoder."))
    state = 16 * n_params
    print(f"trainable parameters {n_params / 1e6:.0f} M: weights + gradients + AdamW's moments {state / 1e9:.2f} GB "
          f"whole (DDP), {state / 2e9:.2f} GB a process sharded over 2 (FSDP2)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                       "trainable_params": n_params, "state_bytes": state, "losses_agree": agree}, f, indent=1)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
