"""Checkpoint mapping: the released POINTS-1.5 tensors <-> this project's modules.

The only file that knows the reference's state-dict names. One plan (a list of `Entry`) describes, for
every parameter of ours, which checkpoint tensors make it, their expected shapes and the exact packing
transform both ways. `load_state_dict` (used by `points.load`) and `convert` (used by
`weights_convert.py`) both walk that plan, so the two can never disagree.

Namings read:
- 'custom_llama': the released 7B checkpoint. `llm.lm.layers.N.attention.query_dense`,
  `attention.key_value_dense` (K and V interleaved per KV head: [K_0; V_0; K_1; V_1; ...]),
  `attention.dense`, `mlp.dense_h_to_4h` (rows [up; gate]), `mlp.dense_4h_to_h`, `llm.lm.embed_in`,
  `llm.lm.final_layer_norm`, `llm.embed_out`.
- 'qwen2': later POINTS releases (`llm.model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, `llm.lm_head`).
- 'points': our own layout, as written by `convert` (names = our module names, no transforms).
Vision tensors (`vision_encoder.*`, `vision_projector.*`) are named alike in both released namings.

Strictness: before any tensor data is read, every planned source must exist with its exact shape and a
floating dtype, and every tensor in the files must be planned or explicitly dropped (the unused
`vision_encoder.merger.*`, rotary `inv_freq` buffers). Any failure raises `CheckpointError`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from points.config import ModelConfig, read_config
from points.errors import CheckpointError
from points.progress import Progress

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 10**9
STAGING_BYTES = 16 * 2**20  # slab size when a tensor is read into another dtype or layout
# Non-weight files a checkpoint directory may carry that a converted directory keeps.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "merges.txt", "added_tokens.json", "preprocessor_config.json", "generation_config.json",
                 "chat_template.json", "chat_template.jinja")
DROPPED_PREFIXES = ("vision_encoder.merger.",)  # Qwen2-VL's own merger: built, never run by POINTS
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")  # recomputed, never needed
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64}


# --------------------------------------------------------------------------- reading tensor files

class TensorFiles:
    """The tensors of a checkpoint directory (one `model.safetensors`, or an index and its shards).

    Headers are read and validated (by the safetensors library) at once; tensor data is read only on
    `get`, straight from the file into a fresh tensor with one `readinto`, so that loading never holds
    a mapped copy of the file beside the weights (a memory map's touched pages count as resident)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX} found")
        self._info = {}  # name -> (file, dtype string, shape, absolute byte offset, byte count)
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
            try:
                with safe_open(str(path), framework="pt"):  # full header validation, truncation included
                    pass
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                                      "is it truncated or still downloading?") from None
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, h in header.items():
                begin, end = h["data_offsets"]
                self._info[name] = (f, h["dtype"], tuple(h["shape"]), 8 + n + begin, end - begin)
        for name, f in (weight_map or {}).items():
            if name not in self._info or self._info[name][0] != f:
                raise CheckpointError(f"{self.directory / f}: tensor {name} is listed there by {INDEX} "
                                      "but the shard does not hold it")

    @property
    def names(self) -> set[str]:
        return set(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][2]

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of a floating tensor; None for any other (integer, bool, fp8) tensor."""
        return _SAFETENSORS_DTYPES.get(self._info[name][1])

    def dtype_name(self, name: str) -> str:
        return self._info[name][1]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor's data, read from the file. With `out` (a CPU tensor of the same shape, any dtype
        and strides) it is read in slabs of rows through a small staging buffer and copied (and cast)
        into `out`, so that no second full-size copy is ever held."""
        f, _, shape, offset, nbytes = self._info[name]
        dtype = self.dtype(name)
        if out is None or (out.dtype == dtype and out.is_contiguous()):
            out = torch.empty(shape, dtype=dtype) if out is None else out
            self._read(name, offset, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            return out
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        step = max(1, STAGING_BYTES // max(row_bytes, 1))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            slab = torch.empty((r1 - r0, *shape[1:]), dtype=dtype)
            self._read(name, offset + r0 * row_bytes, memoryview(slab.reshape(-1).view(torch.uint8).numpy()))
            out[r0:r1].copy_(slab)
        return out

    def _read(self, name: str, offset: int, buf: memoryview) -> None:
        f = self._info[name][0]
        with open(self.directory / f, "rb", buffering=0) as fh:
            fh.seek(offset)
            done = 0
            while done < len(buf):
                got = fh.readinto(buf[done:])
                if not got:
                    raise CheckpointError(f"{self.directory / f}: tensor {name} ends past the end of the file")
                done += got

    def where(self, name: str) -> Path:
        return self.directory / self._info[name][0]


# --------------------------------------------------------------------------- the plan

Join = Callable[[list], torch.Tensor]  # checkpoint tensors -> our tensor
Split = Callable[[torch.Tensor], list]  # our tensor -> checkpoint tensors


@dataclass(frozen=True)
class Entry:
    target: str  # our parameter name, e.g. decoder.layers.0.attn.qkv.weight
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # checkpoint tensor names
    source_shapes: tuple[tuple[int, ...], ...]
    join: Join
    split: Split


def _identity(ts: list) -> torch.Tensor:
    return ts[0]


def _same() -> tuple[Join, Split]:
    return _identity, (lambda t: [t])


def _cat(sizes: list[int]) -> tuple[Join, Split]:
    """Our rows are the sources' rows, stacked in order."""
    return (lambda ts: torch.cat(ts)), (lambda t: list(t.split(sizes)))


def _reshape(source_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[Join, Split]:
    return (lambda ts: ts[0].reshape(shape)), (lambda t: [t.reshape(source_shape)])


def _swap_halves() -> tuple[Join, Split]:
    """CustomLlama's dense_h_to_4h rows are [up; gate]; ours are [gate; up]. Its own inverse."""
    def swap(t):
        up, gate = t.chunk(2)
        return torch.cat((gate, up))
    return (lambda ts: swap(ts[0])), (lambda t: [swap(t)])


def _query_and_interleaved_kv(q_rows: int, n_kv: int, head_dim: int) -> tuple[Join, Split]:
    """(query_dense, key_value_dense) <-> our [q; k; v]. key_value_dense rows are, per KV head g,
    K_g (head_dim rows) then V_g (head_dim rows)."""
    def join(ts):
        q, kv = ts
        rest = kv.shape[1:]
        kv = kv.reshape(n_kv, 2, head_dim, *rest)
        return torch.cat((q, kv[:, 0].reshape(n_kv * head_dim, *rest), kv[:, 1].reshape(n_kv * head_dim, *rest)))

    def split(t):
        rest = t.shape[1:]
        q, k, v = t.split((q_rows, n_kv * head_dim, n_kv * head_dim))
        kv = torch.stack((k.reshape(n_kv, head_dim, *rest), v.reshape(n_kv, head_dim, *rest)), dim=1)
        return [q, kv.reshape(2 * n_kv * head_dim, *rest)]
    return join, split


def _linear(target: str, in_dim: int, sources: list[tuple[str, int]], bias: bool,
            transform: tuple[Join, Split] | None = None) -> list[Entry]:
    """Weight (and bias) entries of one Linear whose output rows come from `sources` (name, rows).
    Every transform acts on dim 0, so the same one serves weight [rows, in] and bias [rows]."""
    rows = sum(r for _, r in sources)
    if transform is None:
        transform = _same() if len(sources) == 1 else _cat([r for _, r in sources])
    entries = [Entry(f"{target}.weight", (rows, in_dim), tuple(f"{s}.weight" for s, _ in sources),
                     tuple((r, in_dim) for _, r in sources), *transform)]
    if bias:
        entries.append(Entry(f"{target}.bias", (rows,), tuple(f"{s}.bias" for s, _ in sources),
                             tuple((r,) for _, r in sources), *transform))
    return entries


def _vector(target: str, source: str, dim: int) -> Entry:
    return Entry(target, (dim,), (source,), ((dim,),), *_same())


def _decoder_plan(cfg: ModelConfig, naming: str, names: set[str]) -> list[Entry]:
    d = cfg.decoder
    H, F, V = d.hidden_size, d.ffn_size, d.vocab_size
    q_rows, kv_rows = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    if naming == "custom_llama":
        embed, norm, head = "llm.lm.embed_in", "llm.lm.final_layer_norm", "llm.embed_out"
    else:
        embed, norm, head = "llm.model.embed_tokens", "llm.model.norm", "llm.lm_head"
        if f"{head}.weight" not in names and f"{embed}.weight" in names:
            head = embed  # a tied Qwen2 checkpoint stores the embedding once
    plan = [Entry("decoder.embed.weight", (V, H), (f"{embed}.weight",), ((V, H),), *_same())]
    for i in range(d.n_layers):
        t = f"decoder.layers.{i}"
        if naming == "custom_llama":
            s = f"llm.lm.layers.{i}"
            attn = f"{s}.attention"
            plan += _linear(f"{t}.attn.qkv", H, [(f"{attn}.query_dense", q_rows), (f"{attn}.key_value_dense", 2 * kv_rows)],
                            d.qkv_bias, _query_and_interleaved_kv(q_rows, d.n_kv_heads, d.head_dim))
            plan += _linear(f"{t}.attn.out", q_rows, [(f"{attn}.dense", H)], d.out_bias)
            plan += _linear(f"{t}.mlp.gate_up", H, [(f"{s}.mlp.dense_h_to_4h", 2 * F)], d.ffn_up_bias, _swap_halves())
            plan += _linear(f"{t}.mlp.down", F, [(f"{s}.mlp.dense_4h_to_h", H)], d.ffn_down_bias)
        else:
            s = f"llm.model.layers.{i}"
            attn = f"{s}.self_attn"
            plan += _linear(f"{t}.attn.qkv", H, [(f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows),
                                                 (f"{attn}.v_proj", kv_rows)], d.qkv_bias)
            plan += _linear(f"{t}.attn.out", q_rows, [(f"{attn}.o_proj", H)], d.out_bias)
            plan += _linear(f"{t}.mlp.gate_up", H, [(f"{s}.mlp.gate_proj", F), (f"{s}.mlp.up_proj", F)], d.ffn_up_bias)
            plan += _linear(f"{t}.mlp.down", F, [(f"{s}.mlp.down_proj", H)], d.ffn_down_bias)
        plan.append(_vector(f"{t}.attn_norm.weight", f"{s}.input_layernorm.weight", H))
        plan.append(_vector(f"{t}.mlp_norm.weight", f"{s}.post_attention_layernorm.weight", H))
    plan.append(_vector("decoder.norm.weight", f"{norm}.weight", H))
    plan.append(Entry("decoder.lm_head.weight", (V, H), (f"{head}.weight",), ((V, H),), *_same()))
    return plan


def _vision_plan(cfg: ModelConfig) -> list[Entry]:
    v = cfg.vision
    E, M = v.embed_dim, v.mlp_dim
    conv = (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    plan = [Entry("vision.patch_embed.weight", (E, v.patch_dim), ("vision_encoder.patch_embed.proj.weight",),
                  (conv,), *_reshape(conv, (E, v.patch_dim)))]
    for i in range(v.depth):
        t, s = f"vision.blocks.{i}", f"vision_encoder.blocks.{i}"
        for norm in ("norm1", "norm2"):
            plan += [_vector(f"{t}.{norm}.{p}", f"{s}.{norm}.{p}", E) for p in ("weight", "bias")]
        plan += _linear(f"{t}.attn.qkv", E, [(f"{s}.attn.qkv", 3 * E)], True)
        plan += _linear(f"{t}.attn.proj", E, [(f"{s}.attn.proj", E)], True)
        plan += _linear(f"{t}.mlp.fc1", E, [(f"{s}.mlp.fc1", M)], True)
        plan += _linear(f"{t}.mlp.fc2", M, [(f"{s}.mlp.fc2", E)], True)
    plan += [_vector(f"projector.norm.{p}", f"vision_projector.ln_q.{p}", E) for p in ("weight", "bias")]
    plan += _linear("projector.fc1", cfg.merge_dim, [("vision_projector.mlp.0", cfg.merge_dim)], True)
    plan += _linear("projector.fc2", cfg.merge_dim, [("vision_projector.mlp.2", cfg.decoder.hidden_size)], True)
    return plan


def plan(cfg: ModelConfig, naming: str, names: Iterable[str] = ()) -> list[Entry]:
    """Every parameter of the composed model, in module order, with its checkpoint sources.

    naming: 'custom_llama', 'qwen2' or 'points'; `names` (the checkpoint's tensor names) is only consulted
    to detect a tied Qwen2 lm_head."""
    if naming == "points":
        ours = plan(cfg, "custom_llama")
        return [Entry(e.target, e.shape, (e.target,), (e.shape,), *_same()) for e in ours]
    return _decoder_plan(cfg, naming, set(names)) + _vision_plan(cfg)


def is_dropped(name: str) -> bool:
    return name.startswith(DROPPED_PREFIXES) or name.endswith(DROPPED_SUFFIXES)


def check(entries: list[Entry], files: TensorFiles) -> None:
    """Strict agreement of the plan with the files, from headers alone (no tensor data read)."""
    names = files.names
    wanted = {}
    for e in entries:
        wanted.update(zip(e.sources, e.source_shapes))
    missing = [n for n in wanted if n not in names]
    if missing:
        raise CheckpointError(f"{files.directory}: missing tensor(s) {_few(missing)}; expected e.g. {missing[0]} "
                              f"of shape {list(wanted[missing[0]])}")
    extra = sorted(n for n in names if n not in wanted and not is_dropped(n))
    if extra:
        raise CheckpointError(f"{files.directory}: unexpected tensor(s) {_few(extra)} (in {files.where(extra[0]).name}); "
                              "this model has no parameter for them")
    for name, shape in wanted.items():
        found = files.shape(name)
        if found != shape:
            raise CheckpointError(f"{files.where(name)}: tensor {name} has shape {list(found)}, "
                                  f"expected {list(shape)} from config.json")
        if files.dtype(name) is None:
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
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of float32, float16, bfloat16")
    return dtype


def _open(directory: str | Path) -> tuple[ModelConfig, TensorFiles, list[Entry]]:
    cfg, naming = read_config(directory)
    files = TensorFiles(directory)
    entries = plan(cfg, naming, files.names)
    check(entries, files)
    return cfg, files, entries


def _build(entry: Entry, files: TensorFiles, dtype: torch.dtype, device, column_major: bool = False) -> torch.Tensor:
    """Our tensor for `entry`, in `dtype` on `device`; with column_major (CPU loading only) stored
    transposed in memory (same shape and values, strides (1, rows)). A single-source tensor is read straight
    into its final dtype and layout."""
    if entry.join is _identity and torch.device(device).type == "cpu":
        out = torch.empty(entry.shape[::-1], dtype=dtype).t() if column_major else torch.empty(entry.shape, dtype=dtype)
        return files.get(entry.sources[0], out=out)
    t = entry.join([files.get(n) for n in entry.sources]).to(device=device, dtype=dtype)
    return t.t().contiguous().t() if column_major else t.contiguous()


def column_major(entry: Entry) -> bool:
    """Whether CPU loading stores this weight transposed: the decoder's projections with more output than
    input features (q/k/v, gate/up, lm_head). With MKL, a one-token product reads such a matrix about 1.7x
    faster transposed (see docs/benchmarks.md); GPU loading keeps the usual layout."""
    return (entry.target.startswith("decoder.") and entry.target.endswith(".weight") and len(entry.shape) == 2
            and entry.shape[0] > entry.shape[1] and entry.target != "decoder.embed.weight")


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
    """Our state dict (names `decoder.*`, `vision.*`, `projector.*`) for the requested parts.

    The whole checkpoint is checked; only the requested parts are read. Tensors are read one at a time
    (plain reads at the header offsets) and moved to `device`/`dtype` at once, so the peak is the model
    plus one tensor in flight."""
    cfg, files, entries = _open(directory)
    dtype = resolve_dtype(dtype, files, entries)
    check_dtype_runs(dtype, torch.device(device))
    cpu = torch.device(device).type == "cpu"
    chosen = [e for e in entries if e.target.split(".", 1)[0] in parts]
    state = {}
    bar = Progress(f"loading {Path(directory).name}", len(chosen),
                   sum(_nbytes(e.shape, dtype) for e in chosen), enabled=progress)
    for e in chosen:
        state[e.target] = _build(e, files, dtype, device, cpu and column_major(e))
        bar.update(_nbytes(e.shape, dtype))
    bar.close()
    return cfg, state


class _SkipInit(TorchFunctionMode):
    """Parameters made on the meta device get no values: skip nn.init's in-place fills (whose first call
    on meta tensors otherwise costs seconds of one-time setup inside torch)."""

    FILLS = {"normal_", "uniform_", "fill_", "zero_", "trunc_normal_", "exponential_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FILLS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


def materialize(factory: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], prefix: str):
    """Build a module without allocating its parameters (meta device), then adopt the loaded tensors
    named `prefix` + its own names; every parameter must be filled (strict)."""
    with torch.device("meta"), _SkipInit():
        module = factory()
    module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
                           strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_decoder(directory: str | Path, *, dtype=None, device="cpu", progress: bool | None = None):
    """The language model alone, from any supported checkpoint layout."""
    from points.decoder import Decoder

    cfg, state = load_state_dict(directory, parts=("decoder",), dtype=dtype, device=device, progress=progress)
    return materialize(lambda: Decoder(cfg.decoder), state, "decoder.")


def load_vision(directory: str | Path, *, dtype=None, device="cpu", progress: bool | None = None):
    """The vision encoder and the projector, from any supported checkpoint layout."""
    from points.projector import PatchMerger
    from points.vision import VisionEncoder

    cfg, state = load_state_dict(directory, parts=("vision", "projector"), dtype=dtype, device=device,
                                 progress=progress)
    return (materialize(lambda: VisionEncoder(cfg.vision), state, "vision."),
            materialize(lambda: PatchMerger(cfg), state, "projector."))


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     naming: str = "custom_llama") -> dict[str, torch.Tensor]:
    """Our state dict back into a released naming (the exact inverse of loading)."""
    out = {}
    for e in plan(cfg, naming, ()):
        if e.target in state:
            out.update(zip(e.sources, (t.contiguous() for t in e.split(state[e.target]))))
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | str | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool | None = None) -> Path:
    """Write the checkpoint at `src` (any supported layout) into our layout at `dst`: safetensors shards
    of at most `max_shard_bytes`, their index, our config.json, and the tokenizer / processor files.

    Atomic: everything is written into a temporary sibling directory that is renamed to `dst` only when
    complete; on any failure it is removed and `dst` does not exist."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; converting never overwrites (remove it or pick another DST)")
    cfg, files, entries = _open(src)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        dtype = resolve_dtype(dtype, files, entries)
        shards = _shard(entries, dtype, max_shard_bytes)
        total = sum(_nbytes(e.shape, dtype) for e in entries)
        tmp.mkdir(parents=True)
        bar = Progress(f"converting {src.name}", len(entries), total, enabled=progress)
        weight_map = {}
        for i, shard in enumerate(shards):  # one shard's tensors in memory at a time
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for e in shard:
                tensors[e.target] = _build(e, files, dtype, "cpu")
                weight_map[e.target] = fname
                bar.update(_nbytes(e.shape, dtype))
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        bar.close()
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        config = cfg.to_dict() | {"dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in CARRIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _shard(entries: list[Entry], dtype: torch.dtype, max_bytes: int) -> list[list[Entry]]:
    shards, size = [[]], 0
    for e in entries:
        n = _nbytes(e.shape, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards
