"""`points score`: how likely a model finds each line's reply after its conversation, over a JSONL dataset.

    points score --model DIR --input IN.jsonl --output OUT.jsonl [--batch-size 8]
                 [--keep-fraction 0.2 --filtered KEPT.jsonl]
    torchrun --nproc-per-node 2 -m points score --model DIR --input IN.jsonl --output OUT.jsonl

Input: one JSON object per line, {"id": "<unique string>", "messages": [...], "reply": "..."} (messages as in
`Pipeline.chat`, image paths relative to the input file's folder; the reply a string, or a list of token
ids taken as they are). Every line is checked before any work starts.

Output: OUT holds one line per input id, in input order: {"id", "tokens", "logprob", "perplexity"} (the number
of scored tokens, their summed log-probability in float32, exp(-mean)), or {"id", "error"} for an item that
cannot be scored (an unreadable image, a reply over the context). Scored as `Pipeline.score` scores it: the
reply after the prompt `chat(messages)` builds, and the `<|im_end|>` closing the turn.

Filtering (the official WePOINTS pre-training filter's rule): with --keep-fraction F, KEPT (--filtered) gets
the input lines of the floor(F * N) lowest-perplexity items among the N that scored, verbatim, lowest first
(ties in input order); items with an error are never kept. KEPT is written atomically before OUT.

Journal, resuming, the lock, exit codes and torchrun: exactly as `points run --help` says (the same
machinery, points/tooling/jobs.py). Items run --batch-size at a time (8 on CUDA, 1 on the CPU by default),
similar lengths together, each batch one padded forward; a batch that fails (a bad item, memory) is scored
item by item, so one item's error is only its own record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from fractions import Fraction
from pathlib import Path

from points.io.atomic import write_text_atomically
from points.io.progress import Progress
from points.tooling.jobs import (Item, Job, Journal, RunError, add_dataset_options, drive, item_error, item_errors,
                                 read_items)
from points.tooling.options import (add_progress_option, add_weight_options, check_weight_options, exit_code,
                                    quantize_options, quantize_record)

RESULTS = ("tokens", "logprob", "perplexity")


def read(path: Path) -> list[Item]:
    items = read_items(path, fields=("reply",))
    for it in items:
        reply = it.fields.get("reply")
        if not (isinstance(reply, str) or (isinstance(reply, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in reply))):
            got = "none" if reply is None else type(reply).__name__
            raise RunError(f"{path}, line {it.line}: \"reply\" must be a string or a list of token ids, got {got}")
    return items


def run_key(args, items: list[Item]) -> dict:
    """What the records depend on: a journal written under another key is not mixed in."""
    digest = hashlib.sha256(json.dumps([[it.id, it.messages, it.fields["reply"]] for it in items],
                                       sort_keys=True).encode()).hexdigest()
    return {"command": "score", "model": str(Path(args.model).resolve()), "input_sha256": digest,
            "dtype": args.dtype, **quantize_record(args), "end": True}


def _record(it: Item, s) -> dict:
    """Its result line; a log-probability or perplexity that is not a finite number (a token of probability 0
    in float32, a mean below -709) is the item's error, so that OUT stays strict JSON and sortable."""
    if not (math.isfinite(s.logprob) and math.isfinite(s.perplexity)):
        return item_error(it, ValueError(f"the reply's log-probability is {s.logprob} (perplexity {s.perplexity}): "
                                         "not a finite number"))
    return {"id": it.id, "tokens": len(s.tokens), "logprob": s.logprob, "perplexity": s.perplexity}


def process(pipe, items: list[Item], batch_size: int, journal: Journal, progress: Progress | None) -> None:
    """Score `items` (this rank's share) batch by batch, each batch's records journaled when it is done."""
    order = sorted(items, key=lambda it: len(it.text))  # similar lengths in one batch: little padding
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        try:
            records = [_record(it, s) for it, s in zip(batch, pipe.score_batch(
                [(it.messages, it.fields["reply"]) for it in batch]))]
        except item_errors():  # one item's fault (or the batch's memory): each alone, its error its own record
            records = []
            for it in batch:
                try:
                    records.append(_record(it, pipe.score(it.messages, it.fields["reply"])))
                except item_errors() as e:
                    records.append(item_error(it, e))
        journal.append(records)
        if progress:
            progress.update(len(records), tokens=sum(r.get("tokens", 0) for r in records))


def kept(items: list[Item], records: list[dict], fraction: float) -> list[str]:
    """The input lines to keep: floor(fraction * N) of the N scored items, lowest perplexity first."""
    scored = sorted((r["perplexity"], it.index) for it, r in zip(items, records) if "perplexity" in r)
    n = math.floor(Fraction(repr(fraction)) * len(scored))  # exact: 0.29 * 100 keeps 29, not 28
    return [items[i].text for _, i in scored[:n]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_options(p, '{"id", "messages", "reply"}')
    p.add_argument("--batch-size", type=int, default=None,
                   help="items per padded forward (default: 8 on CUDA, 1 on the CPU, where the prefill is compute-bound "
                        "and a padded batch measured 0.93x the same items one at a time)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="with --filtered: the fraction (0 to 1) of scored items to keep, lowest perplexity first")
    p.add_argument("--filtered", type=Path, default=None, help="with --keep-fraction: JSONL of the kept input lines")
    add_weight_options(p, device_help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) ")
    add_progress_option(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 8 if args.device.startswith("cuda") else 1
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if (args.keep_fraction is None) != (args.filtered is None):
        p.error("--keep-fraction and --filtered go together (the fraction to keep, and the file it is written to)")
    if args.keep_fraction is not None and not 0 <= args.keep_fraction <= 1:
        p.error(f"--keep-fraction {args.keep_fraction}: expected a number from 0 to 1")
    check_weight_options(p, args)

    def load(dist):
        import points

        return points.load(args.model, device=dist.device, dtype=args.dtype,
                           **quantize_options(args))

    def work(pipe, share, journal, progress):
        process(pipe, share, args.batch_size, journal, progress)

    def before(items, records):
        if args.filtered is not None:
            lines = kept(items, records, args.keep_fraction)
            write_text_atomically(args.filtered, "".join(line + "\n" for line in lines))

    outputs = (("--filtered", args.filtered),) if args.filtered is not None else ()
    return exit_code(lambda: drive(Job("points score", args, lambda: read(args.input), lambda items: run_key(args, items),
                                       load, work, RESULTS, outputs, before)))
