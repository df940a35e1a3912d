"""The command-line options several commands share, declared once (`points chat`, `run`, `convert`,
`bench`), and the checks that go with them.

    add_weight_options(p)             # --dtype, --quantize, --quantize-lm-head, --group-size, --symmetric (and --device)
    add_generation_options(p)         # --max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --seed
    add_preset_option(p)              # --preset NAME (a preset of the checkpoint's family member)
    args = p.parse_args(argv); check_weight_options(p, args)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from points.errors import WriteError
from points.io.config import DTYPE_NAMES
from points.io.quantized import INT4_GROUP, INT4_GROUPS, SCHEMES


def add_weight_options(p: argparse.ArgumentParser, *, device: str | None = "cpu", dtype: str | None = None,
                       device_help: str = "") -> None:
    """--device (default `device`; None: no such option), --dtype (default `dtype`, None = the checkpoint's),
    and the quantize options (`add_quantize_options`)."""
    if device is not None:
        p.add_argument("--device", default=device, help=f"{device_help}(default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=dtype,
                   help="default: %(default)s" if dtype else "default: the checkpoint's")
    add_quantize_options(p)


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    """--quantize, --quantize-lm-head, --group-size, --symmetric (checked by check_weight_options)."""
    p.add_argument("--quantize", choices=list(SCHEMES), default=None,
                   help="weight-only decoder projections: int8 (a scale per output channel) or int4 (a scale and "
                        "an offset per group of inputs); a checkpoint converted with --quantize is quantized already")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head too")
    p.add_argument("--group-size", type=int, choices=list(INT4_GROUPS), default=None,
                   help=f"with --quantize int4: inputs per scale (default {INT4_GROUP})")
    p.add_argument("--symmetric", action="store_true", default=None,
                   help="with --quantize int4: a scale per group and no offset")


def check_weight_options(p: argparse.ArgumentParser, args) -> None:
    if args.quantize_lm_head and not args.quantize:
        p.error("--quantize-lm-head needs --quantize int8 or int4")
    for flag, value in (("--group-size", args.group_size), ("--symmetric", args.symmetric)):
        if value is not None and args.quantize != "int4":
            p.error(f"{flag} needs --quantize int4")


def quantize_record(args) -> dict:
    """The weight options as a journal's or a report's settings record them (int4's only where given, so that
    a journal written before they existed still matches)."""
    extra = {k: v for k, v in (("group_size", args.group_size), ("symmetric", args.symmetric)) if v is not None}
    return {"quantize": args.quantize, "quantize_lm_head": bool(args.quantize_lm_head)} | extra


def quantize_options(args) -> dict:
    """The weight options as `points.load` / `points.convert` keywords (None where not given)."""
    return {"quantize": args.quantize, "quantize_lm_head": args.quantize_lm_head or None,
            "quantize_group_size": args.group_size, "quantize_symmetric": args.symmetric}


GENERATION_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                      "speculative")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The generation options `points chat` and `points run` share (defaults shown in --help: GenerationConfig's,
    or the --preset's). An option not given stays None, so that a preset's setting is not overridden."""
    p.add_argument("--max-new-tokens", type=int, help="default: 1024")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: 0.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: 1.0 = off)")
    p.add_argument("--top-k", type=int, help="default: 0 = off")
    p.add_argument("--min-p", type=float, help="keep the tokens at least this times as likely as the most likely "
                                               "one (default: 0.0 = off)")
    p.add_argument("--repetition-penalty", type=float, help="default: 1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="for sampling (default: none)")
    p.add_argument("--speculative", default=None, metavar="ngram[:K]",
                   help="speculative decoding: K tokens (default 4) drafted from n-gram matches in the prompt and "
                        "the output, verified in one forward; the same output (default: off)")


def add_prefill_option(p: argparse.ArgumentParser) -> None:
    """--max-prefill-tokens, `points serve`'s and `points run`'s (the default is the scheduler's
    MAX_PREFILL_TOKENS, written out: --help runs without importing torch)."""
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens one step prefills: prompts admitted together share one forward, a longer one "
                        "is prefilled in chunks between the running requests' tokens (default: %(default)s)")


def add_preset_option(p: argparse.ArgumentParser, text: str = "") -> None:
    """--preset NAME: one of the checkpoint's member's presets (points.model.family); `check_preset` checks it."""
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a preset of the checkpoint's model (POINTS-Reader: reader, POINTS-GUI-G: gui): its system "
                        "turn, its prompt for a turn of images only, and its decoding settings as the defaults (a "
                        "setting given still wins)" + text)


def check_preset(model: str, name: str | None):
    """The preset `name` of the checkpoint at `model` (its member read from config.json, before anything loads),
    None for None; a ValueError naming --preset when the checkpoint's member has no such preset."""
    if name is None:
        return None
    from points.io.chat import PresetError, preset_of
    from points.io.config import read_config

    try:
        return preset_of(read_config(model).member, name)
    except PresetError as e:
        raise ValueError(f"--preset {e.name}: {e.reason}") from None


def add_job_options(p: argparse.ArgumentParser) -> None:
    """What every command on the dataset machinery takes after its own options (`points run`, `ocr`, `eval`):
    the weight options with a device per torchrun process, --compile and --progress."""
    add_weight_options(p, device_help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) ")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    add_progress_option(p)


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
    """The generation options given, as `Pipeline.chat`'s keywords (those not given are left to the preset's
    defaults and GenerationConfig's)."""
    return {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name) is not None}


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
