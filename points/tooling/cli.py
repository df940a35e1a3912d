"""The `points` command (also `python -m points`): chat, convert, demo, bench, run (`points COMMAND --help`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time

from points.io.atomic import Terminated
from points.tooling import convert, run
from points.tooling.options import (add_generation_options, add_weight_options, check_weight_options,
                                    generation_kwargs)


def _check_image(flag: str, path: str) -> str | None:
    """None if `path` is an image the processor can read, else the error line naming the flag and the path."""
    from points.io.processor import open_image

    try:
        open_image(path)
    except ValueError as e:
        return f"error: {flag} {e}"
    return None


class _StopOnInterrupt:
    """While a reply streams in the interactive session: the first Ctrl-C asks the reply to stop after the
    step in flight (`requested`), a second one interrupts as usual (KeyboardInterrupt)."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def _chat(args) -> int:
    import points
    from points.io.chat import ImageError

    from points.runtime.generation import GenerationConfig, GenerationError

    gen = generation_kwargs(args)
    try:
        GenerationConfig.from_kwargs(**gen)
    except GenerationError as e:
        print(f"error: {e.flag()}", file=sys.stderr)
        return 2
    images = list(args.image or [])
    for path in images:  # before the model loads (and before the first prompt)
        if (error := _check_image("--image", path)) is not None:
            print(error, file=sys.stderr)
            return 2
    try:
        pipe = points.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           quantize_lm_head=args.quantize_lm_head or None, prefix_cache=not args.no_prefix_cache,
                           compile=args.compile)
    except (points.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    messages: list[dict] = []
    interactive = args.prompt is None

    def ask(text: str) -> bool:
        content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
        images.clear()  # an image belongs to the turn that introduced it
        messages.append({"role": "user", "content": content})
        reused_before = pipe.prefix.reused_tokens if pipe.prefix is not None else 0
        reply, start, first, stopped = "", time.perf_counter(), None, False
        try:
            with _StopOnInterrupt() if interactive else contextlib.nullcontext() as stop:
                pieces = pipe.chat(messages, stream=True, **gen)
                try:
                    for piece in pieces:
                        if first is None:
                            first = time.perf_counter() - start
                        reply += piece
                        print(piece, end="", flush=True)
                        if stop is not None and stop.requested:
                            stopped = True
                            break
                finally:
                    pieces.close()
                stopped = stopped or (stop is not None and stop.requested)
        except ImageError as e:
            messages.pop()
            print(f"error: image {e.reason}", file=sys.stderr)
            return False
        except ValueError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            return False
        print()
        if stopped:
            print("(reply stopped; it stays in the conversation. Ctrl-C at the prompt, or Ctrl-D, leaves)",
                  file=sys.stderr)
        if args.verbose:
            reused = pipe.prefix.reused_tokens - reused_before if pipe.prefix is not None else 0
            print(f"(first piece after {first if first is not None else time.perf_counter() - start:.2f} s; "
                  f"{reused} prompt tokens reused from the prefix cache)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
        return True

    if not interactive:
        return 0 if ask(args.prompt) else 2
    print(f"points chat: {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command, _, rest = line.partition(" ")
        if not line.startswith("/"):
            if line:
                ask(line)
        elif command in ("/quit", "/exit"):
            return 0
        elif command == "/reset":
            messages.clear()
            images.clear()
            if pipe.prefix is not None:
                pipe.prefix.clear()
            print("(conversation forgotten" + (", cached prefix cleared)" if pipe.prefix is not None else ")"),
                  file=sys.stderr)
        elif command == "/help":
            print(HELP, file=sys.stderr)
        elif command == "/image":
            path = rest.strip()
            if not path:
                print("usage: /image PATH (the image goes with your next message)", file=sys.stderr)
                continue
            if (error := _check_image("/image", path)) is not None:  # checked now, not with the next message
                print(error, file=sys.stderr)
                continue
            images.append(path)
            print(f"(image {path} goes with your next message)", file=sys.stderr)
        else:
            print(f"unknown command {command}; {HELP}", file=sys.stderr)


HELP = ("/image PATH adds an image to your next message, /reset forgets the conversation (and the cached prefix), "
        "/help shows this, /quit leaves.")


def main(argv=None) -> int:
    from points import __version__

    p = argparse.ArgumentParser(prog="points", description="POINTS-1.5 in plain PyTorch")
    p.add_argument("--version", action="version", version=f"points {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat with a checkpoint (streams the reply; interactive without --prompt)")
    c.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    c.add_argument("--image", action="append", help="an image for the (first) message; repeatable")
    c.add_argument("--prompt", help="one question; without it an interactive multi-turn session")
    add_generation_options(c)
    add_weight_options(c)
    c.add_argument("--compile", action="store_true", help="torch.compile the decode step (the first reply waits "
                   "for the compiler, the later ones are faster)")
    c.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every turn from scratch (default: reuse the earlier turns' KV cache)")
    c.add_argument("--verbose", action="store_true", help="after each reply: time to its first piece, tokens reused")
    for name, text in (("convert", "convert a checkpoint into this project's layout (atomic)"),
                       ("demo", "the whole pipeline offline on a generated checkpoint (random weights)"),
                       ("bench", "benchmark against transformers on the same random weights"),
                       ("run", "a checkpoint over a JSONL dataset: batched, resumable, torchrun-aware")):
        sub.add_parser(name, help=text, add_help=False)  # listed here; their own parsers read their arguments
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else "points"
    try:
        if argv and argv[0] in ("convert", "demo", "bench", "run"):
            if argv[0] == "run":
                return run.main(argv[1:])
            if argv[0] == "convert":
                return convert.main(argv[1:])
            if argv[0] == "demo":
                from points.tooling import demo
                return demo.main(argv[1:])
            from points.tooling import bench
            return bench.main(argv[1:])
        args = p.parse_args(argv)
        check_weight_options(c, args)
        return _chat(args)
    except KeyboardInterrupt:  # one line, not a traceback; partial outputs were removed on the way out
        print(f"\npoints {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"points {name}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
