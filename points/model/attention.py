"""Attention as the model computes it, and the per-forward facts its layers share.

The decoder's layers call `causal_attention`, the vision encoder's `varlen_attention`. What they need to
know about one forward is built once and handed to every layer: `AttentionMeta` (decoder: positions, how many
cache slots to read, whether the prefill starts from an empty cache, the cache, the kernel) and `Packing`
(vision: the bounds of the packed frames, the kernel). The kernel is a plain value in them, "sdpa" (PyTorch)
or "triton" (`points.kernels`, imported only when asked for), chosen by whoever runs the model
(`points.runtime.attention` holds the measured rule); the modules hold no kernel choice of their own, and a
model called without one runs SDPA.

Recording: either one may carry a `record` (an `AttentionRecord`; `points.runtime.look` has the one users
meet). The layers it `wants` then attend on the eager path, which computes the attention probabilities
(scores and softmax in float32) and hands them to `record.keep`; every other layer, and every forward
without a record, runs its kernel as before.

SDPA, decoder: grouped-query attention without repeating K/V: the `rep` query heads that share one KV
head are folded into the query-length axis, so each KV head meets one [rep * T, D] block of queries.
Queries are processed in chunks (`AttentionMeta.query_chunk`) so that no mask larger than
[B, 1, rep * query_chunk, S] is ever built (a 16k-token prefill would otherwise need a 1.9 GB mask), and
each chunk reads only the keys it can see. A prefill from position 0 needs no mask at all (SDPA's causal
kernel, GQA included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "triton")
QUERY_CHUNK = 512  # the default of AttentionMeta.query_chunk


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: expected one of {KERNELS}")
    return kernel


class AttentionRecord(Protocol):
    """What a forward records of its attention: `part` is "decoder" or "vision", `layer` the block's index.
    keep() gets decoder probabilities [B, Hq, T, S] (key slot s of the cache, s <= the query's position) and
    vision ones [H, n, n] for each frame (`frame`: its index in the packing), float32."""

    def wants(self, part: str, layer: int) -> bool: ...

    def keep(self, part: str, layer: int, probs: torch.Tensor, frame: int = 0) -> None: ...


@dataclass(frozen=True)
class AttentionMeta:
    """What every decoder layer's attention needs to know about one forward, computed once.

    positions [B, T]: the absolute position of every new token (rows may differ: a ragged batch).
    kv_len: how many cache slots attention reads ([0, kv_len); T without a cache). A plain int, so a compiled
        step specialises on it (`KVCache.block` keeps the number of distinct values small).
    fresh: every row starts at position 0 (a prefill from an empty cache, right padding included), so the
        plain causal mask holds.
    cache: where K/V are stored (at `positions`) and read from (a `points.model.cache.KVCache`); None keeps
        nothing.
    kernel: "sdpa" or "triton" for a prefill (T > 1); one-token steps always run SDPA.
    query_chunk: queries per masked SDPA call.
    record: an AttentionRecord, or None (the layers it wants run the eager path).
    segments: bounds (0, end of sequence 1, ..., T) of sequences packed into one row. Without a cache
        (training) each attends causally within itself only (its positions restarting at 0 is the caller's:
        `positions`). With a cache (`KVCache.pack`: prompt chunks, decode tokens and drafts of several rows in
        one forward) segment s belongs to cache row rows[s], starts at position starts[s], and attends to
        that row's slots up to each token's own position.
    rows, starts: per segment, with a cache (above). write_rows [1, T]: the cache row of every token.
    """

    positions: torch.Tensor
    kv_len: int
    fresh: bool
    cache: Any = None
    kernel: str = "sdpa"
    query_chunk: int = QUERY_CHUNK
    record: Any = None
    segments: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None
    write_rows: torch.Tensor | None = None

    def __post_init__(self):
        check_kernel(self.kernel)
        if self.segments is not None:
            b = self.segments
            cached = self.cache is not None
            if (self.positions.shape[0] != 1 or len(b) < 2 or b[0] != 0 or b[-1] != self.positions.shape[1]
                    or any(x >= y for x, y in zip(b[:-1], b[1:]))
                    or cached != (self.rows is not None and self.starts is not None and self.write_rows is not None)
                    or cached and not len(self.rows) == len(self.starts) == len(b) - 1):
                raise ValueError(f"AttentionMeta.segments {b}: expected increasing bounds from 0 to the row's "
                                 f"{self.positions.shape[1]} tokens in one row, and with a cache each segment's "
                                 "row and first position")

    @staticmethod
    def no_cache(batch_size: int, n_tokens: int, device: torch.device, kernel: str = "sdpa") -> "AttentionMeta":
        """A whole sequence from position 0, nothing kept."""
        positions = torch.arange(n_tokens, device=device).expand(batch_size, n_tokens)
        return AttentionMeta(positions, n_tokens, fresh=True, kernel=kernel)


# --------------------------------------------------------------------------- decoder: causal, cached

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                     layer: int) -> torch.Tensor:
    """The new tokens' q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D].

    With a cache, k/v are first stored at `meta.positions` of layer `layer` (here, once, whatever runs
    next); then each query attends to every key at a position <= its own. Query head h uses KV head
    h // (Hq / Hkv), as transformers' repeat_kv. Scale 1/sqrt(D); the softmax accumulates in float32.
    One path is then chosen: the eager one for a recorded layer, per segment for a packed sequence, the
    Triton kernel for a prefill (T > 1) when `meta.kernel` says so, SDPA otherwise (one-token steps always).
    """
    cache = meta.cache
    if cache is not None:
        cache.store(layer, meta, k, v)
    if meta.segments is not None:
        return packed_causal(q, k, v, meta.segments) if cache is None else _packed_cached(q, meta, layer)
    if meta.record is not None and meta.record.wants("decoder", layer):
        k, v = (k.transpose(1, 2), v.transpose(1, 2)) if cache is None else cache.keys(layer, meta.kv_len)
        y, probs = eager_causal(q.transpose(1, 2), k, v, meta.positions)
        meta.record.keep("decoder", layer, probs)
        return y.transpose(1, 2)
    if q.shape[1] > 1 and meta.kernel == "triton":
        return _triton_prefill(q, k, v, meta, layer)
    # [B, Hkv, T, D] new ones, or [B, Hkv, kv_len, D] views of the cache
    k, v = (k.transpose(1, 2), v.transpose(1, 2)) if cache is None else cache.keys(layer, meta.kv_len)
    return sdpa_causal(q.transpose(1, 2), k, v, meta.positions, meta.fresh, meta.query_chunk).transpose(1, 2)


def _packed_cached(q: torch.Tensor, meta: AttentionMeta, layer: int) -> torch.Tensor:
    """q [1, T, Hq, D] of segments packed by `KVCache.pack` (K/V stored already) -> [1, T, Hq, D]: each
    segment's queries against its own row's slots up to its last position (SDPA, one call per segment)."""
    out = []
    b = meta.segments
    for s, (start, end) in enumerate(zip(b[:-1], b[1:])):
        first = meta.starts[s]
        k, v = meta.cache.keys(layer, first + end - start, meta.rows[s])
        out.append(sdpa_causal(q[:, start:end].transpose(1, 2), k, v, meta.positions[:, start:end],
                               fresh=first == 0, query_chunk=meta.query_chunk))
    return (out[0] if len(out) == 1 else torch.cat(out, dim=2)).transpose(1, 2)


def packed_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
    """q [1, T, Hq, D], k/v [1, T, Hkv, D] of sequences packed into one row at `bounds` -> [1, T, Hq, D]: each
    sequence's causal attention on its own (SDPA's causal kernel with GQA, differentiable), nothing across."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
           for a, b in zip(bounds[:-1], bounds[1:])]
    return (out[0] if len(out) == 1 else torch.cat(out, dim=2)).transpose(1, 2)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                fresh: bool = False, query_chunk: int = QUERY_CHUNK) -> torch.Tensor:
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
    if T == 1:  # a decode step: the rep queries of a KV head share one row of the mask, broadcast
        visible = torch.arange(S, device=q.device) <= q_pos[:, :, None]  # [B, 1, S]
        return F.scaled_dot_product_attention(q.view(B, Hkv, rep, D), k, v, attn_mask=visible[:, None]).view(B, Hq, 1, D)
    q = q.view(B, Hkv, rep, T, D)
    out = []
    for start in range(0, T, query_chunk):
        end = min(start + query_chunk, T)
        n = S if end == T else S - T + end  # every query of this chunk sits below position S - T + end
        visible = torch.arange(n, device=q.device) <= q_pos[:, start:end, None]  # [B, t, n]
        mask = visible[:, None].repeat(1, 1, rep, 1)  # [B, 1, rep * t, n]: row r * t + i sees visible[i]
        qc = q[:, :, :, start:end].reshape(B, Hkv, rep * (end - start), D)
        y = F.scaled_dot_product_attention(qc, k[:, :, :n], v[:, :, :n], attn_mask=mask)
        out.append(y.reshape(B, Hkv, rep, end - start, D))  # CUDA kernels may return other strides
    y = out[0] if len(out) == 1 else torch.cat(out, dim=3)
    return y.reshape(B, Hq, T, D)


def eager_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
    """The same attention as `sdpa_causal`, written out: q [B, Hq, T, D], k/v [B, Hkv, S, D] ->
    (out [B, Hq, T, D], probabilities [B, Hq, T, S] float32). Scores and softmax in float32; the
    probabilities meet V in V's dtype, as transformers' eager attention does."""
    probs = _probs(q, k, torch.arange(k.shape[2], device=q.device) <= q_pos[:, None, :, None])
    return _apply(probs, v), probs


def _probs(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) in float32 over the visible keys; K/V heads shared by consecutive query heads."""
    rep = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(rep, dim=-3) if rep > 1 else k
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(dim=-1)


def _apply(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    rep = probs.shape[-3] // v.shape[-3]
    v = v.repeat_interleave(rep, dim=-3) if rep > 1 else v
    return torch.matmul(probs.to(v.dtype), v)


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
class Packing:
    """How the frames of a vision forward are packed, shared by every block.

    bounds: cu_seqlens as a host list (0, end of frame 1, ..., L), or None when only `cu` is known (a CUDA
        graph that replays with other images: the segments live on the device).
    cu: the same bounds as an int32 device tensor (trailing empty segments allowed), for the Triton kernel;
        made once per forward (`Packing.of`), not once per block.
    longest: an upper bound on every segment's length.
    kernel: "sdpa" (one call per frame; needs host bounds) or "triton" (one launch for all).
    record: an AttentionRecord, or None (the blocks it wants run the eager path, frame by frame).
    """

    bounds: list[int] | None
    cu: torch.Tensor | None
    longest: int
    kernel: str = "sdpa"
    record: Any = None

    def __post_init__(self):
        check_kernel(self.kernel)
        if self.kernel == "sdpa" and self.bounds is None:
            raise ValueError("Packing: SDPA runs one call per frame and needs host bounds; device bounds (cu "
                             "alone) need the Triton kernel")
        if self.kernel == "triton" and self.cu is None:
            raise ValueError("Packing: the Triton kernel reads the bounds from the device (cu)")

    @staticmethod
    def of(bounds: list[int], device: torch.device, kernel: str = "sdpa") -> "Packing":
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device) if kernel == "triton" else None
        return Packing(list(bounds), cu, longest, kernel)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing,
                     layer: int = 0) -> torch.Tensor:
    """Non-causal attention over packed sequences: q/k/v [L, H, D] -> [L, H, D] (`layer`: the block's index,
    for a record).

    Token i attends only to tokens of its own segment. Triton: one launch of the varlen flash kernel over
    every segment. SDPA: each segment on its own (empty ones skipped). Either way memory grows with the
    largest segment, never with L x L. Scale 1/sqrt(D).
    """
    record = packing.record
    if record is not None and record.wants("vision", layer):
        if packing.bounds is None:
            raise ValueError("Packing: recording attention needs host bounds")
        out = torch.empty_like(q)
        for frame, (start, end) in enumerate(zip(packing.bounds[:-1], packing.bounds[1:])):
            seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # [H, n, D]
            probs = _probs(seg[0], seg[1], None)
            record.keep("vision", layer, probs, frame)
            out[start:end] = _apply(probs, seg[2]).transpose(0, 1)
        return out
    if packing.kernel == "triton":
        from points.kernels.flash_varlen import flash_attn_varlen

        return flash_attn_varlen(q, k, v, packing.cu, packing.cu, packing.longest)
    out = torch.empty_like(q)
    bounds = packing.bounds
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [1, H, n, D]: the fused (flash) kernels take 4-D inputs only; 3-D falls back to materialised scores
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
    return out
