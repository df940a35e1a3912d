"""Prefix caching: the KV cache of recent conversations, reused by the next call that starts the same way.

A cached entry is the K/V of every position a generation wrote (prompt, then the reply tokens fed back),
keyed by what determined them: per position the token id, except inside an image, where the position's key
is the image's identity (a digest of its pixel values and grid). Two different images of the same size give
identical `<|image_pad|>` runs, so ids alone would match them; with the identity they differ from the first
image position on. A new prompt reuses the longest common prefix with any entry (never ending inside an
image, and always leaving at least one token to prefill so that there are logits), copies that many K/V
positions into a fresh cache, runs the vision encoder only for the images after it, and prefills only the
rest. Because K/V at a position depend only on the keys before it, the result is the same computation as
without the cache, up to float summation order (greedy replies equal in float32; tested).

The store is an LRU bounded by a token budget: every entry holds exactly its positions (K/V copied out,
[n_layers, 1, n_kv_heads, positions, head_dim] each); the oldest entries go first until the total fits, and
an entry whose key is a prefix of a newer one is dropped (the newer one covers it). Memory per token is
2 x n_layers x n_kv_heads x head_dim x dtype bytes: 57 KB for the 7B decoder in bf16, so the default budget
of 16384 tokens is about 0.9 GB there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from points.model.cache import KVCache

DEFAULT_BUDGET = 16384  # tokens over all entries


def image_key(pixel_values: torch.Tensor, grid: torch.Tensor) -> int:
    """A negative int identifying one image's processed pixels and grid (token ids are >= 0)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(int(g) for g in grid)).encode())
    h.update(pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return -1 - (int.from_bytes(h.digest(), "little") >> 1)


def prompt_key(ids: list[int], image_pad_id: int, pixel_values: torch.Tensor | None,
               grid_thw: torch.Tensor | None, merge: int = 4) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """ids -> (key per position, images as (first position, positions, first pixel row, pixel rows)): each
    image pad run gets its image's identity, in prompt order."""
    key, images = list(ids), []
    runs = []
    i = 0
    while i < len(ids):
        if ids[i] == image_pad_id:
            j = i
            while j < len(ids) and ids[j] == image_pad_id:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    grids = [] if grid_thw is None else [tuple(int(v) for v in g) for g in grid_thw]
    # runs of adjacent images would merge; the chat template puts <|vision_end|> between images, but split
    # by the grids anyway
    split = []
    for start, n in runs:
        while n > 0 and len(split) < len(grids):
            want = grids[len(split)][0] * grids[len(split)][1] * grids[len(split)][2] // merge
            split.append((start, want))
            start, n = start + want, n - want
    if len(split) != len(grids) or sum(n for _, n in runs) != sum(n for _, n in split):
        raise ValueError(f"prompt_key: {sum(n for _, n in runs)} image pad tokens do not match the grids {grids}")
    row = 0
    for (start, n), grid in zip(split, grids):
        rows = grid[0] * grid[1] * grid[2]
        ident = image_key(pixel_values[row:row + rows], torch.tensor(grid))
        key[start:start + n] = [ident] * n
        images.append((start, n, row, rows))
        row += rows
    return key, images


@dataclass
class Entry:
    key: list[int]
    k: torch.Tensor  # [n_layers, 1, n_kv_heads, len(key), head_dim]
    v: torch.Tensor


class PrefixCache:
    def __init__(self, budget_tokens: int = DEFAULT_BUDGET, max_entries: int = 8):
        if budget_tokens < 1 or max_entries < 1:
            raise ValueError(f"prefix cache: budget_tokens and max_entries must be >= 1, got {budget_tokens}, "
                             f"{max_entries}")
        self.budget, self.max_entries = budget_tokens, max_entries
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self._next = 0
        self.hits = self.reused_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(len(e.key) for e in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()

    def match(self, key: list[int], limit: int) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `key` (the most recent one among equals) and that length
        (at most `limit`), never ending inside an image run; the entry becomes the most recently used."""
        best, best_n = None, 0
        for slot, e in self.entries.items():
            n, m = 0, min(len(e.key), len(key), limit)
            while n < m and e.key[n] == key[n]:
                n += 1
            while 0 < n < len(key) and key[n] < 0 and key[n - 1] == key[n]:  # inside an image: back to its start
                n -= 1
            if n > 0 and n >= best_n:  # ties go to the most recent entry (iteration is oldest first)
                best, best_n, best_slot = e, n, slot
        if best is not None:
            self.entries.move_to_end(best_slot)
            self.hits += 1
            self.reused_tokens += best_n
        return best, best_n

    def put(self, key: list[int], cache: KVCache, row: int = 0) -> None:
        """Keep the first len(key) positions of row `row` of `cache` under `key`, then drop what the budget and
        the entry limit cannot hold (oldest first) and every entry the new one covers."""
        n = len(key)
        if n == 0 or n > self.budget:
            return
        for slot in [s for s, e in self.entries.items() if len(e.key) <= n and e.key == key[:len(e.key)]]:
            del self.entries[slot]
        entry = Entry(list(key), *cache.copy_row(row, n))
        self.entries[self._next] = entry
        self._next += 1
        while self.entries and (self.tokens > self.budget or len(self.entries) > self.max_entries):
            self.entries.popitem(last=False)

    def restore(self, entry: Entry, n: int, cache: KVCache, row: int = 0) -> None:
        """The entry's first n positions into row `row` of `cache` (which then holds those alone)."""
        cache.restore(row, entry.k, entry.v, n)
