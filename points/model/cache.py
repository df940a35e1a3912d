"""A preallocated static KV cache (gpt-fast style) for a batch whose rows have different lengths.

Layout per layer: K and V of shape [B, n_kv_heads, max_len, head_dim], written in place at each row's own
positions. `pos` [B] (a device tensor) is the next free position of every row; `span` (a host int) is an
upper bound on max(pos), so that attention reads only the first `span` slots without a host sync.

One forward over T new tokens per row: `meta = cache.reserve(T)` takes the next T slots of every row and
returns the `AttentionMeta` the decoder's layers share; `decoder(tokens, meta=meta)` then writes K/V there.
A batch of prompts of different lengths is prefilled right-padded in one call (`n_new` gives each row's
real length). The padding writes garbage K/V past a row's end, but those slots are never visible (keys are
masked by position, j <= p) and are overwritten by the row's next tokens.
"""

from __future__ import annotations

import torch

from points.model.attention import AttentionMeta


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 *, dtype: torch.dtype, device: torch.device | str, block: int = 1):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # [B, 1] for row-wise writes
        self.span = 0
        self.max_len = max_len
        self.block = block  # attention reads whole blocks of slots: fewer distinct shapes for compiled steps

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reserve(self, n_tokens: int, n_new: torch.Tensor | None = None, *, kernel: str = "sdpa") -> AttentionMeta:
        """The next n_tokens slots of every row, of which n_new[b] hold real tokens (default: all): their
        positions, how many slots attention must read (span + n_tokens, rounded up to whole blocks) and
        whether this is the first forward; `kernel` is the prefill's attention kernel (AttentionMeta). The
        cache counts them as used from now on."""
        if self.span + n_tokens > self.max_len:
            raise ValueError(f"KV cache overflow: {self.span} positions used + {n_tokens} new > max_len "
                             f"{self.max_len}; allocate a larger cache")
        positions = self.pos[:, None] + torch.arange(n_tokens, device=self.pos.device)  # [B, n_tokens]
        kv_len = min(self.max_len, -(-(self.span + n_tokens) // self.block) * self.block)
        meta = AttentionMeta(positions, kv_len, fresh=self.span == 0, cache=self, kernel=kernel)
        self.pos += n_tokens if n_new is None else n_new
        self.span += n_tokens
        return meta

    def view_rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own, sharing this one's memory (a forward through it
        writes these rows in place) with its own `span` (an upper bound for those rows alone)."""
        v = object.__new__(KVCache)
        v.k, v.v, v.pos = self.k[:, start:stop], self.v[:, start:stop], self.pos[start:stop]
        v.rows, v.span, v.max_len, v.block = self.rows[:stop - start], self.span, self.max_len, self.block
        return v

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Store k/v [B, T, Hkv, D] at positions [B, T]; return this layer's K, V for the first kv_len
        slots as [B, Hkv, kv_len, D] views."""
        self.k[layer][self.rows, :, positions] = k
        self.v[layer][self.rows, :, positions] = v
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]

    def trim(self, length: int) -> None:
        """Forget every position >= length in every row (e.g. to reuse a shared prompt prefix)."""
        if length < 0:
            raise ValueError(f"trim length must be >= 0, got {length}")
        self.pos.clamp_(max=length)
        self.span = min(self.span, length)

    def reset(self) -> None:
        self.trim(0)
