"""Speculative decoding without a second model: tokens drafted from the text itself, verified k at a time.

    pipe.chat(messages, speculative="ngram")          # or points serve --speculative ngram
    drafter = NgramDrafter(k=4)                        # the same, with its settings

A drafter proposes up to k tokens that may come next; the scheduler feeds the row's last token and the k
drafts in one forward (a segment of k + 1 tokens at the row's positions) and `verify` decides how many
to keep from the k + 1 distributions it gets back. Every kept draft and the token chosen after them cost one
forward together; the K/V written for rejected drafts lie past the row's new length, masked and then
overwritten (the cache is rolled back by its length alone).

The rule (Leviathan et al. 2023, Chen et al. 2023) with a drafter that proposes one token for sure (its
distribution q is a point mass): draft d at distribution p is kept with probability p(d); at the first one
rejected the next token is drawn from p with d removed, renormalised (max(p - q, 0) normalised); if every
draft is kept, one more token is drawn from the last distribution. The kept tokens then follow p exactly:
sampled output has the distribution of plain decoding, and greedy output (p: the argmax) is the same tokens.
p is the row's own rule (temperature, top-k, top-p, min-p: points.runtime.sampling.filtered_probs).

NgramDrafter is prompt lookup (transformers' `prompt_lookup_num_tokens`, vLLM's ngram proposer,
llama.cpp's lookup): the longest suffix of the text so far (n_max tokens down to n_min) that occurred before
in the prompt or the output, and the k tokens that followed its latest earlier occurrence. It pays on text
that repeats what came before (a document read back, a table, code edited); on anything else it proposes
nothing and the row decodes as usual.
"""

from __future__ import annotations

from typing import Protocol

import torch

from points.runtime.sampling import Rule, filtered_probs


class Drafter(Protocol):
    """Makes one request's draft state: `start(prompt_ids)` -> an object whose `propose(generated, k)` returns
    up to k token ids that may follow prompt_ids + generated (an empty list: no draft this step)."""

    def start(self, prompt_ids: list[int]): ...


class NgramDrafter:
    def __init__(self, k: int = 4, n_max: int = 3, n_min: int = 1):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ValueError(f"speculative tokens k = {k!r}: expected an integer from 1 to 32")
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes {n_min}..{n_max}: expected 1 <= n_min <= n_max")
        self.k, self.n_max, self.n_min = k, n_max, n_min

    def start(self, prompt_ids: list[int]) -> "_Lookup":
        return _Lookup(self, prompt_ids)

    def __repr__(self) -> str:
        return f"NgramDrafter(k={self.k}, n_max={self.n_max}, n_min={self.n_min})"


class _Lookup:
    """One request's n-gram index: for every n, each n-gram's latest end before the text's current end."""

    def __init__(self, drafter: NgramDrafter, prompt_ids: list[int]):
        self.d, self.text, self.seen, self.fed = drafter, [], {}, 0
        self._extend(list(prompt_ids))

    def _extend(self, tokens: list[int]) -> None:
        text, seen = self.text, self.seen
        for t in tokens:
            text.append(t)
            end = len(text) - 1  # the n-grams ending one token back: the newest stays out of its own index
            for n in range(self.d.n_min, min(self.d.n_max, end) + 1):
                seen[tuple(text[end - n:end])] = end

    def propose(self, generated: list[int], k: int) -> list[int]:
        self._extend(generated[self.fed:])
        self.fed = len(generated)
        text = self.text
        for n in range(min(self.d.n_max, len(text)), self.d.n_min - 1, -1):
            end = self.seen.get(tuple(text[len(text) - n:]))
            if end is not None:
                return text[end:end + min(k, self.d.k)]
        return []


def drafter(value) -> object | None:
    """A request's or a server's `speculative` setting -> a drafter: None / "off" (none), "ngram" (NgramDrafter
    with k = 4), "ngram:K", or an object with start() (tests' and benchmarks' oracle drafters)."""
    if value is None or value == "off":
        return None
    if isinstance(value, str):
        name, _, k = value.partition(":")
        if name == "ngram":
            try:
                return NgramDrafter(int(k)) if k else NgramDrafter()
            except ValueError as e:
                raise ValueError(f"speculative = {value!r}: {e}") from None
        raise ValueError(f"speculative = {value!r}: expected 'ngram', 'ngram:K' (K drafted tokens) or 'off'")
    if callable(getattr(value, "start", None)):
        return value
    raise ValueError(f"speculative = {value!r}: expected 'ngram', 'ngram:K', 'off' or a drafter")


def verify(logits: torch.Tensor, drafts: list[int], rule: Rule, generator: torch.Generator | None) -> tuple[int, int]:
    """logits [k + 1, V] float32 (after the row's last token, then after each of its k drafts) -> (drafts
    kept, the token after them), by the rule above; a greedy row keeps the drafts its argmax agrees with."""
    k = len(drafts)
    if rule.temperature == 0:
        best = logits.argmax(-1).tolist()
        kept = 0
        while kept < k and best[kept] == drafts[kept]:
            kept += 1
        return kept, best[kept]
    probs = filtered_probs(logits, rule.temperature, rule.top_k, rule.top_p, rule.min_p)  # [k + 1, V]
    d = torch.tensor(drafts, device=logits.device)
    p_draft = probs[torch.arange(k, device=logits.device), d]
    u = torch.rand(k, generator=generator, device=logits.device)
    rejected = (u >= p_draft).tolist()
    kept = rejected.index(True) if True in rejected else k
    p = probs[kept]
    if kept < k:  # (rejected: p(d) < 1, so mass is left once d is removed)
        p = p.clone()
        p[drafts[kept]] = 0
    return kept, int(torch.multinomial(p, 1, generator=generator))
