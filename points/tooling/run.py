"""`points run`: a model over a JSONL dataset, batched by length, resumable, across processes with torchrun.

    points run --model DIR --input IN.jsonl --output OUT.jsonl [--batch-size 8] [--max-new-tokens N] ...
    torchrun --nproc-per-node 2 -m points run --model DIR --input IN.jsonl --output OUT.jsonl

Input: one JSON object per line, {"id": "<unique string>", "messages": [...]} (messages as in
`Pipeline.chat`; an image item's "image" is a path, relative to the input file's folder or absolute). Blank
lines are skipped. Every line is checked before any work starts: a line that is not JSON, one without a string
"id" or a list "messages", or a duplicate id is an error naming the line.

Output: when the run ends OUT holds one line per input id, in input order: {"id": ..., "reply": "..."}, or
{"id": ..., "error": "..."} for an item that cannot run (an unreadable image, a prompt over the context); the
run goes on and exits 0. It exits non-zero only when the run itself fails.

Durability: each finished batch is appended to a journal next to OUT (`OUT.journal.<rank>`; write, flush,
fsync), so `kill -9` at any moment loses at most the batches in flight. The same command again reads every
journal (a last line cut short by the kill is ignored), skips the finished ids and goes on; at the end OUT is
written whole under a temporary name and renamed, then the journals are removed (a kill between the two
leaves journals that still hold everything, so the next run only rewrites OUT). A journal written with other
options (model, input, generation settings) is refused rather than mixed in. A finished OUT is never read
back: it carries no record of the settings that made it, so the same command after a finished run runs
every item again. Ctrl-C stops with a one-line
message and keeps what finished.

Distributed: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) the processes join one torch.distributed
group (gloo on the CPU, nccl on CUDA, each rank on cuda:LOCAL_RANK); after every rank has read the journals
(a barrier, before anyone writes), rank r takes the remaining items r, r + N, r + 2N, ... in input order;
rank 0 writes OUT after a final barrier.

Batching: a rank's items are sorted by (image count, prompt length) and cut into batches of at most
--batch-size rows, so rows of one batch pad little; each reply equals (greedy, float32) the item run alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from points.io.checkpoint import DTYPES


class RunError(ValueError):
    """A problem with the run's input or files, named in the message (exit code 2)."""


@dataclass
class Item:
    index: int  # position in the input
    id: str
    messages: list
    line: int


def _absolute_images(messages, folder: Path):
    """Image paths relative to the input file's folder -> absolute (other values are left for the prompt
    builder to check and report)."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for item in content if isinstance(content, list) else ():
            if isinstance(item, dict) and item.get("type") == "image" and isinstance(item.get("image"), str):
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
        items.append(Item(len(items), obj["id"], _absolute_images(obj["messages"], path.parent), n))
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
    """This rank's append-only journal: one JSON line per finished item, durable when `append` returns."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():  # drop a last line cut short by a kill before appending after it
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
        self.file = open(path, "ab")

    def append(self, records: list[dict]) -> None:
        self.file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def write_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def run_key(args, items: list[Item]) -> dict:
    """What a journal's records depend on: a journal written under another key is not mixed in."""
    digest = hashlib.sha256(json.dumps([[it.id, it.messages] for it in items], sort_keys=True).encode()).hexdigest()
    return {"model": str(Path(args.model).resolve()), "input_sha256": digest, "dtype": args.dtype,
            "quantize": args.quantize, "quantize_lm_head": args.quantize_lm_head, "gen": gen_kwargs(args)}


def check_meta(out: Path, key: dict, rank: int) -> None:
    meta = _meta_path(out)
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != key:
            differ = sorted(k for k in key if not isinstance(old, dict) or old.get(k) != key[k])
            raise RunError(f"{out}: its journal ({meta.name}, {', '.join(p.name for p in journals(out))}) was "
                           f"written by a run with other {', '.join(differ) or 'settings'}; run with the same "
                           f"settings to resume, or delete those files to start over")
    elif rank == 0:
        write_atomically(meta, [json.dumps(key)])


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

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """items done / total, items/s, generated tokens/s and ETA on one redrawn line; silent unless stderr is
    a terminal."""

    def __init__(self, total: int, done: int, label: str, enabled: bool | None = None):
        self.total, self.done, self.start_done, self.label = total, done, done, label
        self.tokens, self.t0 = 0, time.monotonic()
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.draw()

    def update(self, items: int, tokens: int) -> None:
        self.done += items
        self.tokens += tokens
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = "--" if eta != eta else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        print(f"\r{self.label}{self.done}/{self.total} items  {rate:.2f} items/s  {self.tokens / dt:.1f} tok/s  "
              f"ETA {eta_s}   ", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


# ----------------------------------------------------------------------------------------------- the run


def gen_kwargs(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def batches(prepared: list[tuple[Item, int, int]], size: int) -> list[list[Item]]:
    """(item, image count, prompt length) -> batches of at most `size` items of similar shape."""
    order = sorted(prepared, key=lambda p: (p[1], p[2], p[0].index))
    return [[p[0] for p in order[i:i + size]] for i in range(0, len(order), size)]


def process(pipe, items: list[Item], cfg, batch_size: int, journal: Journal, progress: Progress | None) -> int:
    """Run `items` (this rank's share) and append every result to the journal, a batch at a time; return the
    number of tokens generated."""
    from points.runtime.generation import prepare, replies

    limit = pipe.model.decoder.cfg.max_seq_len
    ok, failed = [], []
    for it in items:  # check every item alone first: one bad image must not take its batch down
        try:
            prompt, ids = prepare(pipe.tokenizer, pipe.processor, it.messages, cfg, limit, f"item {it.id!r}")
            ok.append((it, 0 if prompt.grid_thw is None else len(prompt.grid_thw), len(ids)))
        except (ValueError, OSError) as e:
            name = f"item {it.id!r}: "
            failed.append({"id": it.id, "error": str(e) if str(e).startswith(name) else name + str(e)})
    if failed:
        journal.append(failed)
        if progress:
            progress.update(len(failed), 0)
    tokens = 0
    for batch in batches(ok, batch_size):
        # prompts again, one batch at a time, so that no more than one batch of images is held
        prepared = [prepare(pipe.tokenizer, pipe.processor, it.messages, cfg, limit, f"item {it.id!r}")
                    for it in batch]
        out = replies(pipe.model, pipe.tokenizer, [p for p, _ in prepared], [ids for _, ids in prepared], cfg,
                      pipe.engine)
        journal.append([{"id": it.id, "reply": text} for it, (text, _) in zip(batch, out)])
        generated = sum(n for _, n in out)
        tokens += generated
        if progress:
            progress.update(len(batch), generated)
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
    write_atomically(out, [json.dumps({k: found[it.id][k] for k in ("id", "reply", "error") if k in found[it.id]},
                                      ensure_ascii=False) for it in items])
    for path in journals(out) + [_meta_path(out)]:
        path.unlink(missing_ok=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="points run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--input", required=True, type=Path, help="JSONL: one {\"id\", \"messages\"} object per line")
    p.add_argument("--output", required=True, type=Path, help="JSONL written at the end, one line per input id")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: %(default)s)")
    add_generation_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: the checkpoint's")
    p.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 decoder")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head too")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="the progress line (auto: when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.quantize_lm_head and not args.quantize:
        p.error("--quantize-lm-head needs --quantize int8")
    import points
    from points.runtime.generation import GenerationConfig

    dist = None
    try:
        try:
            cfg = GenerationConfig.from_kwargs(**gen_kwargs(args))
        except ValueError as e:
            p.error(str(e))
        items = read_items(args.input)
        out = args.output
        if not out.parent.is_dir():
            raise RunError(f"--output {out}: folder {out.parent} does not exist")
        dist = Dist(args.device)
        check_meta(out, run_key(args, items), dist.rank)
        done = {r["id"] for path in journals(out) for r in read_records(path)}
        dist.barrier()  # every rank has read the journals before any rank appends to its own
        remaining = [it for it in items if it.id not in done]
        share = remaining[dist.rank::dist.world]
        label = f"points run (rank {dist.rank} of {dist.world}): " if dist.world > 1 else "points run: "
        if share:
            pipe = points.load(args.model, device=dist.device, dtype=args.dtype, quantize=args.quantize,
                               quantize_lm_head=args.quantize_lm_head or None, compile=args.compile)
            journal = Journal(out.with_name(f"{out.name}.journal.{dist.rank}"))
            enabled = {"auto": None, "on": True, "off": False}[args.progress]
            progress = Progress(len(share), 0, label, enabled)
            try:
                process(pipe, share, cfg, args.batch_size, journal, progress)
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
            print(f"points run: {len(items)} items -> {out} ({len(items) - len(remaining)} from an earlier run, "
                  f"{errors} with an error)", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print(f"\npoints run: interrupted; finished items are kept in {args.output}.journal.*; the same command "
              f"resumes", file=sys.stderr)
        return 130
    except (RunError, points.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            dist.close()


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The generation options `points chat` and `points run` share (defaults shown in --help)."""
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s = off)")
    p.add_argument("--top-k", type=int, default=0, help="default: %(default)s = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default: %(default)s = off")
    p.add_argument("--seed", type=int, default=None, help="for sampling (default: none)")
