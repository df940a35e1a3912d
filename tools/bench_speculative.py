#!/usr/bin/env python3
"""Speculative decoding's mechanism at batch 1: tokens/s with drafts that are always right, right half the
time, never right, for k = 2, 4, 8, against plain decoding of the same prompt, in one sitting.

    python tools/bench_speculative.py                      # small preset, float32, 64 tokens after ~120
    python tools/bench_speculative.py --preset tiny

Random weights make no text a drafter could predict, so the drafters here are oracles: each knows the greedy
continuation (from a plain run first) and proposes it (right), or each draft token wrong with probability 1/2
(half), or every draft token wrong (never). Greedy output is the same tokens in every case (checked here
too). Plain decoding is timed at the start and the end of the sitting (the better one is the reference).
Then the n-gram drafter (`--speculative ngram`) on a prompt that asks to repeat a paragraph: its drafts and
acceptance on the random model. Floor: the decoder's bytes read per forward over the copy bandwidth.
A benchmark, not a test: compare within one run.
"""

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

import points
from points.io.checkpoint import DTYPES
from points.tooling.measure import copy_bandwidth, decode_bytes, machine
from points.tooling.synthetic import SHAPES, checkpoint_in

PARAGRAPH = ("The river runs past the old mill and under the stone bridge, where the children of the village "
             "gather every morning to watch the boats go by on their way to the sea.")


class Oracle:
    """Proposes the known continuation; each draft token wrong with probability `wrong`."""

    def __init__(self, truth: list[int], wrong: float, k: int, vocab: int):
        self.truth, self.wrong, self.k, self.vocab = truth, wrong, k, vocab
        self.rng = random.Random(0)

    def start(self, prompt_ids):
        return self

    def propose(self, generated, k):
        out = self.truth[len(generated):len(generated) + k]
        return [(t + 1) % self.vocab if self.rng.random() < self.wrong else t for t in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="small")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--new", type=int, default=64, help="tokens generated (default: %(default)s)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="points-spec-"))
    ckpt = checkpoint_in(work, args.preset, dtype)
    pipe = points.load(ckpt, dtype=dtype, prefix_cache=False, max_batch=1, vision_cache_mb=0)
    vocab = pipe.model.decoder.cfg.vocab_size
    conv = [{"role": "user", "content": "Describe a walk along a river in the morning, in some detail. " * 4}]
    info = machine(torch.device("cpu"))
    floor = decode_bytes(pipe.model.decoder, 200, 1) / copy_bandwidth(torch.device("cpu"))
    print(f"bench_speculative: preset {args.preset}, {args.dtype}, {info['cpu']} ({info['threads']} threads, "
          f"{info['cpu_flags']}), torch {torch.__version__}; {args.new} tokens at batch 1; one forward's floor "
          f"{floor * 1e3:.1f} ms ({1 / floor:.1f} tok/s)", flush=True)
    pipe.chat(conv, max_new_tokens=4)  # warm-up

    def run(speculative) -> tuple[float, list[int], object]:
        r = pipe.submit(conv, max_new_tokens=args.new, speculative=speculative)
        r.text()
        n = r.completion_tokens - 1  # tokens after the first (which comes with the prefill)
        return n / (r.finished_at - r.first_token_at), r.token_ids, r

    plain0, truth, _ = run("off")
    rows = []
    for name, wrong in (("right", 0.0), ("half", 0.5), ("never", 1.0)):
        for k in args.ks:
            rate, ids, r = run(Oracle(truth, wrong, k, vocab))
            assert ids == truth, f"{name} k={k}: the tokens differ from plain decoding"
            rows.append({"drafts": name, "k": k, "tok_s": rate, "drafted": r.drafted_tokens,
                         "accepted": r.accepted_tokens})
    plain1, again, _ = run("off")
    assert again == truth
    plain = max(plain0, plain1)
    print(f"plain decoding: {plain0:.2f}, {plain1:.2f} tok/s (first, last of the sitting); {plain * floor:.0%} of "
          f"the floor")
    print(f"{'drafts':>7} {'k':>3} {'tok/s':>7} {'x plain':>8} {'accepted':>13}")
    for r in rows:
        print(f"{r['drafts']:>7} {r['k']:3d} {r['tok_s']:7.2f} {r['tok_s'] / plain:7.2f}x "
              f"{r['accepted']:5d}/{r['drafted']:<5d}")
    copy = [{"role": "user", "content": f"Repeat this paragraph word for word: {PARAGRAPH}"}]
    r = pipe.submit(copy, max_new_tokens=args.new, speculative="ngram")
    r.text()
    ngram = {"drafted": r.drafted_tokens, "accepted": r.accepted_tokens, "tokens": r.completion_tokens}
    print(f"n-gram drafter on 'repeat this paragraph' ({r.completion_tokens} tokens): {r.accepted_tokens} of "
          f"{r.drafted_tokens} drafts accepted")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "preset": args.preset, "dtype": args.dtype,
                                         "plain_tok_s": [plain0, plain1], "floor_s": floor, "rows": rows,
                                         "ngram_copy": ngram}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
