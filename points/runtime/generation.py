"""Generation settings and the pieces every request is made of: the settings (`GenerationConfig`, checked),
a conversation turned into a checked prompt (`prepare`), and a reply's text as tokens arrive (`Reply`). The
steps themselves run on the scheduler (`points.runtime.scheduler`).

Greedy by default (temperature 0, as the reference always decodes); temperature / top-k / top-p / min-p sampling
with an optional seed; repetition penalty (transformers' rule, over the reply's tokens only, as every member's
official call applies it: points.runtime.sampling). A member's preset (`Pipeline.chat(..., preset=)`) gives
defaults that the settings given override.
The choice of the next token (points.runtime.sampling.Picker) runs inside the decode step, so a compiled
engine does step + choice in one graph.
A reply stops at <|im_end|> (the reference) or <|endoftext|> (an extension; neither with ignore_eos), at an
extra stop string (the reply is cut before it), after max_new_tokens, or (repetition_guard) once it loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from points.io.chat import build_prompt
from points.runtime.grammar import GrammarError, check_response_format
from points.runtime.loops import LoopGuard
from points.runtime.speculative import drafter


class GenerationError(ValueError):
    """A generation setting out of its range: names the field (`field`), its value and what is expected."""

    def __init__(self, field: str, value, want: str):
        self.field, self.value, self.want = field, value, want
        super().__init__(f"{field} = {value!r}: expected {want}")

    def flag(self) -> str:
        """The same, in the command line's words (`--seed 5: expected ...`)."""
        return f"--{self.field.replace('_', '-')} {self.value}: expected {self.want}"


TEMPERATURE_MIN = 1e-5  # below it logits / temperature overflow float32: 0 (greedy) or at least this


def _finite(x) -> bool:
    """A real int or float that float32 arithmetic can hold (no bool, nan, inf, or a 400-digit integer)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x) and abs(x) < 1e30
    except OverflowError:
        return False


SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes (negative seeds would alias positive ones)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: off; n in 0-20: each token's log-probability and the n most likely's
    response_format: dict | None = field(default=None, hash=False)  # a grammar (points.runtime.grammar); None: free
    # None: the scheduler's default; "off"; "ngram" / "ngram:K": drafts from the text so far, K at a time
    # (points.runtime.speculative), or a drafter object (tests' and benchmarks' oracles)
    speculative: object = field(default=None, hash=False)
    ignore_eos: bool = False  # <|im_end|> / <|endoftext|> do not end the reply (vLLM's; benchmarks run every step)
    # 0: off; N: the reply ends (finish_reason "repetition") once its last N tokens are one block repeated
    # (points.runtime.loops: at least 3 copies, not one token differing)
    repetition_guard: int = 0

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
        if not _finite(self.temperature) or not (self.temperature == 0 or TEMPERATURE_MIN <= self.temperature):
            bad("temperature", f"0 (greedy) or a finite number >= {TEMPERATURE_MIN}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k <= 2**31 - 1:
            bad("top_k", "an integer from 0 (off) to 2**31 - 1")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0 (off), 1]")
        if not _finite(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= SEED_MAX):
            bad("seed", f"an integer from 0 to 2**64 - 1 ({SEED_MAX}), or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= 20):
            bad("logprobs", "None (off) or an integer from 0 to 20 (the most likely tokens listed beside each)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")
        if self.repetition_guard != 0:
            try:
                LoopGuard(self.repetition_guard)
            except ValueError as e:
                bad("repetition_guard", str(e).split(": expected ", 1)[-1])
        try:
            drafter(self.speculative)
        except ValueError as e:
            raise GenerationError("speculative", self.speculative, str(e).split(": expected ", 1)[-1]) from None
        try:
            object.__setattr__(self, "response_format", check_response_format(self.response_format))
        except GrammarError as e:
            raise GenerationError("response_format", self.response_format, str(e).removeprefix("expected ")) from None

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
    check_room(len(ids), cfg.max_new_tokens, limit, name)
    return prompt, ids


def fitted(cfg: GenerationConfig, prompt_tokens: int, limit: int) -> GenerationConfig:
    """cfg whose max_new_tokens was not given: as many as the context leaves, up to cfg's (1024, or a preset's),
    at least 1 (the one policy of every entry point: Pipeline.chat / submit, points run, points serve)."""
    return replace(cfg, max_new_tokens=max(1, min(cfg.max_new_tokens, limit - prompt_tokens)))


def check_room(prompt_tokens: int, max_new_tokens: int, limit: int, name: str = "conversation") -> None:
    """ValueError naming `name` when the prompt and max_new_tokens do not fit the context of `limit` tokens."""
    if prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        raise ValueError(f"{name}: prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the "
                         f"context of {limit} tokens; "
                         + (f"set max_new_tokens (--max-new-tokens) to at most {room}" if room > 0 else
                            "shorten the conversation"))


class Reply:
    """One request's reply text: incremental decoding, stop strings, and what may be released so far.
    `stopped`: it ended at a stop token or stop string (not at max_new_tokens)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.text, self.released, self.done, self.stopped, self.tokens = "", 0, False, False, 0

    def push(self, token: int, ended: bool, last: bool) -> str:
        if self.done:
            return ""
        self.tokens += 1
        if ended:
            self.done = self.stopped = True
        else:
            self.text += self.decoder.push(token)
            if last:
                self.text += self.decoder.flush()
                self.done = True
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done, self.stopped = self.text[:cut], True, True
        end = len(self.text) if self.done else max(self.released, len(self.text) - self.hold)
        piece, self.released = self.text[self.released:end], end
        return piece
