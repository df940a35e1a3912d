"""Checkpoint files: the one mapping between the released POINTS-1.5 tensors and ours, loading and converting.

The only file that knows the reference's state-dict names. One plan (a list of `Entry`) describes, for
every parameter of ours, which checkpoint tensors make it, their expected shapes and how they are laid out
(`Layout`: both directions). `load_state_dict` (used by `points.load`) and `convert` (used by
`points convert` / `weights_convert.py`) both walk that plan, so the two can never disagree.

Namings read:
- 'custom_llama': the released 7B checkpoint. `llm.lm.layers.N.attention.query_dense`,
  `attention.key_value_dense` (K and V interleaved per KV head: [K_0; V_0; K_1; V_1; ...]),
  `attention.dense`, `mlp.dense_h_to_4h` (rows [up; gate]), `mlp.dense_4h_to_h`, `llm.lm.embed_in`,
  `llm.lm.final_layer_norm`, `llm.embed_out`.
- 'qwen2': later POINTS releases (`llm.model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `llm.lm_head`).
- 'qwen3': POINTS-GUI-G, the Qwen2 names plus `self_attn.q_norm` / `self_attn.k_norm` (and no q/k/v bias).
- 'points': our own layout, as written by `convert` (names = our module names, nothing re-laid).
Vision tensors (`vision_encoder.*`, `vision_projector.*`) are named alike in both released namings.

Reading: safetensors' own reader (`safe_open`) maps every file. A tensor that needs no cast and no
re-layout is used in place on the CPU: the parameter *is* a view of the mapped file (so the file must not
change while the model is alive). Everything else (the released query and interleaved K/V rows joined
into our q/k/v, a dtype cast, a move to the GPU) is written once into a fresh tensor of the final dtype on the final device, and
the map's pages it was copied from are dropped.

Strictness: before any tensor data is read, every planned source must exist with its exact shape and a
floating dtype, and every tensor in the files must be planned or explicitly dropped (the unused
`vision_encoder.merger.*`, rotary `inv_freq` buffers). Any failure raises `CheckpointError`.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from einops import rearrange
from safetensors import SafetensorError, safe_open

from points.errors import CheckpointError, WriteError
from points.io.atomic import MAX_SHARD_BYTES, partial_dir, write_shards, writing
from points.io.config import DTYPE_NAMES, absent_shape_fields, read_config, read_quantization, to_dict
from points.io.progress import Progress
from points.io.quantized import check_scheme, quantize_int8, quantized_modules
from points.model.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Non-weight files a checkpoint directory may carry that a converted directory keeps.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "added_tokens.json", "preprocessor_config.json", "generation_config.json",
                 "chat_template.json", "chat_template.jinja")
DROPPED_PREFIXES = ("vision_encoder.merger.",)  # Qwen2-VL's own merger: built, never run by POINTS
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")  # recomputed, never needed
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the dtypes we run
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# --------------------------------------------------------------------------- reading tensor files

class TensorFiles:
    """The tensors of a checkpoint directory (one `model.safetensors`, or an index and its shards), read
    through safetensors' `safe_open`: every header is read and validated at once (names, shapes, dtypes,
    truncation). `get` returns a tensor as a view of its file's memory map, without copying."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to file "
                                      "names")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = {}, [SINGLE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX} found")
        self._open = {}  # file -> safe_open handle (holds the file's map)
        self._file = {}  # tensor name -> file
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
            try:
                self._open[f] = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                                      "is it truncated or still downloading?") from None
            self._file.update(dict.fromkeys(self._open[f].keys(), f))
        for name, f in weight_map.items():
            if self._file.get(name) != f:
                raise CheckpointError(f"{self.directory / f}: tensor {name} is listed there by {INDEX} "
                                      "but the shard does not hold it")

    @property
    def names(self) -> set[str]:
        return set(self._file)

    def _slice(self, name: str):
        return self._open[self._file[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of a floating tensor; None for any other (integer, bool, fp8) tensor."""
        return _SAFETENSORS_DTYPES.get(self.dtype_name(name))

    def get(self, name: str) -> torch.Tensor:
        """The tensor, a view of its file's memory map (nothing is read until it is used)."""
        return self._open[self._file[name]].get_tensor(name)

    def where(self, name: str) -> Path:
        return self.directory / self._file[name]

    def file_of(self, name: str) -> str:
        return self._file[name]

    def metadata(self, file: str) -> dict[str, str] | None:
        """The `__metadata__` of one of the files (e.g. {"format": "pt"})."""
        return self._open[file].metadata()

    def release(self, file: str) -> None:
        """Let go of a file's handle (its map lives on only as long as a tensor views it)."""
        self._open.pop(file, None)


def forget_pages(t: torch.Tensor) -> None:
    """`t` is a view of a file's memory map whose bytes have been copied and will not be read again: drop the
    map's pages that lie wholly inside it, so that they stop counting as this process's resident memory
    (the file is untouched; a later read would fault them in again). A no-op where madvise is unavailable."""
    lo = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (t.data_ptr() + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo and _madvise is not None:
        _madvise(lo, hi - lo, mmap.MADV_DONTNEED)


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError, TypeError):
        return None
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise()


# --------------------------------------------------------------------------- the plan

class Layout:
    """How one of our tensors is laid out from its checkpoint tensors. Every layout acts on dim 0 (rows),
    so the same one serves a Linear's weight [rows, in] and its bias [rows]."""

    view = False  # our tensor is a view of the single source (no copy needed when dtype and device agree)

    def join(self, sources: list[torch.Tensor], out: torch.Tensor) -> None:
        """Write the sources into `out` (casting to its dtype, moving to its device), re-laid."""
        raise NotImplementedError

    def split(self, t: torch.Tensor, source_shapes: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
        """Our tensor -> the checkpoint tensors (the exact inverse of join)."""
        raise NotImplementedError


class Same(Layout):
    """The source itself, reshaped (e.g. the Conv3d patch kernel [E, C, T, P, P] read as a Linear [E, C*T*P*P])."""

    view = True

    def join(self, sources, out):
        out.copy_(sources[0].reshape(out.shape))

    def split(self, t, source_shapes):
        return [t.reshape(source_shapes[0])]


class Stacked(Layout):
    """Our rows are the sources' rows, stacked in order (Qwen2 naming: q; k; v and up; gate)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes

    def join(self, sources, out):
        for part, src in zip(out.split(self.sizes), sources):
            part.copy_(src)

    def split(self, t, source_shapes):
        return list(t.split(self.sizes))


class QueryAndInterleavedKV(Layout):
    """(query_dense, key_value_dense) <-> our [q; k; v]. key_value_dense's rows are, per KV head g,
    K_g (head_dim rows) then V_g (head_dim rows); ours hold every K head, then every V head."""

    def __init__(self, q_rows: int, head_dim: int):
        self.q_rows, self.head_dim = q_rows, head_dim

    def join(self, sources, out):
        q, kv = sources
        out[:self.q_rows].copy_(q)
        ours = rearrange(out[self.q_rows:], "(kv g d) ... -> kv g d ...", kv=2, d=self.head_dim)
        ours.copy_(rearrange(kv, "(g kv d) ... -> kv g d ...", kv=2, d=self.head_dim))

    def split(self, t, source_shapes):
        q, kv = t[:self.q_rows], t[self.q_rows:]
        return [q, rearrange(kv, "(kv g d) ... -> (g kv d) ...", kv=2, d=self.head_dim)]


@dataclass(frozen=True)
class Entry:
    target: str  # our parameter name, e.g. decoder.layers.0.attn.qkv.weight
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # checkpoint tensor names
    source_shapes: tuple[tuple[int, ...], ...]
    layout: Layout
    dtype: torch.dtype | None = None  # stored and kept in this dtype (int8 weights); None: the model's dtype


def _linear(target: str, in_dim: int, sources: list[tuple[str, int]], bias: bool,
            layout: Layout | None = None) -> list[Entry]:
    """Weight (and bias) entries of one Linear whose output rows come from `sources` (name, rows)."""
    rows = sum(r for _, r in sources)
    if layout is None:
        layout = Same() if len(sources) == 1 else Stacked([r for _, r in sources])
    entries = [Entry(f"{target}.weight", (rows, in_dim), tuple(f"{s}.weight" for s, _ in sources),
                     tuple((r, in_dim) for _, r in sources), layout)]
    if bias:
        entries.append(Entry(f"{target}.bias", (rows,), tuple(f"{s}.bias" for s, _ in sources),
                             tuple((r,) for _, r in sources), layout))
    return entries


def _same(target: str, source: str, shape: tuple[int, ...]) -> Entry:
    return Entry(target, shape, (source,), (shape,), Same())


def _decoder_plan(cfg: ModelConfig, naming: str, names: set[str]) -> list[Entry]:
    d = cfg.decoder
    H, F, V = d.hidden_size, d.ffn_size, d.vocab_size
    q_rows, kv_rows = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    if naming == "custom_llama":
        embed, norm, head = "llm.lm.embed_in", "llm.lm.final_layer_norm", "llm.embed_out"
    else:
        embed, norm, head = "llm.model.embed_tokens", "llm.model.norm", "llm.lm_head"
        if d.tied or (f"{head}.weight" not in names and f"{embed}.weight" in names):
            head = embed  # tied: the head is the embedding (a stored llm.lm_head is not read: see `unread`)
    plan = [_same("decoder.embed.weight", f"{embed}.weight", (V, H))]
    for i in range(d.n_layers):
        t = f"decoder.layers.{i}"
        if naming == "custom_llama":
            s = f"llm.lm.layers.{i}"
            attn = f"{s}.attention"
            plan += _linear(f"{t}.attn.qkv", H, [(f"{attn}.query_dense", q_rows), (f"{attn}.key_value_dense", 2 * kv_rows)],
                            d.qkv_bias, QueryAndInterleavedKV(q_rows, d.head_dim))
            plan += _linear(f"{t}.attn.out", q_rows, [(f"{attn}.dense", H)], d.out_bias)
            plan += _linear(f"{t}.mlp.up_gate", H, [(f"{s}.mlp.dense_h_to_4h", 2 * F)], d.ffn_up_bias)  # [up; gate]
            plan += _linear(f"{t}.mlp.down", F, [(f"{s}.mlp.dense_4h_to_h", H)], d.ffn_down_bias)
        else:
            s = f"llm.model.layers.{i}"
            attn = f"{s}.self_attn"
            plan += _linear(f"{t}.attn.qkv", H, [(f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows),
                                                 (f"{attn}.v_proj", kv_rows)], d.qkv_bias)
            plan += _linear(f"{t}.attn.out", q_rows, [(f"{attn}.o_proj", H)], d.out_bias)
            plan += _linear(f"{t}.mlp.up_gate", H, [(f"{s}.mlp.up_proj", F), (f"{s}.mlp.gate_proj", F)], d.ffn_up_bias)
            plan += _linear(f"{t}.mlp.down", F, [(f"{s}.mlp.down_proj", H)], d.ffn_down_bias)
        if d.qk_norm:  # (Qwen3) one RMSNorm weight over each head's D, for q and for k
            plan += [_same(f"{t}.attn.{n}.weight", f"{attn}.{n}.weight", (d.head_dim,)) for n in ("q_norm", "k_norm")]
        plan.append(_same(f"{t}.attn_norm.weight", f"{s}.input_layernorm.weight", (H,)))
        plan.append(_same(f"{t}.mlp_norm.weight", f"{s}.post_attention_layernorm.weight", (H,)))
    plan.append(_same("decoder.norm.weight", f"{norm}.weight", (H,)))
    plan.append(_same("decoder.lm_head.weight", f"{head}.weight", (V, H)))
    return plan


def _vision_plan(cfg: ModelConfig) -> list[Entry]:
    v = cfg.vision
    E, M = v.embed_dim, v.mlp_dim
    conv = (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    plan = [Entry("vision.patch_embed.weight", (E, v.patch_dim), ("vision_encoder.patch_embed.proj.weight",),
                  (conv,), Same())]
    for i in range(v.depth):
        t, s = f"vision.blocks.{i}", f"vision_encoder.blocks.{i}"
        for norm in ("norm1", "norm2"):
            plan += [_same(f"{t}.{norm}.{p}", f"{s}.{norm}.{p}", (E,)) for p in ("weight", "bias")]
        plan += _linear(f"{t}.attn.qkv", E, [(f"{s}.attn.qkv", 3 * E)], True)
        plan += _linear(f"{t}.attn.proj", E, [(f"{s}.attn.proj", E)], True)
        plan += _linear(f"{t}.mlp.fc1", E, [(f"{s}.mlp.fc1", M)], True)
        plan += _linear(f"{t}.mlp.fc2", M, [(f"{s}.mlp.fc2", E)], True)
    plan += [_same(f"projector.norm.{p}", f"vision_projector.ln_q.{p}", (E,)) for p in ("weight", "bias")]
    plan += _linear("projector.fc1", cfg.merge_dim, [("vision_projector.mlp.0", cfg.merge_dim)], True)
    plan += _linear("projector.fc2", cfg.merge_dim, [("vision_projector.mlp.2", cfg.decoder.hidden_size)], True)
    return plan


def plan(cfg: ModelConfig, naming: str, names: Iterable[str] = (), quantization: dict | None = None) -> list[Entry]:
    """Every parameter of the composed model, in module order, with its checkpoint sources.

    naming: 'custom_llama', 'qwen2', 'qwen3' or 'points'; `names` (the checkpoint's tensor names) is only consulted
    to detect a tied Qwen2 lm_head. `quantization` (our layout only): the quantized projections' weights are
    int8 and each has a `.scale` [out] beside it (points.io.quantized)."""
    if naming == "points":
        quantized = set(quantized_weights(cfg, quantization))
        out = []
        for e in plan(cfg, "custom_llama"):
            if e.target in quantized:
                out.append(Entry(e.target, e.shape, (e.target,), (e.shape,), Same(), torch.int8))
                scale = e.target.removesuffix("weight") + "scale"
                out.append(_same(scale, scale, e.shape[:1]))
            else:
                out.append(_same(e.target, e.target, e.shape))
        return out
    if quantization:
        raise CheckpointError(f"quantized weights exist only in our own layout, not in {naming!r}")
    return _decoder_plan(cfg, naming, set(names)) + _vision_plan(cfg)


def quantized_weights(cfg: ModelConfig, quantization: dict | None) -> list[str]:
    """The weight names an int8 checkpoint stores as int8 (with a scale): the scheme's projections
    (points.io.quantized), lm_head when the checkpoint says so."""
    if not quantization:
        return []
    return [f"decoder.{m}.weight" for m in quantized_modules(cfg.decoder.n_layers, quantization["lm_head"])]


def is_dropped(name: str) -> bool:
    return name.startswith(DROPPED_PREFIXES) or name.endswith(DROPPED_SUFFIXES)


def unread(cfg: ModelConfig, naming: str) -> set[str]:
    """Tensors a checkpoint may store that this model never reads: a tied decoder's own lm_head (the official
    loader ties it to the embedding whatever the file holds)."""
    return {"llm.lm_head.weight"} if cfg.decoder.tied and naming in ("qwen2", "qwen3") else set()


def check(entries: list[Entry], files: TensorFiles, absent: Callable[[], list[str]] = list,
          allowed: set[str] = frozenset()) -> None:
    """Strict agreement of the plan with the files, from headers alone (no tensor data read). `absent()`: the
    config.json fields the file leaves out, named in a mismatch (their defaults shaped what was expected);
    asked only when there is a mismatch to explain. `allowed`: tensors the files may hold unplanned."""
    names = files.names

    def note() -> str:
        left_out = absent()
        return (f"; config.json leaves out {_few(left_out)}, so the class defaults shaped what was expected"
                if left_out else "")

    wanted, integer = {}, set()
    for e in entries:
        wanted.update(zip(e.sources, e.source_shapes))
        if e.dtype == torch.int8:
            integer.update(e.sources)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise CheckpointError(f"{files.directory}: missing tensor(s) {_few(missing)}; expected e.g. {missing[0]} "
                              f"of shape {list(wanted[missing[0]])}{note()}")
    extra = sorted(n for n in names if n not in wanted and not is_dropped(n) and n not in allowed)
    if extra:
        raise CheckpointError(f"{files.directory}: unexpected tensor(s) {_few(extra)} (in {files.where(extra[0]).name}); "
                              f"this model has no parameter for them{note()}")
    for name, shape in wanted.items():
        found = files.shape(name)
        if found != shape:
            raise CheckpointError(f"{files.where(name)}: tensor {name} has shape {list(found)}, "
                                  f"expected {list(shape)} from config.json{note()}")
        if name in integer:
            if files.dtype_name(name) != "I8":
                raise CheckpointError(f"{files.where(name)}: tensor {name} is {files.dtype_name(name)}; config.json "
                                      "says it is quantized, so it must be int8 (I8)")
        elif files.dtype(name) is None:
            raise CheckpointError(f"{files.where(name)}: tensor {name} is not a floating tensor "
                                  f"({files.dtype_name(name)}); expected float32, float16 or bfloat16")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


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


def _open(directory: str | Path) -> tuple[ModelConfig, TensorFiles, list[Entry]]:
    cfg, naming = read_config(directory)
    files = TensorFiles(directory)
    entries = plan(cfg, naming, files.names, read_quantization(directory) if naming == "points" else None)
    check(entries, files, lambda: absent_shape_fields(directory), unread(cfg, naming))
    return cfg, files, entries


def _built(entries: list[Entry], files: TensorFiles, dtype: torch.dtype,
           device: torch.device) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Our tensor for each entry, in `dtype` on `device`, in order. On the CPU a tensor that is its source
    unchanged (same dtype, no re-layout) is the mapped source itself; every other tensor is written once
    into fresh memory, after which the map's pages of its sources are dropped (they would otherwise stay
    resident beside the copy for as long as the map lives). A file's handle is let go after the last entry
    that reads it."""
    last = {}
    for i, e in enumerate(entries):
        for name in e.sources:
            last[files.file_of(name)] = i
    viewed = set()  # a source handed out as a view is copied if a second entry uses it (tied weights)
    for i, e in enumerate(entries):
        want = e.dtype or dtype
        stored = torch.int8 if e.dtype == torch.int8 else files.dtype(e.sources[0])  # (check() saw I8 there)
        if e.layout.view and device.type == "cpu" and stored == want and e.sources[0] not in viewed:
            viewed.add(e.sources[0])
            yield e, files.get(e.sources[0]).reshape(e.shape)
        else:
            out = torch.empty(e.shape, dtype=want, device=device)
            sources = [files.get(name) for name in e.sources]
            e.layout.join(sources, out)
            for name, src in zip(e.sources, sources):
                if name not in viewed:
                    forget_pages(src)
            del sources
            yield e, out
        for f, end in last.items():
            if end == i:
                files.release(f)


# --------------------------------------------------------------------------- load and convert

def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """A small matmul in `dtype` on `device`; CheckpointError when the device cannot run it (e.g. bfloat16
    on a GPU without bf16 support), before any weight is read."""
    try:
        torch.nn.functional.linear(torch.ones(2, 8, dtype=dtype, device=device), torch.ones(4, 8, dtype=dtype, device=device))
    except (RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"dtype {str(dtype).removeprefix('torch.')} cannot run matmuls on {device} "
                              f"({str(e).splitlines()[0]}); choose another dtype") from None


def load_state_dict(directory: str | Path, *, parts: tuple[str, ...] = ("decoder", "vision", "projector"),
                    dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                    progress: bool | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our state dict (names `decoder.*`, `vision.*`, `projector.*`, PyTorch's usual contiguous layout) for
    the requested parts.

    The whole checkpoint is checked from its headers first; only the requested parts are read. On the CPU,
    tensors already in our layout and in `dtype` are views of the mapped files (zero copy); the rest is
    written once into its final dtype on `device` and the map's pages it came from are dropped, so the
    peak is the model plus one tensor's sources in flight."""
    cfg, files, entries = _open(directory)
    dtype = resolve_dtype(dtype, files, entries)
    device = torch.device(device)
    check_dtype_runs(dtype, device)
    chosen = [e for e in entries if e.target.split(".", 1)[0] in parts]
    bar = Progress(f"loading {Path(directory).name}", len(chosen), unit="tensors",
                   total_bytes=sum(_nbytes(e.shape, e.dtype or dtype) for e in chosen), enabled=progress)
    state = {}
    for e, t in _built(chosen, files, dtype, device):
        state[e.target] = t
        bar.update(nbytes=t.nbytes)
    bar.close()
    return cfg, state


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     naming: str = "custom_llama") -> dict[str, torch.Tensor]:
    """Our state dict back into a released naming (the exact inverse of loading)."""
    out = {}
    for e in plan(cfg, naming, ()):
        if e.target in state and not out.keys() >= set(e.sources):  # (tied: the head is the embedding, written once)
            out.update(zip(e.sources, (t.contiguous() for t in e.layout.split(state[e.target], e.source_shapes))))
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | str | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool | None = None, quantize: str | None = None,
            quantize_lm_head: bool = False) -> Path:
    """Write the checkpoint at `src` (any supported layout) into our layout at `dst`: safetensors shards
    of at most `max_shard_bytes`, their index, our config.json, and the tokenizer / processor files.

    quantize="int8": the decoder's projections (and lm_head with quantize_lm_head) are written as int8 with a
    `.scale` beside each (points.io.quantized), the scheme recorded in config.json; loading maps them as
    they are. A checkpoint that is already quantized is refused (quantize once, from float weights).

    Atomic: everything is written into a temporary sibling directory that is renamed to `dst` only when
    complete; on any failure it is removed and `dst` does not exist."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; converting never overwrites (remove it or pick another DST)")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes!r}: expected an integer >= 1")
    if quantize is not None:
        check_scheme(quantize)
    elif quantize_lm_head:
        raise ValueError("quantize_lm_head=True needs quantize (e.g. quantize='int8')")
    cfg, files, entries = _open(src)
    stored = read_quantization(src) if read_config(src)[1] == "points" else None
    if quantize and stored:
        raise CheckpointError(f"{src}: already quantized ({stored['scheme']}); convert from the float checkpoint "
                              "instead (quantizing twice would only add error)")
    quantization = {"scheme": quantize, "lm_head": quantize_lm_head} if quantize else stored
    to_quantize = set(quantized_weights(cfg, quantization)) if quantize else set()
    tmp = None
    try:
        with partial_dir(dst) as tmp:
            _write_converted(src, tmp, cfg, files, entries, dtype, max_shard_bytes, progress, quantization, to_quantize)
            os.rename(tmp, dst)
    except WriteError as e:  # a full disk, a read-only folder: the partial folder is gone by now
        where = Path(e.path)
        if tmp is not None and where.is_relative_to(tmp):
            where = dst / where.relative_to(tmp)
        raise WriteError(where, e, f"; nothing was left at {dst}") from None
    return dst


def _write_converted(src: Path, tmp: Path, cfg: ModelConfig, files: TensorFiles, entries: list[Entry], dtype,
                     max_shard_bytes: int, progress: bool | None, quantization: dict | None, to_quantize: set) -> None:
    """`convert`'s files, written into the folder `tmp` (raises WriteError naming the file that failed)."""
    dtype = resolve_dtype(dtype, files, entries)
    shards = _shard(entries, dtype, max_shard_bytes)
    total = sum(_nbytes(e.shape, e.dtype or dtype) for e in entries)
    with writing(tmp):
        tmp.mkdir(parents=True)
    bar = Progress(f"converting {src.name}", len(entries), unit="tensors", total_bytes=total, enabled=progress)
    built = _built(entries, files, dtype, torch.device("cpu"))

    def tensors_of(shard):  # one shard's tensors in memory at a time
        tensors = {}
        for _ in shard:
            e, t = next(built)
            bar.update(nbytes=t.nbytes)
            if e.target in to_quantize:
                t, tensors[e.target.removesuffix("weight") + "scale"] = quantize_int8(t)
            tensors[e.target] = t
        return tensors

    weight_map = write_shards((tensors_of(shard) for shard in shards), tmp, len(shards), {"format": "pt"})
    bar.close()
    size = sum(_nbytes(e.shape, e.dtype or dtype) for e in plan(cfg, "points", (), quantization))
    config = to_dict(cfg) | {"dtype": str(dtype).removeprefix("torch.")}
    if quantization:
        config["quantization"] = quantization
    for name, text in ((INDEX, json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1)),
                       ("config.json", json.dumps(config, indent=2))):
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
