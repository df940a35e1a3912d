"""The runner: what executes a scheduler step. It owns the model, the engine, the KV cache, the vision-feature
cache, the per-row sampling rules and every tensor a step needs; the scheduler (points.runtime.scheduler)
tells it which rows do what and holds none of them.

A step is one of two forwards:
- `decode`: one token for each row of [0, n) (the engine's step: eager, or compiled with the choice of the
  next token inside the graph); rows not generating feed a dummy token at a slot nobody reads.
- `mixed`: one packed forward (`KVCache.pack`) of prompt chunks (several prompts, each up to the step's
  token budget, a long one over several steps), the generating rows' next tokens, and their speculative
  drafts (points.runtime.speculative): prefills are batched, a long prompt joins a running batch without
  stopping it for longer than one chunk, and drafts are verified in the same forward.
Before a prompt's chunks, `begin` puts the longest cached prefix in its row (points.runtime.prefix), runs the
vision encoder for the images after it (or takes their features from the vision cache) and keeps the
prompt's remaining embeddings until its chunks have run.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from points.runtime.engine import Engine
from points.runtime.prefix import PrefixCache, prompt_key
from points.runtime.sampling import Picker
from points.runtime.speculative import verify
from points.runtime.vision import FeatureCache, image_features


class Chunk(NamedTuple):
    """Prompt positions [start, start + n) of row `row` (its request's), prefilled this step; the last chunk
    of a prompt chooses the first token."""

    row: int
    request: object
    start: int
    n: int
    last: bool


class Decoding(NamedTuple):
    """A generating row this step: its length in the cache, the token it feeds, the drafts after it."""

    row: int
    request: object
    pos: int
    token: int
    drafts: list[int]


class Runner:
    def __init__(self, model, engine: Engine, max_batch: int, vision_cache: FeatureCache | None = None):
        self.model, self.engine, self.max_batch, self.vision_cache = model, engine, max_batch, vision_cache
        self.cache = None
        self.pick = Picker(max_batch, model.decoder.cfg.vocab_size, engine.device)
        self.next_input = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self.pending: dict[int, torch.Tensor] = {}  # row -> its prompt's embeddings not yet prefilled [T, H]

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def use_engine(self, engine: Engine) -> None:
        self.engine, self.cache = engine, None

    # ------------------------------------------------------------------ a request's row

    def begin(self, i: int, request, prefix: PrefixCache | None, positions: int) -> tuple[list[int], int]:
        """Request into row i (a cache of at least `positions` positions): its cached prefix restored, the
        features of its later images, its remaining embeddings kept for its chunks. Returns (the prompt's
        prefix-cache key, positions restored)."""
        model, ids, prompt = self.model, request.ids, request.prompt
        key, images = prompt_key(ids, model.image_token_id, prompt.pixel_values, prompt.grid_thw)
        entry, reused = prefix.match(key, len(ids) - 1) if prefix is not None else (None, 0)
        self.reserve(positions)
        if entry is not None:
            prefix.restore(entry, reused, self.cache, i)
        later = [im for im in images if im[0] >= reused]  # the images before `reused` are in the cache already
        features = self._features(request, images, later, key) if later else None
        self.pending[i] = model.embed(torch.tensor([ids[reused:]], device=self.device), features)[0]
        return key, reused

    def _features(self, request, images: list, later: list, key: list[int]) -> torch.Tensor:
        """The features of the prompt's images `later` (prompt_key's), in order: from the vision cache where it
        holds them (keyed by the image's content and grid), the others encoded in one call and kept."""
        prompt, got, todo = request.prompt, {}, []
        for im in later:
            found = self.vision_cache.get(key[im[0]]) if self.vision_cache is not None else None
            if found is None:
                todo.append(im)
            else:
                got[im[0]] = found
        request.images_cached = len(later) - len(todo)
        if todo:
            start = time.perf_counter()
            encoded = image_features(self.model, torch.cat([prompt.pixel_values[r:r + n] for _, _, r, n in todo]),
                                     torch.stack([prompt.grid_thw[images.index(im)] for im in todo]),
                                     self.engine.attn)
            if encoded.is_cuda:  # (the time the encoder took, not the time to queue it)
                torch.cuda.synchronize(encoded.device)
            request.images_encoded, request.vision_seconds = len(todo), time.perf_counter() - start
            for im, part in zip(todo, encoded.split([im[1] for im in todo])):
                got[im[0]] = part
                if self.vision_cache is not None:
                    self.vision_cache.put(key[im[0]], part if len(todo) == 1 else part.clone())  # (not a view)
        return torch.cat([got[im[0]] for im in later])

    def free(self, i: int) -> None:
        """Row i's request left: greedy again (no noise, no sampling graph), nothing pending."""
        self.pick.set_row(i)
        self.pending.pop(i, None)

    def keep(self, prefix: PrefixCache, key: list[int], i: int) -> None:
        """The first len(key) positions of row i into the prefix cache under `key`."""
        prefix.put(key, self.cache, i)

    def reserve(self, positions: int) -> None:
        """A cache of at least `positions` positions per row, the busy rows' K/V carried over."""
        if self.cache is not None and self.cache.max_len >= positions:
            return
        want = max(positions, 2 * self.cache.max_len if self.cache is not None else 0)
        want = min(1 << (want - 1).bit_length(), self.model.decoder.cfg.max_seq_len)
        new = self.engine.new_cache(self.max_batch, max(want, positions))
        if self.cache is not None:
            new.carry(self.cache)
        self.cache = new

    # ------------------------------------------------------------------ steps

    def decode(self, lengths: list[int], n: int, constrained: dict) -> tuple[list[int], dict]:
        """One token for rows [0, n) (lengths: the positions every row holds; a row not generating writes a
        dummy at a slot nobody reads: a free row its slot 0, a prompt between chunks the slot its next chunk
        overwrites); constrained: row -> its Constraint. Returns the chosen ids of rows [0, n) (or more,
        compiled) and the recorded log-probabilities by row."""
        if self.engine.compiled:  # a few row counts (powers of two), so a few graphs per key block
            n = min(self.max_batch, 1 << (n - 1).bit_length())
        view = self.cache.arrange(lengths[:n])
        pick = self.pick if n == self.max_batch else self.pick.view(0, n)
        for i, constraint in constrained.items():
            constraint.allowed(self.pick.allowed[i])
        pick.draw()
        chosen = self.engine.step(self.next_input[:n, None], view, pick)
        self.next_input[:n] = chosen
        return chosen.tolist(), self._read_logprobs(pick, range(n))

    def mixed(self, decoding: list[Decoding], chunks: list[Chunk]) -> tuple[dict, dict, dict]:
        """One packed forward of the generating rows' tokens (and drafts) and the prompt chunks. Returns (row ->
        its new tokens: one, or the drafts kept and the one after them; row -> recorded log-probabilities;
        row -> drafts kept)."""
        segments, parts, want, firsts = [], [], [], []  # firsts: each generating row's first index in `want`
        at = 0
        if decoding:
            fed = [t for d in decoding for t in [d.token, *d.drafts]]
            parts.append(self.model.decoder.embed(torch.tensor(fed, device=self.device)))
        for d in decoding:
            n = 1 + len(d.drafts)
            segments.append((d.row, d.pos, n))
            firsts.append(at)
            want.extend(range(at, at + n))
            at += n
        for c in chunks:
            segments.append((c.row, c.start, c.n))
            parts.append(self.pending[c.row][:c.n])
            at += c.n
            if c.last:
                want.append(at - 1)
        logits = self.engine.packed(self.cache, segments, torch.cat(parts), want)  # [len(want), V]
        tokens, recorded, kept = {}, {}, {}
        if decoding:  # the choice for rows [0, last generating row], as a decode step makes it
            n = decoding[-1].row + 1
            view = self.pick if n == self.max_batch else self.pick.view(0, n)
            rows = torch.zeros(n, logits.shape[-1], device=self.device)
            index = torch.tensor([d.row for d in decoding], device=self.device)
            rows[index] = logits[torch.tensor(firsts, device=self.device)]
            for d in decoding:
                if d.request.constraint is not None:
                    d.request.constraint.allowed(self.pick.allowed[d.row])
            view.draw()
            chosen = view(rows, self.next_input[:n, None])
            recorded.update(self._read_logprobs(view, [d.row for d in decoding]))
            chosen = chosen.tolist()
            for d, first in zip(decoding, firsts):
                if d.drafts:
                    got, nxt = verify(logits[first:first + 1 + len(d.drafts)], d.drafts, self.pick.rules[d.row],
                                      self.pick.generators[d.row])
                    tokens[d.row], kept[d.row] = d.drafts[:got] + [nxt], got
                else:
                    tokens[d.row] = [chosen[d.row]]
        j = len(want) - sum(c.last for c in chunks)
        for c in chunks:
            self.pending[c.row] = self.pending[c.row][c.n:]
            if c.last:  # (after the generating rows' choice: set_row clears what it wrote into this row)
                del self.pending[c.row]
                tokens[c.row] = [self._first(c.row, c.request, logits[j:j + 1], recorded)]
                j += 1
        for row, ids in tokens.items():
            self.next_input[row] = ids[-1]
        return tokens, recorded, kept

    def _first(self, i: int, request, logits: torch.Tensor, recorded: dict) -> int:
        """A prompt's first token from its last position's logits [1, V], under its request's rule."""
        cfg = request.cfg
        self.pick.set_row(i, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                          penalty=cfg.repetition_penalty, seed=cfg.seed, logprobs=cfg.logprobs is not None,
                          constrained=request.constraint is not None)
        if request.constraint is not None:
            request.constraint.allowed(self.pick.allowed[i])
        pick = self.pick.view(i, i + 1)
        pick.draw()
        first = int(pick(logits)[0])
        if cfg.logprobs is not None:
            recorded.update(self._read_logprobs(pick, [0], offset=i))
        return first

    @staticmethod
    def _read_logprobs(pick: Picker, rows, offset: int = 0) -> dict:
        """Row (`offset` + its index in `pick`) -> (log-probability of its token, [(id, log-probability)] of the
        most likely), for the `rows` of `pick` whose request asked (one host read of the recorded buffers)."""
        asking = [r for r in rows if pick.rules[r].logprobs]
        if not asking:
            return {}
        chosen = pick.chosen_logprob.tolist()
        top, ids = pick.top_logprob.tolist(), pick.top_id.tolist()
        return {offset + r: (chosen[r], list(zip(ids[r], top[r]))) for r in asking}
