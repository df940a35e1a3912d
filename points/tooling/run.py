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
run that failed before its first result) is simply replaced. A finished OUT is never read
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
A line may carry its own generation fields (max_new_tokens, temperature, top_p, top_k, repetition_penalty,
seed, stop) over the command's: {"id": "a", "messages": [...], "max_new_tokens": 16}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from points.errors import CheckpointError, WriteError
from points.io.atomic import Terminated, sigterm_raises, write_text_atomically
from points.io.outputs import OutputError, OutputLock, check_output
from points.io.processor import is_url
from points.io.progress import Progress
from points.tooling.options import add_generation_options, add_weight_options, check_weight_options, generation_kwargs


class RunError(ValueError):
    """A problem with the run's input or files, named in the message (exit code 2)."""


# generation fields an input line may carry for itself, over the command's (--max-new-tokens etc.)
ITEM_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


@dataclass
class Item:
    index: int  # position in the input
    id: str
    messages: list
    line: int
    gen: dict = field(default_factory=dict)  # its own generation fields (ITEM_FIELDS)


def _absolute_images(messages, folder: Path):
    """Image paths relative to the input file's folder -> absolute (other values are left for the prompt
    builder to check and report)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for item in content if isinstance(content, list) else ():
            if (isinstance(item, dict) and item.get("type") == "image" and isinstance(item.get("image"), str)
                    and not is_url(item["image"])):  # a URL is left whole, for the processor to refuse
                path = Path(item["image"]).expanduser()
                item["image"] = str(path if path.is_absolute() else folder / path)
    return messages


def read_items(path: Path) -> list[Item]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"--input {path}: cannot read ({e})") from None
    items, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise RunError(f"{where}: expected an object {{\"id\": ..., \"messages\": [...]}}, got {type(obj).__name__}")
        if not isinstance(obj.get("id"), str) or not obj["id"]:
            raise RunError(f"{where}: \"id\" must be a non-empty string, got {obj.get('id')!r:.60}")
        if not isinstance(obj.get("messages"), list) or not obj["messages"]:
            raise RunError(f"{where}: \"messages\" must be a non-empty list (as for Pipeline.chat)")
        if obj["id"] in seen:
            raise RunError(f"{where}: id {obj['id']!r} already used on line {seen[obj['id']]}")
        seen[obj["id"]] = n
        gen = {k: obj[k] for k in ITEM_FIELDS if k in obj}
        items.append(Item(len(items), obj["id"], _absolute_images(obj["messages"], path.parent), n, gen))
    if not items:
        raise RunError(f"--input {path}: no items (expected one JSON object per line)")
    return items


# ----------------------------------------------------------------------------------------------- journal


def journals(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.journal.*"), key=lambda p: p.name)


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal-run.json")


def read_records(path: Path) -> list[dict]:
    """The complete lines of a journal (or of OUT): a last line without its newline (cut by a
    kill) and lines that are not a record are ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is incomplete (or empty)
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and isinstance(r.get("id"), str) and ("reply" in r or "error" in r):
            records.append(r)
    return records


class Journal:
    """This rank's append-only journal: one JSON line per finished item, durable when `append` returns. A
    failed append (a full disk) is cut off again, so the journal only ever holds whole records."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):  # drop a last line cut short by a kill before appending after it
                os.ftruncate(self.fd, keep)
        except OSError as e:
            raise WriteError(path, e) from None

    def append(self, records: list[dict]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass  # a cut last line is dropped by the next run anyway
            raise WriteError(self.path, e, "; it keeps the items finished before, and the same command resumes "
                                           "from them once there is room") from None

    def close(self) -> None:
        os.close(self.fd)


def run_key(args, items: list[Item]) -> dict:
    """What a journal's records depend on: a journal written under another key is not mixed in."""
    digest = hashlib.sha256(json.dumps([[it.id, it.messages, it.gen] for it in items], sort_keys=True).encode()).hexdigest()
    return {"model": str(Path(args.model).resolve()), "input_sha256": digest, "dtype": args.dtype,
            "quantize": args.quantize, "quantize_lm_head": args.quantize_lm_head, "gen": generation_kwargs(args)}


def check_meta(out: Path, key: dict, rank: int) -> None:
    """Refuse journals written under another key; rank 0 records the key (a record with no results beside
    it, left by a run that failed before its first result, is replaced)."""
    meta = _meta_path(out)
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old == key:
            return
        if any(read_records(path) for path in journals(out)):
            differ = sorted(k for k in key if not isinstance(old, dict) or old.get(k) != key[k])
            files = ", ".join(p.name for p in [meta] + journals(out))
            raise RunError(f"{out}: its journal ({files}) was written by a run with other "
                           f"{', '.join(differ) or 'settings'}; run with the same settings to resume, or delete "
                           "those files to start over")
    if rank == 0:
        write_text_atomically(meta, json.dumps(key) + "\n")


# ----------------------------------------------------------------------------------------------- distributed


class Dist:
    """torch.distributed when torchrun started us (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device_arg
        self.group = False
        if self.world > 1:
            import torch.distributed as dist

            cuda = device_arg.startswith("cuda")
            if cuda:
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
            self.group = True

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- the run


# what an item can raise (an unreadable image, a prompt over the context; memory for its row)
ITEM_ERRORS = (ValueError, OSError, torch.OutOfMemoryError)


def _error(it: Item, e: Exception) -> dict:
    name = f"item {it.id!r}: "
    return {"id": it.id, "error": str(e) if str(e).startswith(name) else name + str(e)}


def process(pipe, items: list[Item], gen: dict, journal: Journal, progress: Progress | None) -> int:
    """Run `items` (this rank's share) on the pipeline's scheduler, each with the command's generation
    settings `gen` under its own fields, and append every result to the journal as soon as it finishes;
    return the number of tokens generated. Prompts are built (and their images read) as rows come free,
    a few ahead, so that only those items' images are held. An item's failure is that item's error record,
    never the run's; an item caught in a failed step (memory for the whole batch) runs again once."""
    scheduler = pipe.scheduler
    pending, live, tokens, retried = list(reversed(items)), {}, 0, set()
    while pending or live:
        failed = []
        while pending and len(live) < 2 * scheduler.max_batch:
            it = pending.pop()
            try:
                live[pipe.submit(it.messages, f"item {it.id!r}", **(gen | it.gen))] = it
            except ITEM_ERRORS as e:
                failed.append(_error(it, e))
        if failed:
            journal.append(failed)
            if progress:
                progress.update(len(failed))
        if live:
            try:
                scheduler.step()
            except ITEM_ERRORS:  # a whole step failed (memory): its requests ended with step_failed, retried below
                pass
        records, generated = [], 0
        for request in [r for r in live if r.done]:
            it = live.pop(request)
            if request.error is not None and not isinstance(request.error, ITEM_ERRORS):
                raise request.error
            if request.step_failed and it.id not in retried:
                retried.add(it.id)  # a step of the whole batch failed: once more, in another batch
                pending.append(it)
                continue
            records.append(_error(it, request.error) if request.error is not None
                           else {"id": it.id, "reply": request.reply})
            generated += request.completion_tokens
        if records:
            journal.append(records)
            tokens += generated
            if progress:
                progress.update(len(records), tokens=generated)
    return tokens


def finish(out: Path, items: list[Item]) -> int:
    """Rank 0, after every rank is done: OUT in input order from the journals, atomically; then the
    journals go. Returns the number of ids without a record (0 unless something went wrong)."""
    found = {}
    for path in journals(out):
        for r in read_records(path):
            found.setdefault(r["id"], r)
    missing = [it.id for it in items if it.id not in found]
    if missing:
        return len(missing)
    lines = [json.dumps({k: found[it.id][k] for k in ("id", "reply", "error") if k in found[it.id]},
                        ensure_ascii=False) + "\n" for it in items]
    try:
        write_text_atomically(out, "".join(lines))
    except WriteError as e:
        raise WriteError(out, e, f"; every result is kept in {', '.join(p.name for p in journals(out))}: the same "
                                 "command writes it once there is room") from None
    for path in journals(out) + [_meta_path(out)]:
        path.unlink(missing_ok=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--input", required=True, type=Path, help="JSONL: one {\"id\", \"messages\"} object per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL written at the end, one line per input id")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows decoded at once; items join as rows come free (default: %(default)s)")
    add_generation_options(p)
    add_weight_options(p, device_help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) ")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="the progress line (auto: when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    check_weight_options(p, args)
    import points
    from points.io.config import read_config
    from points.pipeline import resolve_device
    from points.runtime.generation import GenerationConfig, GenerationError

    try:
        GenerationConfig.from_kwargs(**generation_kwargs(args))
    except GenerationError as e:
        p.error(e.flag())
    out, dist, lock = args.output, None, None
    try:
        with sigterm_raises():
            # everything that can be checked is checked before any file is written
            items = read_items(args.input)
            for it in items:
                try:
                    GenerationConfig.from_kwargs(**(generation_kwargs(args) | it.gen))
                except GenerationError as e:
                    raise RunError(f"{args.input}, line {it.line}: \"{e.field}\" = {e.value!r}: expected {e.want}") from None
            check_output(out, source=args.input)
            read_config(args.model)
            resolve_device(args.device)  # a device this machine has
            dist = Dist(args.device)
            if dist.rank == 0:
                lock = OutputLock(out).acquire()
            dist.barrier()  # the lock is held before any rank reads or writes the journals
            check_meta(out, run_key(args, items), dist.rank)
            done = {r["id"] for path in journals(out) for r in read_records(path)}
            dist.barrier()  # every rank has read the journals before any rank appends to its own
            remaining = [it for it in items if it.id not in done]
            share = remaining[dist.rank::dist.world]
            label = f"points run (rank {dist.rank} of {dist.world})" if dist.world > 1 else "points run"
            if share:
                pipe = points.load(args.model, device=dist.device, dtype=args.dtype, quantize=args.quantize,
                                   quantize_lm_head=args.quantize_lm_head or None, compile=args.compile,
                                   max_batch=args.batch_size)
                journal = Journal(out.with_name(f"{out.name}.journal.{dist.rank}"))
                enabled = {"auto": None, "on": True, "off": False}[args.progress]
                progress = Progress(label, len(share), unit="items", enabled=enabled)
                try:
                    process(pipe, share, generation_kwargs(args), journal, progress)
                finally:
                    journal.close()
                    progress.close()
            dist.barrier()
            if dist.rank == 0:
                missing = finish(out, items)
                if missing:
                    print(f"points run: {missing} item(s) have no result in the journals of {out}; run again to "
                          f"finish them", file=sys.stderr)
                    return 1
                errors = sum("error" in r for r in read_records(out))
                print(f"points run: {len(items)} items -> {out} ({len(items) - len(remaining)} from an earlier "
                      f"run, {errors} with an error)", file=sys.stderr)
            return 0
    except KeyboardInterrupt:
        print(f"\npoints run: interrupted; finished items are kept in {out}.journal.*; the same command "
              f"resumes", file=sys.stderr)
        return 130
    except Terminated:
        print(f"points run: terminated (SIGTERM); finished items are kept in {out}.journal.*; the same command "
              f"resumes", file=sys.stderr)
        return 143
    except (RunError, CheckpointError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
        if dist is not None:
            dist.close()
