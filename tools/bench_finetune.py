#!/usr/bin/env python3
"""LoRA training: this project's packed rows against transformers + peft's padded batches, same weights, same
initial adapters, same data, one sitting. Needs peft (in the test extra: `pip install -e ".[test]"`).

    python tools/bench_finetune.py                         # small preset (Qwen2.5-0.5B-shaped decoder), fp32
    python tools/bench_finetune.py --preset tiny --examples 8 --steps 2     # a quick look

1. Losses: five AdamW steps on one batch of --batch examples, unpacked (ours one row per example, theirs one
   right-padded batch with labels -100 off the targets), from the same initial adapters (ours copied into
   peft's), float32: the largest relative difference of the five losses.
2. Speed: one epoch over --examples examples of mixed lengths (--min-len..--max-len tokens, the second half of
   each a target): ours packed into rows of --batch-tokens, theirs in batches as a padding collator makes
   them (--hf-batch examples padded to the longest), each step one optimizer step; real tokens per second.
3. Peak memory of one training step on a --batch-tokens row, with and without gradient checkpointing (ours),
   each in a fresh process (VmHWM growth).
Data are random token ids (the model's weights are random too): what is measured is the work, not the text.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from points.runtime.lora import LoraConfig, add_lora, lora_layers
from points.runtime.training import Example, pack, row_loss
from points.tooling.measure import machine
from points.tooling.reference import padded_batch, peft_lora, transformers_decoder
from points.tooling.synthetic import SHAPES, random_decoder

TARGETS = ("q", "k", "v", "out", "up", "gate", "down")


def examples(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        targets = torch.zeros(length, dtype=torch.bool)
        targets[length // 2:] = True
        out.append(Example(f"e{i}", ids, targets, None, None))
    return out


def theirs_loss(model, batch: list[Example]) -> torch.Tensor:
    ids, mask, labels = padded_batch(batch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def ours_loss(decoder, batch: list[Example]) -> torch.Tensor:
    rows = [pack([e], 1 << 30)[0] for e in batch]
    total = sum(r.n_targets for r in rows)
    return sum(row_loss(decoder, r)[0] for r in rows) / total


def five_losses(step_fn, params, lr: float, steps: int = 5) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr)
    out = []
    for _ in range(steps):
        loss = step_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


PEAK = """
import json, sys, torch
from points.runtime.lora import LoraConfig, add_lora
from points.runtime.training import Example, pack, row_loss, checkpoint_blocks
from points.tooling.synthetic import random_decoder
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
decoder = random_decoder({preset!r}, dtype=torch.float32)
add_lora(decoder, LoraConfig(rank={rank}), seed=0)
if {checkpointing}:
    checkpoint_blocks(decoder)
n = {tokens}
ids = torch.randint(0, decoder.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
t = torch.zeros(n, dtype=torch.bool); t[n // 2:] = True
row = pack([Example('x', ids, t, None, None)], n)[0]
before = hwm()
loss, k = row_loss(decoder.train(), row)
(loss / k).backward()
print(json.dumps({{"peak_growth_bytes": hwm() - before}}))
"""


def peak(preset: str, rank: int, tokens: int, checkpointing: bool) -> int:
    code = PEAK.format(preset=preset, rank=rank, tokens=tokens, checkpointing=checkpointing)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--examples", type=int, default=24)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--hf-batch", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="examples in the loss comparison's batch")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps in the loss comparison")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    decoder = random_decoder(args.preset, dtype=torch.float32).train()
    llm = transformers_decoder(decoder).train()  # (on the plain layers' tensors, before our swap)
    add_lora(decoder, LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS), seed=0)
    with torch.no_grad():  # non-zero B (as after some training), the same in both
        g = torch.Generator().manual_seed(1)
        for layer in lora_layers(decoder).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.01)
    theirs = peft_lora(llm, decoder, args.rank, 2.0 * args.rank)[0].train()
    data = examples(args.examples, args.min_len, args.max_len, decoder.cfg.vocab_size, seed=2)
    info = machine(torch.device("cpu"))
    print(f"# {info['cpu']} ({info['cpu_flags']}), {info['threads']} threads, torch {info['torch']}; {args.preset}, "
          f"float32, LoRA rank {args.rank} on {','.join(TARGETS)}")

    # 1. the first losses from the same adapters, one batch, unpacked
    batch = data[:args.batch]
    ours_params = [p for p in decoder.parameters() if p.requires_grad]
    theirs_params = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in theirs_params)
    mine = five_losses(lambda: ours_loss(decoder, batch), ours_params, args.lr, args.steps)
    ref = five_losses(lambda: theirs_loss(theirs, batch), theirs_params, args.lr, args.steps)
    rel = max(abs(a - b) / abs(b) for a, b in zip(mine, ref))
    print(f"losses, {args.steps} steps on {args.batch} examples: ours {[f'{x:.6f}' for x in mine]}")
    print(f"                                 theirs {[f'{x:.6f}' for x in ref]}  largest relative difference {rel:.2e}")

    # 2. an epoch each: our packed rows against their padded batches
    def epoch(step_fn, groups, params):
        opt = torch.optim.AdamW(params, lr=args.lr)
        t0 = time.perf_counter()
        for group in groups:
            step_fn(group).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    real = sum(len(e.ids) for e in data)
    rows = pack(data, args.batch_tokens)
    t_ours = epoch(lambda row: row_loss(decoder, row)[0] / row.n_targets, rows, ours_params)
    hf_groups = [data[i:i + args.hf_batch] for i in range(0, len(data), args.hf_batch)]
    padded_tokens = sum(max(len(e.ids) for e in g) * len(g) for g in hf_groups)
    t_theirs = epoch(lambda g: theirs_loss(theirs, g), hf_groups, theirs_params)
    print(f"one epoch, {len(data)} examples, {real} real tokens: ours {len(rows)} packed rows ({real / (len(rows) * args.batch_tokens):.0%} "
          f"filled) {t_ours:.1f} s = {real / t_ours:.0f} tok/s; theirs {len(hf_groups)} padded batches of {args.hf_batch} "
          f"({padded_tokens} tokens with padding) {t_theirs:.1f} s = {real / t_theirs:.0f} tok/s; ratio {t_theirs / t_ours:.2f}x")

    # 3. peak memory of one step at batch_tokens, with and without gradient checkpointing
    plain = peak(args.preset, args.rank, args.batch_tokens, False)
    ckpt = peak(args.preset, args.rank, args.batch_tokens, True)
    print(f"peak memory growth of one step on {args.batch_tokens} tokens: {plain / 1e9:.2f} GB, with gradient "
          f"checkpointing {ckpt / 1e9:.2f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "losses": {"ours": mine, "theirs": ref, "max_rel": rel},
                       "epoch": {"ours_s": t_ours, "theirs_s": t_theirs, "real_tokens": real, "rows": len(rows),
                                 "padded_tokens": padded_tokens},
                       "peak_growth_bytes": {"plain": plain, "checkpointing": ckpt}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
