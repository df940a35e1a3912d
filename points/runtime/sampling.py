"""Choosing the next token: logits [B, V] float32 -> token ids [B], as tensor ops only (no host sync),
so that it runs inside the compiled decode step, in the same graph as the model.

Every row has its own rule (the scheduler's rows belong to different requests): temperature, top-k, top-p,
min-p and repetition penalty are per-row tensors, and a sampling row draws its noise from its own seeded
generator, so that a seeded request draws the same tokens whatever else is in the batch. Greedy
(temperature 0) is argmax. Sampling is Gumbel-max: softmax(logits / temperature) after top-k, top-p and
min-p filtering (transformers' order and rules: min-p keeps the tokens whose probability is at least min_p
times the most likely one's), divided by exponential noise drawn outside the graph; the argmax of that is a draw from the
filtered distribution (the same law as torch.multinomial, a different stream). The repetition penalty is
transformers' rule over the tokens generated so far, the prompt's not counted: every member's official call
gives `generate` the prompt as `inputs_embeds` alone, so its penalty sees only the reply.

Log-probabilities (a row that asks for them, `set_row(logprobs=True)`): the log-softmax of the model's own
logits, before the penalty, temperature and filters change them (vLLM's default, and what `Pipeline.score`
computes), of the token chosen and of the TOP_LOGPROBS most likely, written in place into buffers the caller
reads after the step (`chosen_logprob`, `top_logprob`, `top_id`), so the step keeps one output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

TOP_LOGPROBS = 20  # the most likely tokens recorded with their log-probabilities (OpenAI's top_logprobs bound)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' positive logits / penalty, negative ones * penalty
    (penalty: a number or a [B, 1] column; 1 leaves a row exactly as it was)."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filtered_probs(logits: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0, *, k_max: int | None = None,
                   p_any: bool | None = None, min_any: bool | None = None) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top_k tokens (0 = all), to the smallest
    most-likely prefix whose mass reaches top_p (never empty), then to the tokens of probability at least
    min_p times the largest (0 = all). Each setting is a number or a per-row tensor [B]; with tensors, `k_max`
    (the largest top_k, 0 = no row filters), `p_any` (some top_p < 1) and `min_any` (some min_p > 0) come from
    the host, so that nothing here reads a tensor's value."""
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(float(temperature), device=logits.device)
    if temperature.dim():  # per row; a greedy row (0) is divided by 1 (its choice is argmax anyway)
        temperature = torch.where(temperature > 0, temperature, 1.0).reshape(-1, 1)
    logits = logits / temperature
    if k_max is None:
        k_max = int(top_k)
    if k_max:
        k = torch.as_tensor(top_k, device=logits.device).reshape(-1, 1)
        values = logits.topk(min(k_max, logits.shape[-1]), dim=-1).values
        kth = values.gather(1, (k.clamp(1, values.shape[-1]) - 1).expand(logits.shape[0], 1))
        logits = logits.masked_fill((k > 0) & (logits < kth), -math.inf)
    if p_any is None:
        p_any = float(top_p) < 1
    if p_any:
        p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs > p) & (p < 1)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if min_any is None:
        min_any = float(min_p) > 0
    if min_any:
        m = torch.as_tensor(min_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < m * probs.amax(-1, keepdim=True), -math.inf)
    return logits.softmax(-1)


class Rule(NamedTuple):
    """One row's rule, as the host holds it (the Picker's tensors are its device copies)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    penalty: float = 1.0
    min_p: float = 0.0
    logprobs: bool = False  # record the chosen token's log-probability and the most likely ones
    constrained: bool = False  # the caller writes the row's allowed tokens before each choice


class Picker:
    """The next-token rules of up to `batch` rows.

    Built with one rule for every row (`Picker(batch, vocab, device, temperature=..., seed=...)`: a seeded
    batch draws its noise from one generator), or row by row (`set_row`, the scheduler: each row its own
    rule and generator). seen [B, V] bool (only once some row penalises) is updated in place with every
    token fed back; `noise` [B, V] (only once some row samples) is drawn by `draw()` before each step,
    outside any compiled graph. `view(start, stop)` is the rule of those rows alone, sharing the buffers;
    `buffers()` are the tensors a call reads or writes in place."""

    def __init__(self, batch: int, vocab: int, device: torch.device, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, penalty: float = 1.0, seed: int | None = None,
                 min_p: float = 0.0, logprobs: bool = False):
        self.batch, self.vocab, self.device = batch, vocab, torch.device(device)
        self.rules = [Rule(float(temperature), int(top_k), float(top_p), float(penalty), float(min_p),
                           bool(logprobs))] * batch  # (constrained: `set_row` only)
        # [B, ceil(V / 32)] int32, bit t % 32 of word t // 32: may a row choose token t (filled by the caller for a
        # constrained row, before each choice; all ones for a free row): a grammar library's own bitmask layout
        self.allowed = None
        self.temperature = torch.full((batch,), float(temperature), device=device)
        self.top_k = torch.full((batch,), int(top_k), dtype=torch.long, device=device)
        self.top_p = torch.full((batch,), float(top_p), device=device)
        self.penalty = torch.full((batch, 1), float(penalty), device=device)
        self.min_p = torch.full((batch,), float(min_p), device=device)
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device) if penalty != 1.0 else None
        self.noise = torch.empty(batch, vocab, device=device) if temperature > 0 else None
        self.chosen_logprob = self.top_logprob = self.top_id = None
        if logprobs:
            self._record_buffers()
        self.generator, self.generators = None, [None] * batch  # one for the whole batch, or one per row
        if temperature > 0:
            self.generator = _generator(device, seed)
        self._flags()

    def _flags(self) -> None:
        """What the rows need, from the host copies: constants of the compiled step (a change recompiles)."""
        self.sampling = any(r.temperature > 0 for r in self.rules)
        k_max = max((r.top_k for r in self.rules if r.temperature > 0), default=0)
        # rounded up to a power of two (rows with a smaller k gather their own): few distinct compiled graphs
        self.k_max = 0 if k_max == 0 else min(1 << (k_max - 1).bit_length(), self.vocab)
        self.p_any = any(r.temperature > 0 and r.top_p < 1 for r in self.rules)
        self.penalizing = any(r.penalty != 1.0 for r in self.rules)
        self.min_any = any(r.temperature > 0 and r.min_p > 0 for r in self.rules)
        self.recording = any(r.logprobs for r in self.rules)
        self.constraining = any(r.constrained for r in self.rules)

    def _record_buffers(self) -> None:
        k = min(TOP_LOGPROBS, self.vocab)
        self.chosen_logprob = torch.zeros(self.batch, device=self.device)
        self.top_logprob = torch.zeros(self.batch, k, device=self.device)
        self.top_id = torch.zeros(self.batch, k, dtype=torch.long, device=self.device)

    def set_row(self, row: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                penalty: float = 1.0, seed: int | None = None, min_p: float = 0.0, logprobs: bool = False,
                constrained: bool = False) -> None:
        """Row `row` gets a new request's rule: its generator seeded with `seed` (random without one), nothing
        seen yet."""
        rule = self.rules[row] = Rule(float(temperature), int(top_k), float(top_p), float(penalty), float(min_p),
                                      bool(logprobs), bool(constrained))
        if constrained and self.allowed is None:
            self.allowed = torch.full((self.batch, (self.vocab + 31) // 32), -1, dtype=torch.int32, device=self.device)
        if self.allowed is not None:
            self.allowed[row] = -1  # (a constrained row's caller writes its mask before each choice)
        self.temperature[row], self.top_k[row], self.top_p[row] = rule.temperature, rule.top_k, rule.top_p
        self.penalty[row], self.min_p[row] = rule.penalty, rule.min_p
        if logprobs and self.chosen_logprob is None:
            self._record_buffers()
        if temperature > 0:
            if self.noise is None:
                self.noise = torch.empty(self.batch, self.vocab, device=self.device)
            self.generators[row] = _generator(self.device, seed)
        if penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(self.batch, self.vocab, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[row] = False
        self._flags()

    def view(self, start: int, stop: int) -> "Picker":
        """Rows [start, stop) alone: the same tensors (sliced), generators and rules."""
        v = object.__new__(Picker)
        v.batch, v.vocab, v.device = stop - start, self.vocab, self.device
        v.rules, v.generator, v.generators = self.rules[start:stop], self.generator, self.generators[start:stop]
        for name in ("temperature", "top_k", "top_p", "penalty", "min_p", "seen", "noise", "chosen_logprob",
                     "top_logprob", "top_id", "allowed"):
            t = getattr(self, name)
            setattr(v, name, None if t is None else t[start:stop])
        v._flags()
        return v

    def buffers(self) -> list[torch.Tensor]:
        return [t for t in (self.seen, self.noise, self.chosen_logprob, self.top_logprob, self.top_id, self.allowed)
                if t is not None]

    def draw(self) -> None:
        """Fresh noise for the rows that sample (nothing for greedy rows)."""
        if self.noise is None or not self.sampling:
            return
        if self.generator is not None:
            self.noise.exponential_(generator=self.generator)
        for row, g in enumerate(self.generators):
            if g is not None and self.rules[row].temperature > 0:
                self.noise[row].exponential_(generator=g)

    def __call__(self, logits: torch.Tensor, fed: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V] float32 after the tokens `fed` [B, 1] (None for the prompt) -> ids [B] (int64)."""
        ids = self._choose(logits, fed)
        if self.recording:
            lp = logits.log_softmax(-1)
            top = lp.topk(self.top_logprob.shape[1], dim=-1)
            self.top_logprob.copy_(top.values)
            self.top_id.copy_(top.indices)
            self.chosen_logprob.copy_(lp.gather(1, ids[:, None])[:, 0])
        return ids

    def _choose(self, logits: torch.Tensor, fed: torch.Tensor | None) -> torch.Tensor:
        if self.constraining:  # (a free row's words are all ones)
            bits = (self.allowed[:, :, None] >> torch.arange(32, dtype=torch.int32, device=logits.device)) & 1
            logits = logits.masked_fill(bits.reshape(logits.shape[0], -1)[:, :logits.shape[1]] == 0, -math.inf)
        if self.seen is not None:
            if fed is not None:
                self.seen.scatter_(1, fed, True)
            if self.penalizing:
                logits = penalize(logits, self.seen, self.penalty)
        greedy = logits.argmax(-1)
        if not self.sampling:
            return greedy
        probs = filtered_probs(logits, self.temperature, self.top_k, self.top_p, self.min_p, k_max=self.k_max,
                               p_any=self.p_any, min_any=self.min_any)
        return torch.where(self.temperature > 0, (probs / self.noise).argmax(-1), greedy)


def _generator(device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed) if seed is not None else g.seed()
    return g
