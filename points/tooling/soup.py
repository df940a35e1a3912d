"""`points soup`: the weighted mean of several checkpoints of one architecture (a "model soup").

    points soup --output SOUP FT1 FT2 FT3 [--weights 0.5 0.25 0.25] [--dtype bfloat16]

Every input is checked before anything is written: a checkpoint directory (released layout or ours, all in
the same one), the same model config (every field the model is built from), the same tensor names, shapes
and dtypes, floating tensors only (a quantized checkpoint is refused: soup the float ones, then quantize). A
mismatch names the file and the tensor (or the config field) and writes nothing.

The mean is taken tensor by tensor, a block of rows at a time, straight from the inputs' memory maps:
each block accumulated in float64 (sum(w_i * x_i) / sum(w_i), equal weights by default) and rounded once to
the stored dtype (or --dtype, which config.json then records), written into its safetensors file as it is
made, and the input pages read for it dropped again. So memory holds one block (two float64 buffers of
32 MiB and its rounded copy) whatever the model's size, where the official `model_soup` holds every model
whole and sums them in bf16 (each addition rounded).

The output is a new directory in the inputs' layout: the first input's shard files and index (same file for
every tensor), its config.json (dtype updated with --dtype) and every other file beside them (tokenizer,
processor config, ...; sub-folders are not copied). Built in a hidden sibling and renamed when complete: an
interrupted soup leaves nothing at OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from points.errors import CheckpointError, WriteError
from points.io.atomic import partial_dir, stream_tensors, writing
from points.io.config import DTYPE_NAMES, read_config, to_dict
from points.io.progress import Progress
from points.tooling.options import add_progress_option, exit_code, progress_enabled

if TYPE_CHECKING:  # (imported where they run: `points soup --help` and a bad flag answer without torch)
    import torch

    from points.io.tensors import TensorFiles

BLOCK_BYTES = 32 << 20  # float64 bytes of accumulator per block of rows


def _check_inputs(inputs: list[Path]) -> list[TensorFiles]:
    """Open every input and check it against the first; CheckpointError naming the file and tensor."""
    from points.io.tensors import TensorFiles

    first = read_config(inputs[0])
    first_cfg, first_naming = first.model, first.naming
    opened = [TensorFiles(inputs[0])]
    base = opened[0]
    for name in sorted(base.names):
        if base.dtype(name) is None:
            raise CheckpointError(f"{base.where(name)}: tensor {name} is {base.dtype_name(name)}; a soup averages "
                                  "float checkpoints (soup the float ones, then quantize the soup)")
    for path in inputs[1:]:
        config = read_config(path)
        cfg, naming = config.model, config.naming
        if naming != first_naming:
            raise CheckpointError(f"{path}: its tensors are in the {naming!r} layout, {inputs[0]}'s in "
                                  f"{first_naming!r}; soup checkpoints of one layout (convert them first)")
        if cfg.member != first_cfg.member:
            raise CheckpointError(f"{path}: a {cfg.member} checkpoint, {inputs[0]} a {first_cfg.member} one; a soup "
                                  "needs one architecture")
        if cfg != first_cfg:
            a, b = to_dict(first_cfg), to_dict(cfg)
            part, field = next((part, k) for part in ("decoder", "vision") for k in a[part] if a[part][k] != b[part][k])
            keys = _differing_keys(inputs[0], path)
            raise CheckpointError(f"{path}/config.json: the {part}'s {field} (as points reads it) is "
                                  f"{b[part][field]!r}, {inputs[0]}'s {a[part][field]!r}"
                                  + (f" (config.json differs at {', '.join(keys)})" if keys else "")
                                  + "; a soup needs one architecture")
        files = TensorFiles(path)
        missing, extra = sorted(base.names - files.names), sorted(files.names - base.names)
        if missing:
            raise CheckpointError(f"{path}: has no tensor {missing[0]} (which {base.where(missing[0])} has)"
                                  + (f", nor {len(missing) - 1} other(s)" if len(missing) > 1 else ""))
        if extra:
            raise CheckpointError(f"{files.where(extra[0])}: tensor {extra[0]} is not in {inputs[0]}")
        for name in sorted(base.names):
            if files.shape(name) != base.shape(name):
                raise CheckpointError(f"{files.where(name)}: tensor {name} has shape {list(files.shape(name))}, "
                                      f"{base.where(name)} {list(base.shape(name))}")
            if files.dtype_name(name) != base.dtype_name(name):
                raise CheckpointError(f"{files.where(name)}: tensor {name} is {files.dtype_name(name)}, "
                                      f"{base.where(name)} {base.dtype_name(name)}; soup checkpoints of one dtype "
                                      "(convert them all with points convert --dtype first)")
        opened.append(files)
    return opened


def _differing_keys(a: Path, b: Path, most: int = 3) -> list[str]:
    """The first few keys (dotted, one level into llm_config / vision_config) whose values differ between two
    config.json files."""
    try:
        x, y = (json.loads((p / "config.json").read_text()) for p in (a, b))
    except (OSError, ValueError):
        return []
    out = []
    for k in sorted(set(x) | set(y)):
        if isinstance(x.get(k), dict) and isinstance(y.get(k), dict):
            out += [f"{k}.{j}" for j in sorted(set(x[k]) | set(y[k])) if x[k].get(j) != y[k].get(j)]
        elif x.get(k) != y.get(k):
            out.append(k)
    return out[:most]


def _weights(weights: list[float] | None, n: int) -> list[float]:
    """The weights as given (1 each by default), checked; the mean divides by their sum at the end."""
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"--weights: {len(weights)} given for {n} inputs; give one per input")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights {' '.join(map(str, weights))}: expected numbers >= 0 with a positive sum")
    return [float(w) for w in weights]


def _blocks(opened: list[TensorFiles], name: str, weights: list[float], dtype: torch.dtype, bar: Progress,
            buffers: dict):
    """The mean of tensor `name`, a block of rows at a time: sum(w_i * x_i) accumulated in float64, divided
    by sum(w_i) once (exact sums for equal or small integer weights: equal inputs stay themselves, inputs that
    cancel give 0), then rounded once to `dtype`. The blocks live in `buffers`, reused from block to block
    (fresh allocations would fault their pages in every time); each yielded block is only valid until the
    next one is asked for."""
    import torch

    from points.io.tensors import forget_pages

    total = math.fsum(weights)
    views = [files.get(name) for files in opened]  # memory maps: nothing read yet
    shape = views[0].shape
    if len(shape) == 0:
        views = [v.reshape(1) for v in views]
    row = max(1, math.prod(shape[1:]))
    step = max(1, BLOCK_BYTES // (8 * row))
    for lo in range(0, views[0].shape[0], step):
        blocks = [v[lo:lo + step] for v in views]
        n = blocks[0].numel()
        acc, part = (_buffer(buffers, key, n, torch.float64).view(blocks[0].shape) for key in ("acc", "part"))
        for k, (w, block) in enumerate(zip(weights, blocks)):
            if k == 0:
                acc.copy_(block).mul_(w)
            else:
                acc.add_(part.copy_(block), alpha=w)
            forget_pages(block)
        acc.div_(total)
        out = _buffer(buffers, ("out", dtype), n, dtype).view(blocks[0].shape).copy_(acc)
        bar.update(0, nbytes=out.nbytes)
        yield out


def _buffer(buffers: dict, key, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `n` elements of the reused buffer `key` (grown when needed)."""
    import torch

    if key not in buffers or buffers[key].numel() < n:
        buffers[key] = torch.empty(n, dtype=dtype)
    return buffers[key][:n]


def soup(inputs: list[str | Path], output: str | Path, *, weights: list[float] | None = None,
         dtype: str | None = None, progress: bool | None = None) -> Path:
    """Write the weighted mean of the checkpoints `inputs` to the new directory `output` (see the module's
    docstring); returns it."""
    from points.io.checkpoint import DTYPES

    inputs, output = [Path(p) for p in inputs], Path(output)
    if len(inputs) < 2:
        raise ValueError(f"points soup: {len(inputs)} input(s); a soup needs two checkpoints or more")
    if output.exists():
        raise CheckpointError(f"{output}: already exists; a soup never overwrites (remove it or pick another path)")
    for p in inputs:
        if p.resolve() == output.resolve():
            raise CheckpointError(f"{output}: is also an input")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    w = _weights(weights, len(inputs))
    opened = _check_inputs(inputs)
    base, first = opened[0], inputs[0]
    out_dtype = {name: DTYPES[dtype] if dtype else base.dtype(name) for name in base.names}
    by_file: dict[str, list[str]] = {}
    for name in sorted(base.names):
        by_file.setdefault(base.file_of(name), []).append(name)
    total = sum(math.prod(base.shape(n)) * out_dtype[n].itemsize for n in base.names)
    tmp = None
    try:
        with partial_dir(output) as tmp:
            with writing(tmp):
                tmp.mkdir(parents=True)
            bar = Progress(f"soup of {len(inputs)}", len(base.names), unit="tensors", total_bytes=total,
                           enabled=progress)
            buffers = {}
            for file, names in by_file.items():
                specs = [(n, out_dtype[n], base.shape(n)) for n in names]

                def pieces(names=names):
                    for n in names:
                        yield from _blocks(opened, n, w, out_dtype[n], bar, buffers)
                        bar.update()

                stream_tensors(tmp / file, specs, pieces(), base.metadata(file))
            bar.close()
            _carry(first, tmp, dtype, total, base)
            os.rename(tmp, output)
    except WriteError as e:
        where = Path(e.path)
        if tmp is not None and where.is_relative_to(tmp):
            where = output / where.relative_to(tmp)
        raise WriteError(where, e, f"; nothing was left at {output}") from None
    return output


def _carry(first: Path, tmp: Path, dtype: str | None, total: int, base: TensorFiles) -> None:
    """The first input's other files into `tmp`: its index (the same shards) and config (dtype updated)."""
    from points.io.tensors import INDEX, SINGLE

    for entry in sorted(first.iterdir()):
        name = entry.name
        if not entry.is_file() or name.endswith(".safetensors") or name == INDEX:
            continue
        with writing(tmp / name):
            if name == "config.json" and dtype is not None:
                config = json.loads(entry.read_text())
                config["dtype" if config.get("format") == "points" else "torch_dtype"] = dtype
                (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copyfile(entry, tmp / name)
    if (first / INDEX).is_file():
        index = json.loads((first / INDEX).read_text())
        metadata = index.get("metadata")
        index["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "total_size": total}
        with writing(tmp / INDEX):
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    elif not (tmp / SINGLE).is_file():
        raise CheckpointError(f"{first}: no {SINGLE} or {INDEX}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="points soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="checkpoint directories (two or more)")
    p.add_argument("--output", required=True, type=Path, help="the new checkpoint directory")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one per input, >= 0, normalized to sum 1 (default: equal)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="default: each tensor's stored dtype")
    add_progress_option(p)
    args = p.parse_args(argv)
    if len(args.inputs) < 2:
        p.error(f"{len(args.inputs)} input given; a soup needs two checkpoints or more")

    def run() -> int:
        out = soup(args.inputs, args.output, weights=args.weights, dtype=args.dtype, progress=progress_enabled(args))
        print(f"points soup: {len(args.inputs)} checkpoints -> {out}", file=sys.stderr)
        return 0

    return exit_code(run)
