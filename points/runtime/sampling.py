"""Choosing the next token: logits [B, V] float32 -> token ids [B], as tensor ops only (no host sync),
so that it runs inside the compiled decode step, in the same graph as the model.

Greedy (temperature 0) is argmax. Sampling is Gumbel-max: softmax(logits / temperature) after top-k and
top-p filtering, divided by exponential noise drawn outside the graph from the seeded generator; the argmax
of that is a draw from the filtered distribution (the same law as torch.multinomial, a different stream).
The repetition penalty is transformers' rule over every token seen so far (prompt and reply).
"""

from __future__ import annotations

import math

import torch


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' positive logits / penalty, negative ones * penalty."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top_k tokens (0 = all) and to the smallest
    most-likely prefix whose mass reaches top_p (never empty)."""
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits.softmax(-1)


class Picker:
    """The next-token rule of one generation call.

    seen [B, V] bool (penalty only) is updated in place with every token fed back; `noise` [B, V] is drawn
    by `draw()` before each step (outside any compiled graph, from the seeded generator). `buffers()` are
    the tensors a call reads or writes in place."""

    def __init__(self, batch: int, vocab: int, device: torch.device, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0, seed: int | None = None):
        self.temperature, self.top_k, self.top_p, self.penalty = float(temperature), int(top_k), float(top_p), float(penalty)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if penalty != 1.0 else None
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed) if seed is not None else self.generator.seed()
        self.noise = torch.empty(batch, vocab, device=device) if self.temperature > 0 else None

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.seen, self.noise) if t is not None]

    def draw(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def __call__(self, logits: torch.Tensor, fed: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] float32 after the tokens `fed` [B, 1] (None for the prompt) -> ids [B] (int64)."""
        if self.seen is not None:
            if fed is not None:
                self.seen.scatter_(1, fed, True)
            logits = penalize(logits, self.seen, self.penalty)
        if self.temperature == 0:
            return logits.argmax(-1)
        probs = filtered_probs(logits, self.temperature, self.top_k, self.top_p)
        return (probs / self.noise).argmax(-1)
