"""Generation: prompt -> vision features (once per call) -> prefill -> cached one-token steps.

Greedy by default (temperature 0, as the reference always decodes); temperature / top-k / top-p sampling
with an optional seed; repetition penalty (transformers' rule, over the prompt's and the reply's tokens).
A row stops at <|im_end|> (the reference) or <|endoftext|> (an extension), at an extra stop string
(the reply is cut before it), or after max_new_tokens. Several conversations run as one right-padded
batch, each row at its own positions, so every reply equals (greedy) the conversation run alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from points.chat import build_prompt


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} = {getattr(self, name)!r}: expected {want}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "a number > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")

    @classmethod
    def from_kwargs(cls, **gen) -> "GenerationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(gen) - known)
        if unknown:
            raise ValueError(f"unknown generation argument(s) {', '.join(unknown)}; expected some of {sorted(known)}")
        return cls(**gen)

    @classmethod
    def from_card(cls, d: dict | None) -> "GenerationConfig":
        """The model card's dict: {max_new_tokens, temperature, top_p, num_beams}. temperature 0 (or absent)
        is greedy and then top_p is ignored, as in the reference (which never samples)."""
        d = dict(d or {})
        if d.pop("num_beams", 1) != 1:
            raise ValueError("num_beams: only 1 is supported (the reference decodes greedily)")
        d.pop("do_sample", None)
        d.pop("eos_token_id", None)  # the reference's chat() writes this into the dict itself
        if not d.get("temperature"):
            d["temperature"] = 0.0
            d.pop("top_p", None)
        return cls.from_kwargs(**d)


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p (never empty)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' positive logits / penalty, negative ones * penalty."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def stream_batch(model, tokenizer, processor, conversations: list, cfg: GenerationConfig) -> Iterator[list[str]]:
    """Yield, after every step, the new reply text of each conversation ('' when none is final yet).
    Prompts are built and checked here, at the call; the returned iterator runs the model."""
    prompts = [build_prompt(m, processor) for m in conversations]
    ids = [tokenizer.encode(p.text) for p in prompts]
    limit = model.decoder.cfg.max_seq_len
    for i, row in enumerate(ids):
        if len(row) + cfg.max_new_tokens > limit:
            raise ValueError(f"conversation {i}: prompt of {len(row)} tokens + max_new_tokens {cfg.max_new_tokens} "
                             f"exceeds the context of {limit} tokens")
    return _steps(model, tokenizer, prompts, ids, cfg)


def _steps(model, tokenizer, prompts, ids, cfg: GenerationConfig) -> Iterator[list[str]]:
    device = model.decoder.embed.weight.device
    lengths = [len(x) for x in ids]
    B, T = len(ids), max(lengths)
    padded = torch.full((B, T), tokenizer.eos_id, dtype=torch.long)  # right padding, never attended
    for i, row in enumerate(ids):
        padded[i, :len(row)] = torch.tensor(row)
    padded = padded.to(device)
    n_new = torch.tensor(lengths, device=device)
    with torch.inference_mode():  # (never held across a yield: the mode is thread-wide)
        features = None
        pixels = [p for p in prompts if p.pixel_values is not None]
        if pixels:  # every image of every conversation through the encoder in one packed call
            features = model.image_features(torch.cat([p.pixel_values for p in pixels]),
                                            torch.cat([p.grid_thw for p in pixels]))
        cache = model.decoder.new_cache(B, max_len=T + cfg.max_new_tokens)
        logits = model.decoder(embeds=model.embed(padded, features), cache=cache, n_new=n_new, last=n_new - 1)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for i, row in enumerate(ids):
            seen[i, torch.tensor(row, device=device)] = True
    generator = None if cfg.seed is None else torch.Generator(device=device).manual_seed(cfg.seed)
    rows = [_Reply(tokenizer, cfg.stop) for _ in range(B)]
    stop_ids = torch.tensor([tokenizer.im_end_id, tokenizer.eos_id], device=device)
    for step in range(cfg.max_new_tokens):
        if seen is not None:
            logits = penalize(logits, seen, cfg.repetition_penalty)
        nxt = sample(logits, cfg, generator)  # [B]
        ended = torch.isin(nxt, stop_ids).tolist()
        last = step == cfg.max_new_tokens - 1
        yield [row.push(token, ended[i], last) for i, (row, token) in enumerate(zip(rows, nxt.tolist()))]
        if all(r.done for r in rows):
            return
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        with torch.inference_mode():
            logits = model.decoder.decode_step(nxt[:, None], cache)


class _Reply:
    """One row's reply text: incremental decoding, stop strings, and what may be released so far."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.text, self.released, self.done = "", 0, False

    def push(self, token: int, ended: bool, last: bool) -> str:
        if self.done:
            return ""
        if ended:
            self.done = True
        else:
            self.text += self.decoder.push(token)
            if last:
                self.text += self.decoder.flush()
                self.done = True
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done = self.text[:cut], True
        end = len(self.text) if self.done else max(self.released, len(self.text) - self.hold)
        piece, self.released = self.text[self.released:end], end
        return piece


def chat(model, tokenizer, processor, conversations: list, cfg: GenerationConfig) -> list[str]:
    replies = [""] * len(conversations)
    for pieces in stream_batch(model, tokenizer, processor, conversations, cfg):
        replies = [r + p for r, p in zip(replies, pieces)]
    return replies


def chat_stream(model, tokenizer, processor, messages, cfg: GenerationConfig) -> Iterator[str]:
    for pieces in stream_batch(model, tokenizer, processor, [messages], cfg):
        if pieces[0]:
            yield pieces[0]
