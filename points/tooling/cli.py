"""The `points` command (also `python -m points`): chat and the commands of COMMANDS (`points COMMAND --help`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import time

from points.errors import Terminated
from points.tooling.options import (add_generation_options, add_preset_option, add_weight_options, check_image,
                                    check_preset, check_weight_options, exit_code, generation_kwargs, quantize_options)


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


class _Session:
    """One `points chat`: the conversation so far, the images for the next message, and the replies (every turn
    asked with the --preset, if any)."""

    def __init__(self, pipe, gen: dict, images: list[str], *, preset: str | None = None, interactive: bool,
                 verbose: bool):
        self.pipe, self.gen, self.images, self.preset = pipe, gen, images, preset
        self.interactive, self.verbose = interactive, verbose
        self.messages: list[dict] = []

    def ask(self, text: str | None) -> bool:
        """Stream the reply to `text` (with the pending images; None: the images alone, for the preset's prompt);
        False (and nothing kept) on a bad turn."""
        from points.io.chat import ImageError

        content = [{"type": "image", "image": p} for p in self.images]
        content += [{"type": "text", "text": text}] if text is not None else []
        self.images.clear()  # an image belongs to the turn that introduced it
        self.messages.append({"role": "user", "content": content})
        prefix = self.pipe.prefix
        reused_before = prefix.reused_tokens if prefix is not None else 0
        start = time.perf_counter()
        try:
            reply, first, stopped = self._stream()
        except ImageError as e:
            self.messages.pop()
            print(f"error: image {e.reason}", file=sys.stderr)
            return False
        except ValueError as e:
            self.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            return False
        print()
        if stopped:
            print("(reply stopped; it stays in the conversation. Ctrl-C at the prompt, or Ctrl-D, leaves)",
                  file=sys.stderr)
        if self.verbose:
            reused = prefix.reused_tokens - reused_before if prefix is not None else 0
            first = first if first is not None else time.perf_counter() - start
            print(f"(first piece after {first:.2f} s; {reused} prompt tokens reused from the prefix cache)",
                  file=sys.stderr)
        self.messages.append({"role": "assistant", "content": reply})
        return True

    def _stream(self) -> tuple[str, float | None, bool]:
        """Print the reply as it comes -> (reply, seconds to its first piece, stopped by Ctrl-C)."""
        reply, start, first = "", time.perf_counter(), None
        with _StopOnInterrupt() if self.interactive else contextlib.nullcontext() as stop:
            pieces = self.pipe.chat(self.messages, stream=True, preset=self.preset, **self.gen)
            try:
                for piece in pieces:
                    first = time.perf_counter() - start if first is None else first
                    reply += piece
                    print(piece, end="", flush=True)
                    if stop is not None and stop.requested:
                        break
            finally:
                pieces.close()
        return reply, first, stop is not None and stop.requested

    def command(self, line: str) -> bool:
        """One /command of the interactive session; False when it asks to leave."""
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.messages.clear()
            self.images.clear()
            if self.pipe.prefix is not None:
                self.pipe.prefix.clear()
            print("(conversation forgotten" + (", cached prefix cleared)" if self.pipe.prefix is not None else ")"),
                  file=sys.stderr)
        elif command == "/help":
            print(HELP, file=sys.stderr)
        elif command == "/image":
            path = rest.strip()
            if not path:
                print("usage: /image PATH (the image goes with your next message)", file=sys.stderr)
            else:
                try:
                    check_image("/image", path)  # now, not with the next message
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return True
                self.images.append(path)
                print(f"(image {path} goes with your next message)", file=sys.stderr)
        else:
            print(f"unknown command {command}; {HELP}", file=sys.stderr)
        return True

    def loop(self) -> int:
        print(f"points chat: {HELP}", file=sys.stderr)
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line.startswith("/"):
                if not self.command(line):
                    return 0
            elif line:
                self.ask(line)


def _chat(args) -> int:
    import points
    from points.runtime.generation import GenerationConfig, GenerationError

    gen = generation_kwargs(args)
    try:
        GenerationConfig.from_kwargs(**gen)
    except GenerationError as e:
        raise ValueError(e.flag()) from None
    images = list(args.image or [])
    for path in images:  # before the model loads (and before the first prompt)
        check_image("--image", path)
    preset = check_preset(args.model, args.preset)
    # --image with a preset that has a prompt (reader) and no --prompt: one reply, to the images and that prompt
    prompt_only = args.prompt is None and bool(images) and preset is not None and preset.prompt is not None
    pipe = points.load(args.model, device=args.device, dtype=args.dtype,
                       **quantize_options(args), prefix_cache=not args.no_prefix_cache,
                       compile=args.compile)
    session = _Session(pipe, gen, images, preset=args.preset, interactive=args.prompt is None and not prompt_only,
                       verbose=args.verbose)
    if args.prompt is not None or prompt_only:
        return 0 if session.ask(args.prompt) else 2
    return session.loop()


HELP = ("/image PATH adds an image to your next message, /reset forgets the conversation (and the cached prefix), "
        "/help shows this, /quit leaves.")



# the commands with their own parser: name -> (module under points.tooling, the line `points --help` shows)
COMMANDS = {
    "convert": ("convert", "convert a checkpoint into this project's layout (atomic)"),
    "demo": ("demo", "the whole pipeline offline on a generated checkpoint (random weights)"),
    "bench": ("bench", "benchmark against transformers on the same random weights"),
    "run": ("run", "a checkpoint over a JSONL dataset: batched, resumable, torchrun-aware"),
    "eval": ("evaluate", "a VLMEvalKit benchmark TSV asked as its POINTS wrapper asks, predictions in its format, scored"),
    "ocr": ("ocr", "PDFs and scans into Markdown with POINTS-Reader: every page batched, resumable (points[ocr])"),
    "score": ("score", "each JSONL line's reply scored (log-probability, perplexity); keep the most likely"),
    "explain": ("explain", "where the model looked in an image while answering, drawn over it (attention)"),
    "soup": ("soup", "the weighted mean of checkpoints of one architecture, from their memory maps (float64)"),
    "serve": ("serve", "an OpenAI-compatible HTTP server (continuous batching; needs points[serve])"),
    "finetune": ("finetune", "LoRA or full fine-tuning on JSONL conversations: packed, resumable, torchrun-aware"),
    "merge": ("merge", "a LoRA adapter folded into its base, written in the base's layout"),
}


def main(argv=None) -> int:
    from points import __version__

    p = argparse.ArgumentParser(prog="points", description="POINTS-1.5 in plain PyTorch")
    p.add_argument("--version", action="version", version=f"points {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat with a checkpoint (streams the reply; interactive without --prompt)")
    c.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    c.add_argument("--image", action="append", help="an image for the (first) message; repeatable")
    c.add_argument("--prompt", help="one question; without it an interactive multi-turn session (or, with --image "
                   "and a --preset that has a prompt, as reader has, one reply to that prompt)")
    add_generation_options(c)
    add_preset_option(c)
    add_weight_options(c)
    c.add_argument("--compile", action="store_true", help="torch.compile the decode step (the first reply waits "
                   "for the compiler, the later ones are faster)")
    c.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every turn from scratch (default: reuse the earlier turns' KV cache)")
    c.add_argument("--verbose", action="store_true", help="after each reply: time to its first piece, tokens reused")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here; their own parsers read their arguments
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else "points"
    try:
        if argv and argv[0] in COMMANDS:
            return importlib.import_module(f"points.tooling.{COMMANDS[argv[0]][0]}").main(argv[1:])
        args = p.parse_args(argv)
        check_weight_options(c, args)
        return exit_code(lambda: _chat(args))
    except KeyboardInterrupt:  # one line, not a traceback; partial outputs were removed on the way out
        print(f"\npoints {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"points {name}: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
