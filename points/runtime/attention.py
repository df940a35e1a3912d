"""Attention dispatch: the one place the model's attention layers call into a kernel.

The model files say *what* attention computes (`causal_attention` for the decoder, `varlen_attention` for
the vision encoder); this file decides *how*: PyTorch SDPA, or the Triton varlen kernel (`points.kernels`)
when the backend chosen at construction asks for it and the device can run it. The per-forward facts the
decoder's layers share (positions, how many cache slots to read, whether the prefill starts from an empty
cache, the cache itself) are one `AttentionMeta`, built once per forward and handed to every layer.

SDPA, decoder: grouped-query attention without repeating K/V: the `rep` query heads that share one KV
head are folded into the query-length axis, so each KV head meets one [rep * T, D] block of queries.
Queries are processed in chunks so that no mask larger than [B, 1, rep * QUERY_CHUNK, S] is ever built
(a 16k-token prefill would otherwise need a 1.9 GB mask), and each chunk reads only the keys it can see.
A prefill from position 0 needs no mask at all (SDPA's causal kernel, GQA included).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from points.runtime.cache import KVCache

QUERY_CHUNK = 512
BACKENDS = ("auto", "sdpa", "triton")

# attn="auto" on CUDA chooses per call, from the shapes, whichever measured faster (tools/tune_attention.py and
# tools/probe_vision.py on an H200, bf16, 2026-11-27; figures in docs/benchmarks.md; applied to every CUDA device):
# - vision: Triton (one launch for every segment) when the longest segment has at most VISION_TRITON_SHORT
#   patches (the kernel alone is 0.75x SDPA on one 1024-patch image, but the whole 448x448 encode is 1.6x
#   faster without the per-segment launches), or when there are at least VISION_TRITON_MANY[0] segments of
#   at most VISION_TRITON_MANY[1] (64 x 256: 19x, 16 x 1024: 2.4x, 4 x 1024: 1.65x, 8 x 2048: 1.03x);
#   SDPA's flash kernel on fewer or longer segments (2 x 2048: 0.96x, 4 x 4096: 0.97x, 1 x 16384: 0.95x).
# - decoder prefill from an empty cache: SDPA's causal flash kernel (Triton through the cache measured 0.19x,
#   0.46x, 0.66x at 512, 2048, 8192 tokens); after cached tokens (SDPA needs an explicit mask there): Triton
#   from PREFILL_CACHED_TRITON new tokens on (2048 after 2048: 1.81x; 512 after 1024: 0.91x, so SDPA below).
VISION_TRITON_SHORT = 1024
VISION_TRITON_MANY = (4, 2048)
PREFILL_CACHED_TRITON = 1024


@dataclass(frozen=True)
class AttentionMeta:
    """What every decoder layer's attention needs to know about one forward, computed once.

    positions [B, T]: the absolute position of every new token (rows may differ: a ragged batch).
    kv_len: how many cache slots attention reads ([0, kv_len); T without a cache). A plain int, so a compiled
        step specialises on it (`KVCache.block` keeps the number of distinct values small).
    fresh: every row starts at position 0 (a prefill from an empty cache, right padding included), so the
        plain causal mask holds.
    cache: where K/V are stored (at `positions`) and read from; None keeps nothing.
    """

    positions: torch.Tensor
    kv_len: int
    fresh: bool
    cache: KVCache | None = None

    @staticmethod
    def no_cache(batch_size: int, n_tokens: int, device: torch.device) -> "AttentionMeta":
        """A whole sequence from position 0, nothing kept."""
        positions = torch.arange(n_tokens, device=device).expand(batch_size, n_tokens)
        return AttentionMeta(positions, n_tokens, fresh=True)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn = {backend!r}: expected one of {BACKENDS}")
    return backend


@functools.cache
def triton_installed() -> bool:
    """Looked up once: the dispatch runs on every prefill and every vision block."""
    return importlib.util.find_spec("triton") is not None


def auto_vision(longest: int, segments: int) -> bool:
    """attn="auto"'s choice for packed vision attention on CUDA: True = Triton."""
    many, at_most = VISION_TRITON_MANY
    return longest <= VISION_TRITON_SHORT or (segments >= many and longest <= at_most)


def auto_prefill(n_new: int, fresh: bool) -> bool:
    """attn="auto"'s choice for a decoder prefill of n_new tokens per row on CUDA: True = Triton."""
    return not fresh and n_new >= PREFILL_CACHED_TRITON


def use_triton(backend: str, device: torch.device, faster: bool = False) -> bool:
    """'sdpa' / 'triton' force one; 'auto' is Triton on CUDA, when installed, where `faster` (the caller's
    auto_vision / auto_prefill for its shapes) says it measured faster. Forcing Triton without it (or without
    CUDA, outside Triton's CPU interpreter) is a clear error."""
    check_backend(backend)
    have_triton = triton_installed()
    if backend == "triton":
        if not have_triton:
            raise ValueError("attn = 'triton' but Triton is not installed (pip install 'points[triton]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attn = 'triton' needs CUDA tensors, got {device} (or set TRITON_INTERPRET=1 to "
                             "run the kernels in Triton's CPU interpreter)")
        return True
    return backend == "auto" and faster and device.type == "cuda" and have_triton


# --------------------------------------------------------------------------- decoder: causal, cached

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, layer: int,
                     backend: str) -> torch.Tensor:
    """The new tokens' q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D].

    With a cache, k/v are first stored at `meta.positions` of layer `layer`; then each query attends to every
    key at a position <= its own (the cache's first `meta.kv_len` slots). Query head h uses KV head
    h // (Hq / Hkv), as transformers' repeat_kv. Scale 1/sqrt(D); the softmax accumulates in float32. A
    prefill (T > 1) runs on the Triton kernel when `backend` chooses it (auto: `auto_prefill`); one-token steps
    stay on SDPA.
    """
    cache = meta.cache
    T = q.shape[1]
    if T > 1 and use_triton(backend, q.device, auto_prefill(T, meta.fresh)):
        if cache is not None:
            cache.write(layer, meta.positions, k, v, meta.kv_len)
        return _triton_prefill(q, k, v, meta, layer)
    if cache is None:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
    else:
        k, v = cache.write(layer, meta.positions, k, v, meta.kv_len)  # [B, Hkv, kv_len, D]
    return sdpa_causal(q.transpose(1, 2), k, v, meta.positions, meta.fresh).transpose(1, 2)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                fresh: bool = False) -> torch.Tensor:
    """q [B, Hq, T, D]; k/v [B, Hkv, S, D]; q_pos [B, T] absolute positions -> [B, Hq, T, D].

    fresh: every row's queries sit at positions 0..T-1 and its keys are the first T slots (right padding
    included, whose rows are never read). Then the plain causal mask holds and, on the CPU or in half
    precision, SDPA's causal flash kernel runs with GQA and no mask at all.

    Otherwise key j is visible to the query at position p iff j <= p; S bounds every position + 1; slots
    past a row's position are masked whatever they hold. With several query chunks, chunk c reads only the
    first S - T + end_c keys.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    if fresh and T > 1 and (q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16)):
        return F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True, enable_gqa=True)
    S = k.shape[2]
    q = q.view(B, Hkv, rep, T, D)
    out = []
    for start in range(0, T, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, T)
        n = S if end == T else S - T + end  # every query of this chunk sits below position S - T + end
        visible = torch.arange(n, device=q.device) <= q_pos[:, start:end, None]  # [B, t, n]
        mask = visible[:, None].repeat(1, 1, rep, 1)  # [B, 1, rep * t, n]: row r * t + i sees visible[i]
        qc = q[:, :, :, start:end].reshape(B, Hkv, rep * (end - start), D)
        y = F.scaled_dot_product_attention(qc, k[:, :, :n], v[:, :, :n], attn_mask=mask)
        out.append(y.reshape(B, Hkv, rep, end - start, D))  # CUDA kernels may return other strides
    y = out[0] if len(out) == 1 else torch.cat(out, dim=3)
    return y.reshape(B, Hq, T, D)


def _triton_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, layer: int):
    """Causal attention of a prefill on the Triton varlen kernel. With a cache (k/v already written into
    it) the kernel reads the cache in place, each row using its first position + T slots; GQA without
    repeated K/V either way."""
    from points.kernels.flash_varlen import flash_attn_cache, flash_attn_varlen

    B, T, H, D = q.shape
    if meta.cache is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
        out = flash_attn_varlen(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                cu, cu, T, causal=True)
        return out.view(B, T, H, D)
    return flash_attn_cache(q, meta.cache.k[layer], meta.cache.v[layer], meta.positions[:, -1] + 1)


# --------------------------------------------------------------------------- vision: packed, non-causal

@dataclass(frozen=True)
class Segments:
    """Packed segments as a device tensor, for a CUDA graph that replays with other images: cu [n + 1] int32
    (trailing empty segments allowed) and `longest`, an upper bound on every segment's length. Only the
    Triton kernel reads them (SDPA's per-segment loop needs host bounds)."""

    cu: torch.Tensor
    longest: int


@functools.lru_cache(maxsize=16)
def _cu_seqlens(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The bounds as an int32 device tensor, copied once per image batch rather than once per block."""
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int] | Segments,
                     backend: str = "auto") -> torch.Tensor:
    """Non-causal attention over packed sequences: q/k/v [L, H, D] -> [L, H, D].

    `bounds` is cu_seqlens as a host list (0, end of segment 1, ..., L); token i attends only to tokens of
    its own segment. Triton path (auto: `auto_vision`): one launch of the varlen flash kernel over every
    segment. SDPA path: each segment on its own (empty ones skipped). Either way memory grows with the largest
    segment, never with L x L. Scale 1/sqrt(D). `Segments` (device bounds) always take the Triton kernel.
    """
    if isinstance(bounds, Segments):
        from points.kernels.flash_varlen import flash_attn_varlen

        if backend == "sdpa":
            raise ValueError("varlen_attention: device Segments need the Triton kernel, but attn = 'sdpa'")
        return flash_attn_varlen(q, k, v, bounds.cu, bounds.cu, bounds.longest)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if use_triton(backend, q.device, auto_vision(longest, len(bounds) - 1)):
        from points.kernels.flash_varlen import flash_attn_varlen

        cu = _cu_seqlens(tuple(bounds), q.device)
        return flash_attn_varlen(q, k, v, cu, cu, longest)
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [1, H, n, D]: the fused (flash) kernels take 4-D inputs only; 3-D falls back to materialised scores
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
    return out
