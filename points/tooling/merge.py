"""`points merge MODEL ADAPTER OUT`: a LoRA adapter folded into its base, written as a whole checkpoint in the
base's own layout (released in, released out: the official code loads it).

    points merge POINTS-1-5/ runs/lora/ POINTS-1-5-tuned/

Every tensor of MODEL is written under its own name and dtype: the ones the adapter changes as W + (alpha / r)
B A (computed in float32, rounded once to the stored dtype, split back into the layout's pieces: a fused
[q; k; v] into q_proj / k_proj / v_proj or the released interleaved key_value_dense, [up; gate] likewise), every
other one copied as it is stored (bit for bit, the tensors POINTS never runs included). config.json, the
tokenizer and processor files are copied. Atomic: written into a temporary sibling, renamed when complete.
`write_model` is the same writer for a fully fine-tuned model (`points finetune --full`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from points.errors import CheckpointError, WriteError
from points.io.atomic import MAX_SHARD_BYTES, by_size, partial_dir, write_shards, writing
from points.io.config import read_config
from points.io.progress import Progress
from points.tooling.options import add_progress_option, exit_code, progress_enabled

if TYPE_CHECKING:
    import torch


def _write_like(src: Path, folder: Path, replaced: dict[str, torch.Tensor], progress: bool | None) -> None:
    """MODEL's tensors into `folder` (which exists), those of our parameters in `replaced` (our names, any
    float dtype) in their new values, the rest copied; the index, config.json and the carried files."""
    from points.io.checkpoint import CARRIED_FILES
    from points.io.names import plan
    from points.io.tensors import INDEX, TensorFiles

    config = read_config(src)
    if config.model.decoder.tied:
        _check_tied(src, replaced)
    files = TensorFiles(src)
    entries = plan(config.model, config.naming, config.quantization)
    new = {}
    for e in entries:
        if e.target in replaced:
            pieces = e.layout.split(replaced[e.target].float(), e.source_shapes)
            for name, t in zip(e.sources, pieces):
                new[name] = t.to(files.dtype(name) or t.dtype).contiguous()
    if set(replaced) - {e.target for e in entries}:
        raise CheckpointError(f"{src}: has no tensors for {sorted(set(replaced) - {e.target for e in entries})[:3]}")
    names = sorted(files.names)
    bar = Progress(f"writing {folder.name}", len(names), unit="tensors", enabled=progress)

    def tensors():
        for name in names:
            t = new.get(name)
            if t is None:
                t = files.get(name)
            bar.update()
            yield name, t

    weight_map = write_shards(by_size(tensors(), MAX_SHARD_BYTES), folder, metadata={"format": "pt"})
    bar.close()
    size = sum(files.get(n).nbytes for n in names)
    with writing(folder / INDEX):
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))
    for name in ("config.json", *CARRIED_FILES):
        if (src / name).is_file():
            with writing(folder / name):
                shutil.copyfile(src / name, folder / name)


def _check_tied(src: Path, replaced: dict[str, torch.Tensor]) -> None:
    """MODEL's decoder is tied (config.json: the head is the embedding matrix, stored once), so new values for
    both must be one matrix: written, either would silently replace the other."""
    import torch

    embed, head = replaced.get("decoder.embed.weight"), replaced.get("decoder.lm_head.weight")
    if embed is not None and head is not None and not (embed.shape == head.shape and torch.equal(embed, head)):
        raise CheckpointError(f"{src}: its decoder is tied (lm_head is the embedding matrix, one tensor), but "
                              "decoder.embed.weight and decoder.lm_head.weight differ: written, one would silently "
                              "replace the other. Train them as the one Parameter a tied decoder holds "
                              "(lm_head.weight is embed.weight)")


def merge(model: str | Path, adapter: str | Path, out: str | Path, *, progress: bool | None = None) -> Path:
    """The adapter at `adapter` folded into the checkpoint at `model`, written to `out` (which must not
    exist). The adapter is checked against the base (points.runtime.lora.load_adapter) first."""
    import points
    from points.runtime.lora import lora_layers

    model, out = Path(model), Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; merging never overwrites (remove it or pick another OUT)")
    pipe = points.load(model, progress=False, prefix_cache=False, adapter=adapter)
    replaced = {f"{name}.weight": layer.merged_weight() for name, layer in lora_layers(pipe.model).items()}
    tmp = None
    try:
        with partial_dir(out) as tmp:
            with writing(tmp):
                tmp.mkdir(parents=True)
            _write_like(model, tmp, replaced, progress)
            os.rename(tmp, out)
    except WriteError as e:
        where = Path(e.path)
        if tmp is not None and where.is_relative_to(tmp):
            where = out / where.relative_to(tmp)
        raise WriteError(where, e, f"; nothing was left at {out}") from None
    return out


def write_model(model, src: Path, out: Path, progress: bool | None = None, state: dict | None = None) -> None:
    """A fine-tuned POINTSModel's weights (or `state`, its parameters by name, gathered from shards) written
    into `out` (an existing directory) in the layout of the checkpoint `src` it was loaded from: the files go
    into a temporary folder inside `out`, then are moved in, config.json last. A tied decoder's head is its
    embedding (one Parameter, written once); a model whose two differ is refused (CheckpointError, nothing
    left in `out`)."""
    state = state if state is not None else {n: p.detach() for n, p in model.named_parameters()}
    tmp = out / f".model.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp):
            tmp.mkdir(parents=True)
        _write_like(Path(src), tmp, state, progress)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            with writing(out / f.name):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="points merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the base checkpoint directory the adapter was trained on")
    p.add_argument("adapter", type=Path, help="the adapter directory (`points finetune`'s --output)")
    p.add_argument("out", type=Path, help="the new checkpoint directory")
    add_progress_option(p)
    args = p.parse_args(argv)

    def run() -> int:
        out = merge(args.model, args.adapter, args.out, progress=progress_enabled(args))
        print(f"points merge: {args.adapter} into {args.model} -> {out}", file=sys.stderr)
        return 0

    return exit_code(run)
