"""`points run`: a model over a JSONL dataset, batched by length, resumable, across processes with torchrun.

    points run --model DIR --input IN.jsonl --output OUT.jsonl [--batch-size 8] [--max-new-tokens N] ...
    torchrun --nproc-per-node 2 -m points run --model DIR --input IN.jsonl --output OUT.jsonl

Input: one JSON object per line, {"id": "<unique string>", "messages": [...]} (messages as in
`Pipeline.chat`; an image item's "image" is a path, relative to the input file's folder or absolute). Blank
lines are skipped. Every line is checked before any work starts: a line that is not JSON, one without a string
"id" or a list "messages", or a duplicate id is an error naming the line.

Output: when the run ends OUT holds one line per input id, in input order: {"id": ..., "reply": "..."}, or
{"id": ..., "error": "..."} for an item that cannot run (an unreadable image, a prompt over the context); the
run goes on and exits 0. It exits non-zero only when the run itself fails: 2 for bad arguments or input
(named before any work: an OUT that is the input, a directory or in a folder that cannot be written, a
--model that is no checkpoint directory, a device this machine lacks, a setting out of range), 1 when a
file cannot be written (a full disk: the line names the file; the journals keep every finished item), 143
on SIGTERM and 130 on Ctrl-C (one line each; what finished is kept).

One run at a time per OUT: a run holds an exclusive lock (`fcntl.flock` on `OUT.lock`, which names its
holder); a second run on the same OUT says who holds it and exits 2 before any work.

Durability: each finished item is appended to a journal next to OUT (`OUT.journal.<rank>`; write, flush,
fsync), so `kill -9` at any moment loses at most the items in flight. The same command again reads every
journal (a last line cut short by the kill is ignored), skips the finished ids and goes on; at the end OUT is
written whole under a temporary name and renamed, then the journals are removed (a kill between the two
leaves journals that still hold everything, so the next run only rewrites OUT). The settings the records
depend on (model, input, generation settings) are kept beside them (`OUT.journal-run.json`); records written
with other settings are refused rather than mixed in, while a settings file with no records beside it (a
run that failed before its first result) is simply replaced, and a run whose model fails to load removes
the one it wrote. A finished OUT is never read
back: it carries no record of the settings that made it, so the same command after a finished run runs
every item again. Ctrl-C stops with a one-line
message and keeps what finished.

Distributed: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the processes join one torch.distributed
group (gloo on the CPU, nccl on CUDA, each rank on cuda:LOCAL_RANK); after every rank has read the journals
(a barrier, before anyone writes), rank r takes the remaining items r, r + N, r + 2N, ... in input order;
rank 0 writes OUT after a final barrier.

Scheduling: a rank's items run on the continuous-batching scheduler (points.runtime.scheduler) in input
order, at most --batch-size at a time: an item joins the batch as soon as a row is free and leaves it when
its reply ends, and its record is journaled then; each reply equals (greedy, float32) the item run alone.
A line may carry its own generation fields (max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty,
seed, stop, response_format: a grammar, points.runtime.grammar) over the command's: {"id": "a", "messages": [...], "max_new_tokens": 16}.

Presets: --preset NAME asks every item with one of the checkpoint's presets (POINTS-Reader's "reader",
POINTS-GUI-G's "gui": its system turn, its prompt for a user turn of images only, its decoding settings as the
defaults under the options given); a line's own "preset" (a name, or null for none) replaces the command's for
that item, and its generation fields still win: {"id": "p1", "messages": [{"role": "user", "content":
[{"type": "image", "image": "page1.png"}]}], "preset": "reader"}. A preset the checkpoint's member lacks is
named with its line before any work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from points.io.progress import Progress
from points.tooling.jobs import (Item, Job, Journal, RunError, add_dataset_options, drive, generating_pipeline,
                                 item_error, on_scheduler)
from points.tooling.jobs import check_meta  # noqa: F401 (one of the names tests and tools use from here)
from points.tooling.jobs import read_items as _read_items
from points.tooling.jobs import read_records as _read_records
from points.tooling.options import (GENERATION_OPTIONS, add_generation_options, add_job_options, add_prefill_option,
                                    add_preset_option, check_preset, check_weight_options, exit_code,
                                    generation_kwargs, quantize_record)

# generation fields an input line may carry for itself, over the command's (--max-new-tokens etc.)
ITEM_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
               "response_format")
RESULTS = ("reply",)  # a result record: {"id", "reply"} (or {"id", "error"})


def read_items(path: Path) -> list[Item]:
    """The input's items; an item's `fields` hold its generation fields and its "preset", if it names one."""
    return _read_items(path, ITEM_FIELDS + ("preset",))


def item_settings(item: Item, gen: dict, preset: str | None) -> tuple[str | None, dict]:
    """(the preset, the generation keywords) an item runs with: its own over the command's `preset` and `gen`."""
    fields = dict(item.fields)
    return fields.pop("preset", preset), gen | fields


def read_records(path: Path) -> list[dict]:
    return _read_records(path, RESULTS)


def run_key(args, items: list[Item]) -> dict:
    """What a journal's records depend on: a journal written under another key is not mixed in (the generation
    settings as they apply: the options given over GenerationConfig's defaults; the --preset)."""
    from points.runtime.generation import GenerationConfig

    digest = hashlib.sha256(json.dumps([[it.id, it.messages, it.fields] for it in items], sort_keys=True).encode()).hexdigest()
    defaults = {name: getattr(GenerationConfig, name) for name in GENERATION_OPTIONS}
    return {"model": str(Path(args.model).resolve()), "input_sha256": digest, "dtype": args.dtype,
            **quantize_record(args), "gen": defaults | generation_kwargs(args), "preset": args.preset}


def process(pipe, items: list[Item], gen: dict, journal: Journal, progress: Progress | None,
            preset: str | None = None, build=None) -> int:
    """Run `items` (this rank's share) on the pipeline's scheduler (`jobs.on_scheduler`), each with the
    command's generation settings `gen` and `preset` under its own fields, every result journaled as it
    finishes; return the number of tokens generated. `build`: an item -> its messages, made when it is
    submitted (`points eval`: a row's image decoded then), instead of `item.messages`."""

    def submit(it):
        chosen, settings = item_settings(it, gen, preset)
        messages = it.messages if build is None else build(it)
        return pipe.submit(messages, f"item {it.id!r}", preset=chosen, **settings)

    def finish(it, request):
        return {"id": it.id, "reply": request.reply}

    return on_scheduler(pipe, items, journal, progress, submit, finish, item_error)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_options(p, '{"id", "messages"}')
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows decoded at once; items join as rows come free (default: %(default)s)")
    add_prefill_option(p)
    add_generation_options(p)
    add_preset_option(p, "; a line's own \"preset\" replaces it")
    add_job_options(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-prefill-tokens", args.max_prefill_tokens)):
        if value < 1:
            p.error(f"{flag} {value}: expected an integer >= 1")
    check_weight_options(p, args)
    from points.runtime.generation import GenerationConfig, GenerationError

    try:
        GenerationConfig.from_kwargs(**generation_kwargs(args))
    except GenerationError as e:
        p.error(e.flag())

    def read():
        from points.io.chat import PresetError, preset_of
        from points.io.config import read_config

        items, gen, member = read_items(args.input), generation_kwargs(args), None
        if args.preset is not None or any("preset" in it.fields for it in items):
            check_preset(args.model, args.preset)  # (the flag named as such, before the lines)
            member = read_config(args.model).member
        for it in items:
            preset, settings = item_settings(it, gen, args.preset)
            try:
                GenerationConfig.from_kwargs(**settings)
                if preset is not None:
                    preset_of(member, preset)
            except GenerationError as e:
                raise RunError(f"{args.input}, line {it.line}: \"{e.field}\" = {e.value!r}: expected {e.want}") from None
            except PresetError as e:
                raise RunError(f"{args.input}, line {it.line}: \"preset\" = {e.name!r:.60}: {e.reason}") from None
        return items

    load = generating_pipeline(args)

    def work(pipe, share, journal, progress):
        process(pipe, share, generation_kwargs(args), journal, progress, args.preset)

    return exit_code(lambda: drive(Job("points run", args, read, lambda items: run_key(args, items), load, work,
                                       RESULTS)))
