"""What `points run` and `points score` share: a JSONL dataset in, one result line per id out, journaled as
each item finishes, resumable, one run per output at a time, split across torchrun's processes.

    items = read_items(args.input, fields=("reply",))     # checked line by line before any work
    return drive(Job("points score", args, items, key, results=("tokens", "logprob", "perplexity"), work=...))

The rules (exit codes, the journal and its settings file, the lock, the ranks' shares) are written once in
`points run --help` (points/tooling/run.py's docstring) and hold for every command built on `drive`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from points.errors import Terminated, WriteError
from points.io.atomic import sigterm_raises, write_text_atomically
from points.io.outputs import OutputError, OutputLock, check_output
from points.io.progress import Progress
from points.tooling.options import progress_enabled, quantize_options

if TYPE_CHECKING:  # (torch is imported where it runs: the commands' --help reads this module first)
    import torch


class RunError(ValueError):
    """A problem with the run's input or files, named in the message (exit code 2)."""


@dataclass
class Item:
    index: int  # position in the input
    id: str
    messages: list
    line: int
    fields: dict = field(default_factory=dict)  # the line's other fields the command reads (`read_items(fields=)`)
    text: str = ""  # the input line as it was


def _absolute_images(messages, folder: Path):
    """Image paths relative to the input file's folder -> absolute (other values are left for the prompt
    builder to check and report)."""
    from points.io.processor import is_url

    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for item in content if isinstance(content, list) else ():
            if (isinstance(item, dict) and item.get("type") == "image" and isinstance(item.get("image"), str)
                    and not is_url(item["image"])):  # a URL is left whole, for the processor to refuse
                path = Path(item["image"]).expanduser()
                item["image"] = str(path if path.is_absolute() else folder / path)
    return messages


def read_items(path: Path, fields: tuple[str, ...] = (), flag: str = "--input") -> list[Item]:
    """Every line of the input checked (JSON, a non-empty string "id" used once, a non-empty list
    "messages"); the `fields` a line carries are kept in its Item. Image paths are made absolute. `flag`: the
    option that named the file, for the messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{flag} {path}: cannot read ({e})") from None
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
        kept = {k: obj[k] for k in fields if k in obj}
        items.append(Item(len(items), obj["id"], _absolute_images(obj["messages"], path.parent), n, kept, line))
    if not items:
        raise RunError(f"{flag} {path}: no items (expected one JSON object per line)")
    return items


# ----------------------------------------------------------------------------------------------- journal


def journals(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.journal.*"), key=lambda p: p.name)


def _meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal-run.json")


def read_records(path: Path, results: tuple[str, ...]) -> list[dict]:
    """The complete lines of a journal (or of OUT) that are records (an "id" and one of the `results` keys,
    or "error"): a last line without its newline (cut by a kill) and other lines are ignored."""
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
        if isinstance(r, dict) and isinstance(r.get("id"), str) and any(k in r for k in (*results, "error")):
            records.append(r)
    return records


def record_line(record: dict) -> str:
    """One JSON line: text as it is (UTF-8), unless it holds what UTF-8 cannot (a file name's undecodable bytes,
    kept by Python as lone surrogates): then that line is escaped ASCII, which reads back the same."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode()
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


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
        data = b"".join(record_line(r).encode() for r in records)
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


def _has_records(path: Path) -> bool:
    """Whether a journal holds any whole record, whatever command wrote it."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except OSError:
        return False
    for line in lines:
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and isinstance(r.get("id"), str):
            return True
    return False


def check_meta(out: Path, key: dict, rank: int) -> bool:
    """Refuse journals written under another key; rank 0 records the key (a record with no results beside
    it, left by a run that failed before its first result, is replaced). Returns whether it wrote it."""
    meta = _meta_path(out)
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old == key:
            return False
        if any(_has_records(path) for path in journals(out)):  # (any command's: a `points run` journal too)
            differ = sorted(k for k in key if not isinstance(old, dict) or old.get(k) != key[k])
            files = ", ".join(p.name for p in [meta] + journals(out))
            raise RunError(f"{out}: its journal ({files}) was written by a run with other "
                           f"{', '.join(differ) or 'settings'}; run with the same settings to resume, or delete "
                           "those files to start over")
    if rank == 0:
        write_text_atomically(meta, json.dumps(key) + "\n")
    return rank == 0


def forget_meta(out: Path) -> None:
    """The settings file goes again when no journal holds a record (a run that stopped before any result)."""
    if not any(_has_records(path) for path in journals(out)):
        for path in journals(out) + [_meta_path(out)]:
            path.unlink(missing_ok=True)


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
            import torch
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

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Summed over the processes, in place (nothing on one process)."""
        if self.group:
            import torch.distributed as dist

            on = tensor.to(self.device)  # nccl reduces CUDA tensors only
            dist.all_reduce(on)
            tensor.copy_(on)

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- the run


def item_errors() -> tuple[type[BaseException], ...]:
    """What an item can raise: an unreadable image, a prompt over the context (ValueError, OSError); memory for
    its row (torch.OutOfMemoryError)."""
    import torch

    return ValueError, OSError, torch.OutOfMemoryError


def item_error(it: Item, e: Exception) -> dict:
    """The error record of an item, its message starting with the item's id."""
    name = f"item {it.id!r}: "
    return {"id": it.id, "error": str(e) if str(e).startswith(name) else name + str(e)}


def on_scheduler(pipe, work: list, journal: Journal, progress: Progress | None, submit: Callable,
                 finish: Callable, fail: Callable) -> int:
    """The loop of every generating dataset command (`points run`, `eval`, `ocr`): `work` (this rank's share)
    on the pipeline's scheduler, submitted as rows come free (a few ahead, so that only those items' images are
    held), each result appended to the journal as soon as it finishes; returns the tokens generated.
    `submit(w)` -> a Request, or a record at once (nothing to generate); `finish(w, request)` -> its record, or
    another piece of work to run next (a retry); `fail(w, e)` -> the error record of what an item can raise
    (`item_errors`: an item's failure is its record, never the run's). Work caught in a failed step (memory for
    the whole batch) runs again once."""
    scheduler = pipe.scheduler
    pending, live, tokens, retried = list(reversed(work)), {}, 0, set()
    try:
        while pending or live:
            early = []
            while pending and len(live) < 2 * scheduler.max_batch:
                w = pending.pop()
                try:
                    request = submit(w)
                except item_errors() as e:
                    early.append(fail(w, e))
                    continue
                if isinstance(request, dict):
                    early.append(request)
                else:
                    live[request] = w
            if early:
                journal.append(early)
                if progress:
                    progress.update(len(early))
            if live:
                try:
                    scheduler.step()
                except item_errors():  # a whole step failed (memory): its requests ended with step_failed
                    pass
            records, generated = [], 0
            for request in [r for r in live if r.done]:
                w = live.pop(request)
                if request.error is not None and not isinstance(request.error, item_errors()):
                    raise request.error
                if request.step_failed and id(w) not in retried:
                    retried.add(id(w))  # a step of the whole batch failed: once more, in another batch
                    pending.append(w)
                    continue
                generated += request.completion_tokens
                done = fail(w, request.error) if request.error is not None else finish(w, request)
                if isinstance(done, dict):
                    records.append(done)
                else:
                    pending.append(done)  # (next in line)
            tokens += generated
            if records:
                journal.append(records)
                if progress:
                    progress.update(len(records), tokens=generated)
        return tokens
    finally:
        for request in live:  # (an interrupt: what still runs leaves the scheduler)
            request.cancel()


def finish(out: Path, items: list[Item], results: tuple[str, ...],
           before: Callable[[list[dict]], None] | None = None) -> int:
    """Rank 0, after every rank is done: OUT in input order from the journals, atomically (after
    `before(records)`, given them in input order, has written what it writes); then the journals go.
    Returns the number of ids without a record (0 unless something went wrong)."""
    found = {}
    for path in journals(out):
        for r in read_records(path, results):
            found.setdefault(r["id"], r)
    missing = [it.id for it in items if it.id not in found]
    if missing:
        return len(missing)
    records = [{k: found[it.id][k] for k in ("id", *results, "error") if k in found[it.id]} for it in items]
    kept = ", ".join(p.name for p in journals(out))
    try:
        if before is not None:
            before(records)
        write_text_atomically(out, "".join(record_line(r) for r in records))
    except WriteError as e:
        raise WriteError(e.path, e, f"; every result is kept in {kept}: the same command writes it once there "
                                    "is room") from None
    for path in journals(out) + [_meta_path(out)]:
        path.unlink(missing_ok=True)
    return 0


@dataclass
class Job:
    """One command over a dataset: what `drive` needs to know of it."""

    name: str  # "points run"
    args: object  # the parsed arguments: .input, .output, .model, .device
    read: Callable[[], list[Item]]  # the items, every line checked (raises RunError)
    key: Callable[[list[Item]], dict]  # what the records depend on (the journal's settings file)
    load: Callable[["Dist"], object]  # the model on this rank's device (before any journal is opened)
    work: Callable[[object, list[Item], Journal, Progress], None]  # (model, this rank's share) into the journal
    results: tuple[str, ...]  # the keys of a result record besides "id" ("error" is always one)
    outputs: tuple[tuple[str, Path], ...] = ()  # other files written at the end, checked first: (flag, path)
    before: Callable[[list[Item], list[dict]], None] | None = None  # writes them, before OUT (rank 0)
    sources: dict | None = None  # the inputs OUT must not be, {flag: path} (None: {"--input": args.input})
    unit: str = "items"  # what an item is called in the progress line and the last line ("pages")
    every: int | None = None  # without a terminal, the progress written as a line every this many items
    per_minute: bool = False  # the progress line's rate per minute (pages/min), not per second


def generating_pipeline(args):
    """Job.load of the generating commands (`points run`, `eval`, `ocr`): the checkpoint on this rank's device
    with their weight options, --compile, --batch-size and --max-prefill-tokens."""
    def load(dist):
        import points

        return points.load(args.model, device=dist.device, dtype=args.dtype,
                           **quantize_options(args), compile=args.compile,
                           max_batch=args.batch_size, max_prefill_tokens=args.max_prefill_tokens)
    return load


def add_dataset_options(p, line: str) -> None:
    """--model, --input (a JSONL of `line` objects) and --output: what every command on `drive` reads."""
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--input", required=True, type=Path, help=f"JSONL: one {line} object per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL written at the end, one line per input id")


def drive(job: Job) -> int:
    """Check everything, take the lock, read the journals, run this rank's share of what is left, and (rank
    0) write the outputs; the exit code (see points/tooling/run.py's docstring; bad input and unwritable files
    raise, for `options.exit_code`)."""
    args, out, dist, lock = job.args, job.args.output, None, None
    from points.io.config import read_config
    from points.pipeline import resolve_device

    try:
        with sigterm_raises():
            # everything that can be checked is checked before any file is written
            items = job.read()
            sources = job.sources if job.sources is not None else {"--input": args.input}
            check_output(out, sources=sources)
            for flag, path in job.outputs:
                check_output(path, sources=sources, flag=flag)
                if path.resolve() == Path(out).resolve():
                    raise OutputError(f"{flag} {path}: is also --output; choose another path")
            read_config(args.model)
            resolve_device(args.device)  # a device this machine has
            dist = Dist(args.device)
            if dist.rank == 0:
                lock = OutputLock(out).acquire()
            dist.barrier()  # the lock is held before any rank reads or writes the journals
            wrote = check_meta(out, job.key(items), dist.rank)
            done = {r["id"] for path in journals(out) for r in read_records(path, job.results)}
            dist.barrier()  # every rank has read the journals before any rank appends to its own
            remaining = [it for it in items if it.id not in done]
            share = remaining[dist.rank::dist.world]
            label = f"{job.name} (rank {dist.rank} of {dist.world})" if dist.world > 1 else job.name
            if share:
                try:
                    model = job.load(dist)
                except BaseException:  # a checkpoint that fails to load leaves no journal files behind
                    if wrote:
                        forget_meta(out)
                    raise
                journal = Journal(out.with_name(f"{out.name}.journal.{dist.rank}"))
                progress = Progress(label, len(share), unit=job.unit, enabled=progress_enabled(args), every=job.every,
                                    per_minute=job.per_minute)
                try:
                    job.work(model, share, journal, progress)
                finally:
                    journal.close()
                    progress.close()
            dist.barrier()
            if dist.rank == 0:
                before = None if job.before is None else (lambda records: job.before(items, records))
                missing = finish(out, items, job.results, before)
                if missing:
                    print(f"{job.name}: {missing} {job.unit} have no result in the journals of {out}; run again to "
                          f"finish them", file=sys.stderr)
                    return 1
                errors = sum("error" in r for r in read_records(out, job.results))
                print(f"{job.name}: {len(items)} {job.unit} -> {out} ({len(items) - len(remaining)} from an earlier "
                      f"run, {errors} with an error)", file=sys.stderr)
            return 0
    except KeyboardInterrupt:
        print(f"\n{job.name}: interrupted; finished items are kept in {out}.journal.*; the same command "
              f"resumes", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{job.name}: terminated (SIGTERM); finished items are kept in {out}.journal.*; the same command "
              f"resumes", file=sys.stderr)
        return 143
    finally:
        if lock is not None:
            lock.release()
        if dist is not None:
            dist.close()
