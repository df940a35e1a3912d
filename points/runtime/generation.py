"""Generation: conversations -> prompts -> vision features (once per call) -> the engine's prefill and
one-token steps (`points.runtime.engine`) -> reply text.

Greedy by default (temperature 0, as the reference always decodes); temperature / top-k / top-p sampling
with an optional seed; repetition penalty (transformers' rule, over the prompt's and the reply's tokens).
The choice of the next token (points.runtime.sampling.Picker) runs inside the decode step, so a compiled
engine does step + choice in one graph; the host reads each token while the next step is already queued.
A row stops at <|im_end|> (the reference) or <|endoftext|> (an extension), at an extra stop string
(the reply is cut before it), or after max_new_tokens. Several conversations run as one right-padded
batch, each row at its own positions, so every reply equals (greedy) the conversation run alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from points.io.chat import build_prompt
from points.runtime.engine import Engine
from points.runtime.prefix import PrefixCache, prompt_key
from points.runtime.sampling import Picker
from points.runtime.vision import image_features


class GenerationError(ValueError):
    """A generation setting out of its range: names the field (`field`), its value and what is expected."""

    def __init__(self, field: str, value, want: str):
        self.field, self.value, self.want = field, value, want
        super().__init__(f"{field} = {value!r}: expected {want}")

    def flag(self) -> str:
        """The same, in the command line's words (`--seed 5: expected ...`)."""
        return f"--{self.field.replace('_', '-')} {self.value}: expected {self.want}"


SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes (negative seeds would alias positive ones)


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
            raise GenerationError(name, getattr(self, name), want)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (tuple, list, type(None))):
            bad("stop", "a non-empty string or a list of them")
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
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= SEED_MAX):
            bad("seed", f"an integer from 0 to 2**64 - 1 ({SEED_MAX}), or None")
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


def prepare(tokenizer, processor, messages: list, cfg: GenerationConfig, limit: int, name: str = "conversation"):
    """One conversation -> (prompt, token ids), checked against the context: raises ValueError naming
    `name` (an unreadable image, a prompt that leaves no room for max_new_tokens)."""
    prompt = build_prompt(messages, processor)
    ids = prompt.token_ids(tokenizer)
    if len(ids) + cfg.max_new_tokens > limit:
        room = limit - len(ids)
        raise ValueError(f"{name}: prompt of {len(ids)} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                         f"context of {limit} tokens; "
                         + (f"set max_new_tokens (--max-new-tokens) to at most {room}" if room > 0 else
                            "shorten the conversation"))
    return prompt, ids


def stream_batch(model, tokenizer, processor, conversations: list, cfg: GenerationConfig,
                 engine: Engine | None = None, prefix: PrefixCache | None = None) -> Iterator[list[str]]:
    """Yield, after every step, the new reply text of each conversation ('' when none is final yet).
    Prompts are built and checked here, at the call; the returned iterator runs the model (on `engine`,
    default an eager one over model.decoder). With a `prefix` cache a single conversation reuses the longest
    cached prefix and leaves its own K/V there when it ends (points.runtime.prefix)."""
    limit = model.decoder.cfg.max_seq_len
    prepared = [prepare(tokenizer, processor, m, cfg, limit, f"conversation {i}") for i, m in enumerate(conversations)]
    return _steps(model, engine or Engine(model.decoder), tokenizer, [p for p, _ in prepared],
                  [ids for _, ids in prepared], cfg, prefix=prefix if len(prepared) == 1 else None)


def replies(model, tokenizer, prompts, ids, cfg: GenerationConfig, engine: Engine) -> list[tuple[str, int]]:
    """Prepared conversations (`prepare`) as one batch -> (reply, tokens generated) per conversation."""
    rows = [_Reply(tokenizer, cfg.stop) for _ in ids]
    texts = [""] * len(ids)
    for pieces in _steps(model, engine, tokenizer, prompts, ids, cfg, rows):
        texts = [t + p for t, p in zip(texts, pieces)]
    return [(t, r.tokens) for t, r in zip(texts, rows)]


def _steps(model, engine: Engine, tokenizer, prompts, ids, cfg: GenerationConfig,
           rows: list | None = None, prefix: PrefixCache | None = None) -> Iterator[list[str]]:
    device = engine.device
    lengths = [len(x) for x in ids]
    pick = Picker(len(ids), model.decoder.cfg.vocab_size, device, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, penalty=cfg.repetition_penalty, seed=cfg.seed)
    if pick.seen is not None:
        for i, row in enumerate(ids):
            pick.seen[i, torch.tensor(row, device=device)] = True
    rows = rows if rows is not None else [_Reply(tokenizer, cfg.stop) for _ in ids]
    stop_ids = {tokenizer.im_end_id, tokenizer.eos_id}
    if prefix is not None:
        cache, logits, key = _prefill_reusing(model, engine, prompts[0], ids[0], cfg, prefix)
        tokens = engine.decode(cache, logits, pick, cfg.max_new_tokens)
    else:
        padded = torch.full((len(ids), max(lengths)), tokenizer.eos_id, dtype=torch.long)  # right padding, never attended
        for i, row in enumerate(ids):
            padded[i, :len(row)] = torch.tensor(row)
        with torch.inference_mode():  # (never held across a yield: the mode is thread-wide)
            features = None
            pixels = [p for p in prompts if p.pixel_values is not None]
            if pixels:  # every image of every conversation through the encoder in one packed call
                features = image_features(model, torch.cat([p.pixel_values for p in pixels]),
                                          torch.cat([p.grid_thw for p in pixels]), engine.attn)
            embeds = model.embed(padded.to(device), features)
        tokens = engine.generate(pick, cfg.max_new_tokens, embeds=embeds, lengths=torch.tensor(lengths, device=device))
    fed = []
    try:
        for step, chosen in enumerate(tokens):
            last = step == cfg.max_new_tokens - 1
            chosen = chosen.tolist()
            fed.append(chosen[0])
            yield [row.push(t, t in stop_ids, last) for row, t in zip(rows, chosen)]
            if all(r.done for r in rows):
                return
    finally:
        if prefix is not None:  # what the cache holds: the prompt, then every reply token fed back
            prefix.put((key + fed)[:cache.span], cache)


def _prefill_reusing(model, engine: Engine, prompt, ids: list[int], cfg: GenerationConfig, prefix: PrefixCache):
    """One conversation's prefill on top of the longest cached prefix: -> (cache, logits, key)."""
    key, images = prompt_key(ids, model.image_token_id, prompt.pixel_values, prompt.grid_thw)
    entry, reused = prefix.match(key, len(ids) - 1)
    cache = engine.new_cache(1, len(ids) + cfg.max_new_tokens)
    with torch.inference_mode():
        if entry is not None:
            prefix.restore(entry, reused, cache)
        later = [im for im in images if im[0] >= reused]  # the images before `reused` are in the cache already
        features = None
        if later:
            features = image_features(model, torch.cat([prompt.pixel_values[r:r + n] for _, _, r, n in later]),
                                      torch.stack([prompt.grid_thw[images.index(im)] for im in later]), engine.attn)
        embeds = model.embed(torch.tensor([ids[reused:]], device=engine.device), features)
    return cache, engine.prefill(cache, embeds=embeds), key


class _Reply:
    """One row's reply text: incremental decoding, stop strings, and what may be released so far."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.text, self.released, self.done, self.tokens = "", 0, False, 0

    def push(self, token: int, ended: bool, last: bool) -> str:
        if self.done:
            return ""
        self.tokens += 1
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


def chat(model, tokenizer, processor, conversations: list, cfg: GenerationConfig,
         engine: Engine | None = None, prefix: PrefixCache | None = None) -> list[str]:
    replies = [""] * len(conversations)
    for pieces in stream_batch(model, tokenizer, processor, conversations, cfg, engine, prefix):
        replies = [r + p for r, p in zip(replies, pieces)]
    return replies


def chat_stream(model, tokenizer, processor, messages, cfg: GenerationConfig,
                engine: Engine | None = None, prefix: PrefixCache | None = None) -> Iterator[str]:
    for pieces in stream_batch(model, tokenizer, processor, [messages], cfg, engine, prefix):
        if pieces[0]:
            yield pieces[0]
