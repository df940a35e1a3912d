"""From checkpoint files to our state dict and back: `load_state_dict` (used by `points.load`) and `convert`
(`points convert`), both walking the one plan of points.io.names, so the two can never disagree.

    read_config(dir) (points.io.config, once) -> TensorFiles (points.io.tensors: every header checked) ->
    plan(...) + check(...) (points.io.names: every tensor planned, every shape agreed) -> our tensors

Reading: a tensor that needs no cast and no re-layout is used in place on the CPU: the parameter *is* a view
of the mapped file (so the file must not change while the model is alive). Everything else (the released
query and interleaved K/V rows joined into our q/k/v, a dtype cast, a move to the GPU) is written once into a
fresh tensor of the final dtype on the final device, and the map's pages it was copied from are dropped.
Any failure raises `CheckpointError`, before any tensor data is read where the headers can tell.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

from points.errors import CheckpointError, WriteError
from points.io.atomic import MAX_SHARD_BYTES, partial_dir, write_shards, writing
from points.io.config import DTYPE_NAMES, CheckpointConfig, read_config, to_dict
from points.io.names import Entry, Same, check, plan, quantized_weights, unread
from points.io.progress import Progress
from points.io.quantized import check_scheme, describe_asked, quantize_weight
from points.io.tensors import INDEX, TensorFiles, forget_pages
from points.model.config import ModelConfig
from points.model.family import member

# Non-weight files a checkpoint directory may carry that a converted directory keeps.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "added_tokens.json", "preprocessor_config.json", "generation_config.json",
                 "chat_template.json", "chat_template.jinja")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the dtypes we run


# --------------------------------------------------------------------------- reading tensor files

# --------------------------------------------------------------------------- building our tensors

def resolve_dtype(dtype: torch.dtype | str | None, files: TensorFiles, entries: list[Entry]) -> torch.dtype:
    """None keeps the checkpoint's dtype (that of its embedding)."""
    if dtype is None:
        found = files.dtype(entries[0].sources[0])
        return torch.float32 if found == torch.float64 else found
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."), dtype)
    if dtype not in DTYPES.values():
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    return dtype


def _open(config: CheckpointConfig) -> tuple[TensorFiles, list[Entry]]:
    """The directory's tensor files, and the plan checked against their headers."""
    files = TensorFiles(config.directory)
    entries = plan(config.model, config.naming, config.quantization)
    check(entries, files, config.absent, unread(config.model, config.naming))
    return files, entries


def _built(entries: list[Entry], files: TensorFiles, dtype: torch.dtype, device: torch.device,
           quantization: dict | None = None,
           to_quantize: frozenset[str] = frozenset()) -> Iterator[tuple[Entry, dict[str, torch.Tensor]]]:
    """Our tensor for each entry, in `dtype` on `device`, in order. On the CPU a tensor that is its source
    unchanged (same dtype, no re-layout) is the mapped source itself; every other tensor is written once
    into fresh memory, after which the map's pages of its sources are dropped (they would otherwise stay
    resident beside the copy for as long as the map lives). A second entry built the same way from the same
    source (a tied head: the embedding) gets the very tensor the first got, no copy. A file's handle is let go
    after the last entry that reads it. Each entry comes with {our name: tensor}: itself, or, for a weight
    named in `to_quantize` (a float checkpoint quantized as it is read), the tensors `quantization` stores it as
    (points.io.quantized.quantize_weight: codes, scale, offset); its float tensor is let go at once (a view's
    pages dropped), so a model quantized while it is read never holds its float weights whole."""
    last = {}
    for i, e in enumerate(entries):
        for name in e.sources:
            last[files.file_of(name)] = i
    viewed = set()  # sources handed out as views of the map (their pages are kept)
    made = {}  # (sources, shape, dtype) of a plain (`Same`) entry -> the tensor it got
    for i, e in enumerate(entries):
        want = e.dtype or dtype
        stored = e.dtype or files.dtype(e.sources[0])  # (check() saw the codes' dtype there)
        key = (e.sources, e.shape, want) if isinstance(e.layout, Same) else None
        quantized = e.target in to_quantize
        if key in made:
            t = made[key]
        elif e.layout.view and device.type == "cpu" and stored == want and e.sources[0] not in viewed:
            t = files.get(e.sources[0]).reshape(e.shape)
            if quantized:  # (its float numbers are read once, here: drop the pages after)
                yield e, _stored_as(e.target, t, quantization)
                forget_pages(t)
                t = None
            else:
                viewed.add(e.sources[0])
                made[key] = t
        else:
            t = torch.empty(e.shape, dtype=want, device=device)
            sources = [files.get(name) for name in e.sources]
            e.layout.join(sources, t)
            for name, src in zip(e.sources, sources):
                if name not in viewed:
                    forget_pages(src)
            del sources
            if key is not None and not quantized:
                made[key] = t
        if t is not None:
            yield e, (_stored_as(e.target, t, quantization) if quantized else {e.target: t})
        del t
        for f, end in last.items():
            if end == i:
                files.release(f)


def _stored_as(target: str, weight: torch.Tensor, quantization: dict) -> dict[str, torch.Tensor]:
    module = target.removesuffix("weight")
    return {module + suffix: t for suffix, t in quantize_weight(weight, quantization).items()}


# --------------------------------------------------------------------------- load and convert

def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """A small matmul in `dtype` on `device`; CheckpointError when the device cannot run it (e.g. bfloat16
    on a GPU without bf16 support), before any weight is read."""
    try:
        torch.nn.functional.linear(torch.ones(2, 8, dtype=dtype, device=device), torch.ones(4, 8, dtype=dtype, device=device))
    except (RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"dtype {str(dtype).removeprefix('torch.')} cannot run matmuls on {device} "
                              f"({str(e).splitlines()[0]}); choose another dtype") from None


def load_state_dict(source: str | Path | CheckpointConfig, *, parts: tuple[str, ...] = ("decoder", "vision", "projector"),
                    dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                    progress: bool | None = None,
                    quantize: dict | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our state dict (names `decoder.*`, `vision.*`, `projector.*`, PyTorch's usual contiguous layout) for
    the requested parts.

    The whole checkpoint is checked from its headers first; only the requested parts are read. On the CPU,
    tensors already in our layout and in `dtype` are views of the mapped files (zero copy); the rest is
    written once into its final dtype on `device` and the map's pages it came from are dropped, so the
    peak is the model plus one tensor's sources in flight. `source`: the directory, or its config already read.
    quantize (points.io.quantized.describe's dict, of a float checkpoint): the scheme's weights come quantized
    as they are read (`<name>.weight` codes, `<name>.scale`, int4's `<name>.offset`, as a checkpoint stored
    quantized gives them)."""
    config = source if isinstance(source, CheckpointConfig) else read_config(source)
    files, entries = _open(config)
    dtype = resolve_dtype(dtype, files, entries)
    device = torch.device(device)
    check_dtype_runs(dtype, device)
    chosen = [e for e in entries if e.target.split(".", 1)[0] in parts]
    bar = Progress(f"loading {config.directory.name}", len(chosen), unit="tensors",
                   total_bytes=sum(_nbytes(e.shape, e.dtype or dtype) for e in chosen), enabled=progress)
    if quantize is not None:
        check_scheme(quantize["scheme"])
        if config.quantization:
            raise CheckpointError(f"{config.directory}: already quantized ({config.quantization['scheme']})")
    to_quantize = frozenset(quantized_weights(config.model, quantize))
    state = {}
    for e, tensors in _built(chosen, files, dtype, device, quantize, to_quantize):
        state.update(tensors)
        bar.update(nbytes=_nbytes(e.shape, e.dtype or dtype))
    bar.close()
    return config.model, state


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     naming: str | None = None) -> dict[str, torch.Tensor]:
    """Our state dict back into a released naming (the exact inverse of loading); None: the member's own. A tied
    head is the embedding, written once: a state whose two differ is refused (one would be lost)."""
    out, by = {}, {}
    naming = naming or member(cfg.member).naming
    for e in plan(cfg, naming):
        if e.target not in state:
            continue
        if out.keys() >= set(e.sources):  # (tied: the head is the embedding, written already)
            if not torch.equal(state[e.target], state[by[e.sources[0]]]):
                raise CheckpointError(f"{e.target} differs from {by[e.sources[0]]}, but the model is tied (both are "
                                      f"{e.sources[0]} in the {naming!r} layout); tie them, or write an untied model")
            continue
        out.update(zip(e.sources, (t.contiguous() for t in e.layout.split(state[e.target], e.source_shapes))))
        by.update(dict.fromkeys(e.sources, e.target))
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | str | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool | None = None, quantize: str | None = None,
            quantize_lm_head: bool = False, quantize_group_size: int | None = None,
            quantize_symmetric: bool | None = None) -> Path:
    """Write the checkpoint at `src` (any supported layout) into our layout at `dst`: safetensors shards
    of at most `max_shard_bytes`, their index, our config.json, and the tokenizer / processor files.

    quantize="int8" or "int4": the decoder's projections (and lm_head with quantize_lm_head) are written in
    that scheme (points.io.quantized: int8 with a `.scale` per output; int4 in groups of quantize_group_size,
    32 / 64 / 128, default 128, with a `.scale` and, unless quantize_symmetric, an `.offset` per group), the
    scheme recorded in config.json; loading maps them as they are. A checkpoint that is already quantized is
    refused (quantize once, from float weights).

    Atomic: everything is written into a temporary sibling directory that is renamed to `dst` only when
    complete; on any failure it is removed and `dst` does not exist."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; converting never overwrites (remove it or pick another DST)")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes!r}: expected an integer >= 1")
    asked = describe_asked(quantize, quantize_lm_head, quantize_group_size, quantize_symmetric)
    config = read_config(src)
    cfg, stored = config.model, config.quantization
    files, entries = _open(config)
    if quantize and stored:
        raise CheckpointError(f"{src}: already quantized ({stored['scheme']}); convert from the float checkpoint "
                              "instead (quantizing twice would only add error)")
    quantization = asked or stored
    to_quantize = set(quantized_weights(cfg, quantization)) if quantize else set()
    tmp = None
    try:
        with partial_dir(dst) as tmp:
            _write_converted(src, tmp, config, files, entries, dtype, max_shard_bytes, progress, quantization,
                             to_quantize)
            os.rename(tmp, dst)
    except WriteError as e:  # a full disk, a read-only folder: the partial folder is gone by now
        where = Path(e.path)
        if tmp is not None and where.is_relative_to(tmp):
            where = dst / where.relative_to(tmp)
        raise WriteError(where, e, f"; nothing was left at {dst}") from None
    return dst


def _write_converted(src: Path, tmp: Path, config: CheckpointConfig, files: TensorFiles, entries: list[Entry],
                     dtype, max_shard_bytes: int, progress: bool | None, quantization: dict | None,
                     to_quantize: set) -> None:
    """`convert`'s files, written into the folder `tmp` (raises WriteError naming the file that failed)."""
    cfg = config.model
    dtype = resolve_dtype(dtype, files, entries)
    # our names that the written layout reads from another tensor (a tied head: the embedding, written once)
    stored_once = {e.target for e in plan(cfg, "points", quantization) if e.sources != (e.target,) and e.dtype is None}
    entries = [e for e in entries if e.target not in stored_once]
    shards = _shard(entries, dtype, max_shard_bytes)
    total = sum(_nbytes(e.shape, e.dtype or dtype) for e in entries)
    with writing(tmp):
        tmp.mkdir(parents=True)
    bar = Progress(f"converting {src.name}", len(entries), unit="tensors", total_bytes=total, enabled=progress)
    built = _built(entries, files, dtype, torch.device("cpu"), quantization, frozenset(to_quantize))

    def tensors_of(shard):  # one shard's tensors in memory at a time
        tensors = {}
        for _ in shard:
            e, made = next(built)
            bar.update(nbytes=_nbytes(e.shape, e.dtype or dtype))
            tensors.update(made)
        return tensors

    weight_map = write_shards((tensors_of(shard) for shard in shards), tmp, len(shards), {"format": "pt"})
    bar.close()
    size = sum(_nbytes(e.shape, e.dtype or dtype) for e in plan(cfg, "points", quantization)
               if e.target not in stored_once)
    written = to_dict(cfg) | {"dtype": str(dtype).removeprefix("torch.")}
    if not config.image_token_stated:  # (a release leaves it to its tokenizer: so does the converted copy)
        del written["image_token_id"]
    if quantization:
        written["quantization"] = quantization
    for name, text in ((INDEX, json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1)),
                       ("config.json", json.dumps(written, indent=2))):
        with writing(tmp / name):
            (tmp / name).write_text(text)
    for name in CARRIED_FILES:
        if (src / name).is_file():
            with writing(tmp / name):
                shutil.copyfile(src / name, tmp / name)


def _shard(entries: list[Entry], dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    shards, size = [[]], 0
    for e in entries:
        n = _nbytes(e.shape, e.dtype or dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards
