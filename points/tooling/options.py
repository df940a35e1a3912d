"""The command-line options several commands share, declared once (`points chat`, `run`, `convert`,
`bench`), and the checks that go with them.

    add_weight_options(p)             # --dtype, --quantize, --quantize-lm-head (and --device unless device=None)
    add_generation_options(p)         # --max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --seed
    args = p.parse_args(argv); check_weight_options(p, args)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from points.errors import WriteError
from points.io.config import DTYPE_NAMES
from points.io.quantized import SCHEMES


def add_weight_options(p: argparse.ArgumentParser, *, device: str | None = "cpu", dtype: str | None = None,
                       device_help: str = "") -> None:
    """--device (default `device`; None: no such option), --dtype (default `dtype`, None = the checkpoint's),
    --quantize and --quantize-lm-head."""
    if device is not None:
        p.add_argument("--device", default=device, help=f"{device_help}(default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=dtype,
                   help="default: %(default)s" if dtype else "default: the checkpoint's")
    p.add_argument("--quantize", choices=list(SCHEMES), default=None,
                   help="weight-only int8 decoder projections (per-channel scales; a checkpoint converted with "
                        "--quantize is quantized already)")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head too")


def check_weight_options(p: argparse.ArgumentParser, args) -> None:
    if args.quantize_lm_head and not args.quantize:
        p.error("--quantize-lm-head needs --quantize int8")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The generation options `points chat` and `points run` share (defaults shown in --help)."""
    p.add_argument("--max-new-tokens", type=int, default=1024, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s = off)")
    p.add_argument("--top-k", type=int, default=0, help="default: %(default)s = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="default: %(default)s = off")
    p.add_argument("--seed", type=int, default=None, help="for sampling (default: none)")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """--progress auto|on|off (`points run`, `score`, `soup`); `progress_enabled` reads it."""
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="the progress line (auto: when stderr is a terminal)")


def progress_enabled(args) -> bool | None:
    """--progress as `Progress(enabled=)`: None (auto), True or False."""
    return {"auto": None, "on": True, "off": False}[args.progress]


def check_image(flag: str, path: str) -> None:
    """Raises a ValueError naming the flag and the path unless `path` is an image the processor can read
    (`points chat --image` and `/image`, `points demo --image`, `points explain --image`: checked before
    anything loads)."""
    from points.io.processor import open_image

    try:
        open_image(path)
    except ValueError as e:
        raise ValueError(f"{flag} {e}") from None


def generation_kwargs(args) -> dict:
    """The generation options as `Pipeline.chat`'s keywords."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def exit_code(run: Callable[[], int]) -> int:
    """run()'s exit code, or the command line's one for what it raises, said in one line on stderr: bad input
    (a ValueError: CheckpointError, RunError, OutputError, ...) 2; a file that cannot be written (WriteError) 1."""
    try:
        return run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
