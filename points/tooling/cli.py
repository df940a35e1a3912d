"""The `points` command (also `python -m points`): chat, convert, demo, bench, run (`points COMMAND --help`)."""

from __future__ import annotations

import argparse
import sys
import time

from points.io.atomic import Terminated
from points.io.checkpoint import DTYPES
from points.tooling import convert, run
from points.tooling.run import add_generation_arguments, gen_kwargs


def _chat(args) -> int:
    import points

    try:
        pipe = points.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           quantize_lm_head=args.quantize_lm_head or None, prefix_cache=not args.no_prefix_cache)
    except (points.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = gen_kwargs(args)
    images = list(args.image or [])
    messages: list[dict] = []

    def ask(text: str) -> bool:
        content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
        images.clear()  # an image belongs to the turn that introduced it
        messages.append({"role": "user", "content": content})
        reused_before = pipe.prefix.reused_tokens if pipe.prefix is not None else 0
        reply, start, first = "", time.perf_counter(), None
        try:
            for piece in pipe.chat(messages, stream=True, **gen):
                if first is None:
                    first = time.perf_counter() - start
                reply += piece
                print(piece, end="", flush=True)
        except ValueError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            return False
        print()
        if args.verbose:
            reused = pipe.prefix.reused_tokens - reused_before if pipe.prefix is not None else 0
            print(f"(first piece after {first if first is not None else time.perf_counter() - start:.2f} s; "
                  f"{reused} prompt tokens reused from the prefix cache)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
        return True

    if args.prompt is not None:
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
        elif command == "/help":
            print(HELP, file=sys.stderr)
        elif command == "/image":
            path = rest.strip()
            if not path:
                print("usage: /image PATH (the image goes with your next message)", file=sys.stderr)
                continue
            try:  # checked now, not when the next message is sent
                pipe.processor(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
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
    add_generation_arguments(c)
    c.add_argument("--device", default="cpu", help="default: %(default)s")
    c.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: the checkpoint's")
    c.add_argument("--quantize", choices=["int8"], default=None,
                   help="weight-only int8 decoder (a checkpoint converted with --quantize loads quantized anyway)")
    c.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head too")
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
        return _chat(p.parse_args(argv))
    except KeyboardInterrupt:  # one line, not a traceback; partial outputs were removed on the way out
        print(f"\npoints {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"points {name}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
