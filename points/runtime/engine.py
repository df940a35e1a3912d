"""Running the decoder for generation, apart from its math: caches, prefill, the packed forward, the one-token
step. The loop over steps is the scheduler's (points.runtime.scheduler), the one under chat, run, serve and
`points bench`.

    engine = Engine(model.decoder, compile=True)      # or Engine(decoder): eager
    cache = engine.new_cache(batch, max_len)
    logits = engine.prefill(cache, tokens=prompts, lengths=lengths)      # [B, vocab] at each row's last token
    ids = engine.step(ids[:, None], cache, pick)                          # one token per row, chosen inside

- `new_cache` allocates the static KV cache. For a compiled step its length is rounded up to a power of two
  (>= 256) and attention reads it in 256-slot blocks, so that generating a few hundred tokens needs only a
  handful of graphs; its tensors are marked as static addresses, so CUDA graphs write them in place.
- `prefill` runs the right-padded prompts in one forward and returns each row's last logits; its attention
  kernel is the one `attn` asks for these shapes (points.runtime.attention).
- `step` is one token per row, with the choice of the next token (`points.runtime.sampling.Picker`) in the
  same function: eager, or compiled into one graph (`torch.compile(fullgraph=True)`; CUDA graphs on CUDA,
  `mode="reduce-overhead"`). A compiled step holds one graph per batch size (a ragged batch too) and key
  block; while it runs, dynamo's recompile limit is COMPILED_GRAPHS (a patch around the call, not a change
  to the process) so that none of them falls back to eager.
- `packed` runs several rows' new tokens as one sequence (prompt chunks, decode tokens, drafts:
  `KVCache.pack`), each segment attending to its own row.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from points.model.attention import AttentionMeta
from points.model.cache import KVCache
from points.runtime.attention import check_backend, prefill_kernel
from points.runtime.sampling import Picker

COMPILED_BLOCK = 256  # cache slots attention reads at a time under a compiled step (and the shortest cache)
# Graphs one compiled step may hold: one per (batch size, key block) pair met. Dynamo's default (8) would let
# a ragged batch of 1-8 rows crossing one block fall back to eager without a word.
COMPILED_GRAPHS = 64


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Engine:
    def __init__(self, decoder, *, compile: bool = False, mode: str | None = None, backend="inductor",
                 notice: Callable[[str], None] | None = _stderr, attn: str = "auto"):
        """decoder: a `points.Decoder`. compile: run the one-token step through torch.compile (mode defaults
        to "reduce-overhead", CUDA graphs, on CUDA); `backend` is torch.compile's (tests count graphs with one).
        notice: told once, before the first compiled step, that compiling takes a while (default: a line on
        stderr; None: silent). attn: the prefill's attention, "auto" | "sdpa" | "triton"."""
        self.decoder = decoder
        self.compiled = compile
        self.attn = check_backend(attn)
        self.notice, self._announced = notice, False
        self._step = self._forward_step
        if compile:
            if mode is None and decoder.embed.weight.device.type == "cuda":
                mode = "reduce-overhead"
            self._step = torch.compile(self._forward_step, mode=mode, backend=backend, fullgraph=True,
                                       dynamic=False)
            self._limit = torch._dynamo.config.patch(
                recompile_limit=max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS))

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache for `batch_size` rows of up to `max_len` positions (default: the context), shaped for the
        compiled step when there is one."""
        cfg = self.decoder.cfg
        max_len = max_len or cfg.max_seq_len
        if not self.compiled:
            return self.decoder.new_cache(batch_size, max_len)
        max_len = max(max_len, min(1 << (max(max_len, COMPILED_BLOCK) - 1).bit_length(), cfg.max_seq_len))
        cache = self.decoder.new_cache(batch_size, max_len, block=COMPILED_BLOCK)
        for t in (cache.k, cache.v):
            torch._dynamo.mark_static_address(t, guard=False)
        return cache

    @torch.inference_mode()
    def prefill(self, cache: KVCache, *, tokens: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts tokens [B, T] (or embeds [B, T, H]), right-padded to T, with lengths [B] real tokens each
        (default: all T) -> the logits [B, vocab] at each row's last real token; the cache holds them all."""
        B, T = (tokens if tokens is not None else embeds).shape[:2]
        meta = cache.reserve(T, lengths, kernel=prefill_kernel(self.attn, self.device, T, fresh=cache.span == 0))
        last = torch.full((B,), T - 1, device=self.device) if lengths is None else lengths - 1
        return self.decoder(tokens, embeds=embeds, meta=meta, last=last)

    @torch.inference_mode()
    def packed(self, cache: KVCache, segments: list[tuple[int, int, int]], embeds: torch.Tensor,
               want: list[int]) -> torch.Tensor:
        """One forward of several rows' new tokens packed in one sequence: segments (row, first position,
        tokens) in order, embeds [sum of tokens, H] -> the logits [len(want), vocab] (float32) at the packed
        indices `want` (KVCache.pack: each segment attends to its own row)."""
        last = torch.tensor([want], dtype=torch.long, device=self.device)
        return self.decoder(embeds=embeds[None], meta=cache.pack(segments), last=last)[0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: KVCache, pick: Picker | None = None) -> torch.Tensor:
        """One token per row: tokens [B, 1] -> the next ids [B] chosen by `pick`, or without one the logits
        [B, vocab] (float32)."""
        meta = cache.reserve(1)
        if self.compiled:
            if not self._announced and self.notice is not None:
                self.notice("points: compiling the decode step (torch.compile): the first tokens take a while, "
                            "then it runs fast")
            self._announced = True
            torch.compiler.cudagraph_mark_step_begin()  # earlier steps' outputs may be overwritten
            for t in (cache.k, cache.v, *(pick.buffers() if pick is not None else ())):
                torch._dynamo.mark_static_address(t, guard=False)  # read and written in place by the graph
                # (the scheduler hands in views of its cache's first rows: marked each call, never copied)
            with self._limit:  # (7 us a step)
                return self._step(tokens, meta, pick)
        return self._step(tokens, meta, pick)

    def _forward_step(self, tokens: torch.Tensor, meta: AttentionMeta, pick: Picker | None) -> torch.Tensor:
        logits = self.decoder(tokens, meta=meta)[:, -1]
        return logits if pick is None else pick(logits, tokens)
