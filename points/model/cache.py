"""A preallocated static KV cache (gpt-fast style) for a batch whose rows have different lengths.

Layout per layer: K and V of shape [B, n_kv_heads, max_len, head_dim], written in place at each row's own
positions. `pos` [B] (a device tensor) is the next free position of every row; `span` (a host int) is an
upper bound on max(pos), so that attention reads only the first `span` slots without a host sync.

One forward over T new tokens per row: `meta = cache.reserve(T)` takes the next T slots of every row and
returns the `AttentionMeta` the decoder's layers share; `decoder(tokens, meta=meta)` then writes K/V there.
A batch of prompts of different lengths is prefilled right-padded in one call (`n_new` gives each row's
real length). The padding writes garbage K/V past a row's end, but those slots are never visible (keys are
masked by position, j <= p) and are overwritten by the row's next tokens.

Several rows' new tokens packed into one sequence (the scheduler's step: prompt chunks, decode tokens,
speculative drafts, each a segment at its own row and first position): `meta = cache.pack(segments)`.
Whoever runs the model tells the cache where each row stands (`arrange`, `restore`); only the cache
changes its own fields. Attention stores K/V through `store` (once per layer and forward) and reads them
through `keys`.
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
        self.layers = torch.arange(n_layers, device=device)[:, None, None]  # [n_layers, 1, 1]: see store
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
        v.layers = self.layers
        return v

    def pack(self, segments: list[tuple[int, int, int]]) -> AttentionMeta:
        """Segments (row, first position, tokens) of one packed forward (a sequence of one row holding them
        all, in this order) -> the AttentionMeta its layers share: each segment's tokens are stored in its
        row at its positions and attend causally to that row's slots up to their own position. Rows'
        positions (`pos`) are left as they were: the caller says where rows stand (`arrange`)."""
        rows, starts, bounds, positions, owner = [], [], [0], [], []
        for row, start, n in segments:
            if not 0 <= row < self.batch_size or start < 0 or n < 1 or start + n > self.max_len:
                raise ValueError(f"KV cache: segment (row {row}, positions {start}..{start + n - 1}) outside "
                                 f"{self.batch_size} rows of {self.max_len} positions")
            rows.append(row)
            starts.append(start)
            bounds.append(bounds[-1] + n)
            positions.extend(range(start, start + n))
            owner.extend([row] * n)
        both = torch.tensor([positions, owner], device=self.pos.device)  # (one copy to the device)
        end = max(s + n for _, s, n in segments)
        self.span = max(self.span, end)
        return AttentionMeta(both[0][None], end, fresh=False, cache=self,
                             segments=tuple(bounds), rows=tuple(rows), starts=tuple(starts),
                             write_rows=both[1][None])

    def store(self, layer: int, meta: AttentionMeta, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a forward's new k/v [B, T, Hkv, D] at meta.positions [B, T] of layer `layer` (row b of the
        batch in row b of the cache, or a packed sequence's tokens in their segments' rows)."""
        rows = self.rows if meta.write_rows is None else meta.write_rows
        # one index_put_ on the whole buffer (the layer an index too, not a view taken first): under
        # torch.compile that is written in place, where a write into a view of the buffer was functionalised
        # into a copy of the layer's whole cache, and back, every step
        at = (self.layers[layer], rows, slice(None), meta.positions)
        self.k[at] = k
        self.v[at] = v

    def keys(self, layer: int, kv_len: int, row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K, V over the first kv_len slots, [B, Hkv, kv_len, D] views (one row's: [1, ...])."""
        k, v = self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
        return (k, v) if row is None else (k[row:row + 1], v[row:row + 1])

    def arrange(self, lengths: list[int]) -> "KVCache":
        """Rows [0, len(lengths)) as a cache of their own (this one's memory, see view_rows) whose row i holds
        lengths[i] positions: where the next one-token step of each row writes (a free row: its own slot 0;
        a row between prompt chunks: the slot its next chunk overwrites)."""
        n = len(lengths)
        view = self if n == self.batch_size else self.view_rows(0, n)
        view.pos.copy_(torch.tensor(lengths, device=self.pos.device))
        view.span = max(lengths)
        return view

    def restore(self, row: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Row `row` holds the first n positions of k/v ([n_layers, 1, n_kv_heads, >= n, head_dim]) and
        nothing after them."""
        self.k[:, row:row + 1, :, :n] = k[:, :, :, :n]
        self.v[:, row:row + 1, :, :n] = v[:, :, :, :n]
        self.pos[row] = n
        self.span = max(self.span, n)

    def copy_row(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n positions of row `row`, copied out: [n_layers, 1, n_kv_heads, n, head_dim] each."""
        return self.k[:, row:row + 1, :, :n].clone(), self.v[:, row:row + 1, :, :n].clone()

    def carry(self, old: "KVCache") -> None:
        """Take every row of a smaller cache (the same rows, heads and layers): grown without losing K/V."""
        self.k[:, :, :, :old.max_len] = old.k
        self.v[:, :, :, :old.max_len] = old.v
        self.pos.copy_(old.pos)
        self.span = old.span

    def trim(self, length: int) -> None:
        """Forget every position >= length in every row (e.g. to reuse a shared prompt prefix)."""
        if length < 0:
            raise ValueError(f"trim length must be >= 0, got {length}")
        self.pos.clamp_(max=length)
        self.span = min(self.span, length)

    def reset(self) -> None:
        self.trim(0)
