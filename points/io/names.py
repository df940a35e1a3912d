"""The name tables: for every parameter of ours, which checkpoint tensors make it, their shapes and how they
are laid out (`Entry`, `Layout`: both directions), per tensor naming. Declared as data (`Naming`, one per
released decoder vocabulary; the vision tensors are named alike in every release) and turned into one plan
by `plan`, which loading and converting (points.io.checkpoint) both walk, so the two can never disagree.

Namings read (`NAMINGS`; a member of points.model.family names its own):
- 'custom_llama': POINTS-1.5. `llm.lm.layers.N.attention.query_dense`, `attention.key_value_dense` (K and
  V interleaved per KV head: [K_0; V_0; K_1; V_1; ...]), `attention.dense`, `mlp.dense_h_to_4h` (rows
  [up; gate]), `mlp.dense_4h_to_h`, `llm.lm.embed_in`, `llm.lm.final_layer_norm`, `llm.embed_out`.
- 'qwen2': POINTS-Reader, transformers' Qwen2ForCausalLM names (`llm.model.layers.N.self_attn.q_proj`,
  `mlp.gate_proj`, `llm.lm_head`; a tied head is the embedding and a stored `llm.lm_head` is not read).
- 'qwen3': POINTS-GUI-G and VersaViT, the same names plus `self_attn.q_norm` / `self_attn.k_norm`.
- 'points': our own layout, as written by `convert` (names = our module names, nothing re-laid).

`check` holds a plan against the files' headers: every planned source present with its exact shape and a
floating dtype, every tensor in the files planned or explicitly dropped (the unused `vision_encoder.merger.*`,
rotary `inv_freq` buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from einops import rearrange

from points.errors import CheckpointError
from points.io.atomic import SAFETENSORS_DTYPE
from points.io.quantized import quantized_modules, stored_tensors
from points.io.tensors import TensorFiles
from points.model.config import ModelConfig

DROPPED_PREFIXES = ("vision_encoder.merger.",)  # Qwen2-VL's own merger: built, never run by POINTS
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")  # recomputed, never needed


# --------------------------------------------------------------------------- layouts

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
    dtype: torch.dtype | None = None  # stored and kept in this dtype (quantized codes); None: the model's dtype


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


# --------------------------------------------------------------------------- the tables

@dataclass(frozen=True)
class Naming:
    """One released vocabulary of the decoder's tensor names. A layer's names follow `layer` (its prefix, `{i}`
    the index). `qkv`: the sources of our fused q/k/v rows: (q, k, v) stacked, or (query, key_value) with K and
    V interleaved per KV head (`interleaved_kv`); `up_gate`: (up, gate) stacked, or one tensor already [up;
    gate]; `qk_norm`: the per-head q and k norms, read when the config has them (Qwen3)."""

    embed: str
    norm: str
    head: str
    layer: str
    qkv: tuple[str, ...]
    out: str
    up_gate: tuple[str, ...]
    down: str
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    interleaved_kv: bool = False
    qk_norm: tuple[str, str] | None = None


CUSTOM_LLAMA = Naming(embed="llm.lm.embed_in", norm="llm.lm.final_layer_norm", head="llm.embed_out",
                      layer="llm.lm.layers.{i}", qkv=("attention.query_dense", "attention.key_value_dense"),
                      interleaved_kv=True, out="attention.dense", up_gate=("mlp.dense_h_to_4h",),
                      down="mlp.dense_4h_to_h")
QWEN = Naming(embed="llm.model.embed_tokens", norm="llm.model.norm", head="llm.lm_head", layer="llm.model.layers.{i}",
              qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
              up_gate=("mlp.up_proj", "mlp.gate_proj"), down="mlp.down_proj",
              qk_norm=("self_attn.q_norm", "self_attn.k_norm"))
NAMINGS = {"custom_llama": CUSTOM_LLAMA, "qwen2": QWEN, "qwen3": QWEN}


def _decoder_plan(cfg: ModelConfig, n: Naming) -> list[Entry]:
    d = cfg.decoder
    H, F, V = d.hidden_size, d.ffn_size, d.vocab_size
    q_rows, kv_rows = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    head = n.embed if d.tied else n.head  # tied: the head is the embedding (a stored head is not read: `unread`)
    plan = [_same("decoder.embed.weight", f"{n.embed}.weight", (V, H))]
    for i in range(d.n_layers):
        t, s = f"decoder.layers.{i}", n.layer.format(i=i)
        if n.interleaved_kv:
            qkv = [(f"{s}.{n.qkv[0]}", q_rows), (f"{s}.{n.qkv[1]}", 2 * kv_rows)]
            plan += _linear(f"{t}.attn.qkv", H, qkv, d.qkv_bias, QueryAndInterleavedKV(q_rows, d.head_dim))
        else:
            plan += _linear(f"{t}.attn.qkv", H, list(zip((f"{s}.{x}" for x in n.qkv), (q_rows, kv_rows, kv_rows))),
                            d.qkv_bias)
        plan += _linear(f"{t}.attn.out", q_rows, [(f"{s}.{n.out}", H)], d.out_bias)
        rows = (2 * F,) if len(n.up_gate) == 1 else (F, F)  # (one tensor already [up; gate], or the two stacked)
        plan += _linear(f"{t}.mlp.up_gate", H, list(zip((f"{s}.{x}" for x in n.up_gate), rows)), d.ffn_up_bias)
        plan += _linear(f"{t}.mlp.down", F, [(f"{s}.{n.down}", H)], d.ffn_down_bias)
        if d.qk_norm:  # (Qwen3) one RMSNorm weight over each head's D, for q and for k
            if n.qk_norm is None:
                raise CheckpointError("this naming has no q/k norms, but the config asks for them")
            plan += [_same(f"{t}.attn.{ours}.weight", f"{s}.{theirs}.weight", (d.head_dim,))
                     for ours, theirs in zip(("q_norm", "k_norm"), n.qk_norm)]
        plan.append(_same(f"{t}.attn_norm.weight", f"{s}.{n.attn_norm}.weight", (H,)))
        plan.append(_same(f"{t}.mlp_norm.weight", f"{s}.{n.mlp_norm}.weight", (H,)))
    plan.append(_same("decoder.norm.weight", f"{n.norm}.weight", (H,)))
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


def plan(cfg: ModelConfig, naming: str, quantization: dict | None = None) -> list[Entry]:
    """Every parameter of the composed model, in module order, with its checkpoint sources.

    naming: 'points' or a key of NAMINGS. `quantization` (our layout only): each quantized projection stores
    the tensors points.io.quantized.stored_tensors lists (its integer `weight` codes, a `scale`, for int4 an
    `offset`). A tied decoder's head is its embedding in every layout, ours too (stored once), unless it is
    stored quantized (then it is a tensor of its own)."""
    if naming == "points":
        quantized = set(quantized_weights(cfg, quantization))
        out = []
        for e in _decoder_plan(cfg, QWEN) + _vision_plan(cfg):  # (any naming with every part gives our targets)
            if e.target in quantized:
                module = e.target.removesuffix("weight")
                for suffix, (shape, dtype) in stored_tensors(quantization, *e.shape).items():
                    out.append(Entry(module + suffix, shape, (module + suffix,), (shape,), Same(), dtype))
            elif e.target == "decoder.lm_head.weight" and cfg.decoder.tied:  # stored once, as the embedding
                out.append(_same(e.target, "decoder.embed.weight", e.shape))
            else:
                out.append(_same(e.target, e.target, e.shape))
        return out
    if quantization:
        raise CheckpointError(f"quantized weights exist only in our own layout, not in {naming!r}")
    if naming not in NAMINGS:
        raise CheckpointError(f"tensor naming {naming!r} is not known; expected 'points' or one of {list(NAMINGS)}")
    return _decoder_plan(cfg, NAMINGS[naming]) + _vision_plan(cfg)


def quantized_weights(cfg: ModelConfig, quantization: dict | None) -> list[str]:
    """The weights a quantized checkpoint stores as integer codes (with a scale): the scheme's projections
    (points.io.quantized), lm_head when the checkpoint says so."""
    if not quantization:
        return []
    return [f"decoder.{m}.weight" for m in quantized_modules(cfg.decoder.n_layers, quantization["lm_head"])]


def is_dropped(name: str) -> bool:
    return name.startswith(DROPPED_PREFIXES) or name.endswith(DROPPED_SUFFIXES)


def unread(cfg: ModelConfig, naming: str) -> set[str]:
    """Tensors a checkpoint may store that this model never reads: a tied decoder's own lm_head (the official
    loader ties it to the embedding whatever the file holds; our layout stores it no more, but did)."""
    if not cfg.decoder.tied:
        return set()
    n = NAMINGS.get(naming)
    return {f"{n.head}.weight"} if n is not None else {"decoder.lm_head.weight"}


def check(entries: list[Entry], files: TensorFiles, absent: tuple[str, ...] = (),
          allowed: set[str] = frozenset()) -> None:
    """Strict agreement of the plan with the files, from headers alone (no tensor data read). `absent()`: the
    config.json fields the file leaves out, named in a mismatch (their defaults shaped what was expected);
    named only when there is a mismatch to explain. `allowed`: tensors the files may hold unplanned."""
    names = files.names

    def note() -> str:
        return (f"; config.json leaves out {_few(list(absent))}, so the class defaults shaped what was expected"
                if absent else "")

    wanted, integer = {}, {}
    for e in entries:
        wanted.update(zip(e.sources, e.source_shapes))
        if e.dtype is not None:
            integer.update(dict.fromkeys(e.sources, e.dtype))
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
            kind = str(integer[name]).removeprefix("torch.")
            if files.dtype_name(name) != SAFETENSORS_DTYPE[kind]:
                raise CheckpointError(f"{files.where(name)}: tensor {name} is {files.dtype_name(name)}; config.json "
                                      f"says it is quantized, so it must be {kind} ({SAFETENSORS_DTYPE[kind]})")
        elif files.dtype(name) is None:
            raise CheckpointError(f"{files.where(name)}: tensor {name} is not a floating tensor "
                                  f"({files.dtype_name(name)}); expected float32, float16 or bfloat16")


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
