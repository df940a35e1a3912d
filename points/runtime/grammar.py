"""Structured output: a reply held to a grammar, token by token, through llguidance (`pip install
'points[structured]'`; chosen over xgrammar, which needs transformers and Triton at run time: README,
"Structured output", has the measurements).

    response_format = {"type": "json_object"}                                   # any JSON object
                      {"type": "json_schema", "json_schema": {"schema": {...}}}  # one that validates (OpenAI's)
                      {"type": "regex", "regex": "[0-9]{3}-[A-Z]+"}              # vLLM's guided_regex
                      {"type": "choice", "choice": ["yes", "no"]}               # vLLM's guided_choice
                      {"type": "text"} or None                                   # free

`Grammars(tokenizer)` compiles a response_format once (cached by its JSON) and hands each request a
`Constraint`: before each choice it writes the tokens the grammar allows next into a row of the sampler's
bitmask (points.runtime.sampling: the logits of every other token are -inf there, so constrained and free rows
share a batch and the compiled step; the bits are expanded inside the step), and it consumes each token chosen. Once the grammar is complete only
<|im_end|> is allowed, so the reply ends there; a reply cut by max_new_tokens first ends with finish_reason
"length" and is not complete. JSON comes compact, one space after ":" and ",", no other whitespace (a model
free to emit whitespace may never close the object: vLLM's disable-any-whitespace).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch

FORMATS = ("text", "json_object", "json_schema", "regex", "choice")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED = 64  # compiled grammars kept (by their response_format's JSON)


class GrammarError(ValueError):
    """A response_format that is malformed or that the library cannot compile (the message says which)."""


def check_response_format(spec) -> dict | None:
    """None for free text; else the spec, its shape checked (GrammarError naming the field inside it)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in FORMATS:
        raise GrammarError(f"expected an object whose type is one of {', '.join(FORMATS)}, got {spec!r:.80}")
    kind = spec["type"]
    if kind == "text":
        return None
    if kind == "json_schema":
        inner = spec.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), (dict, bool)):
            raise GrammarError("json_schema: expected {\"name\": ..., \"schema\": {...}}")
    if kind == "regex" and not isinstance(spec.get("regex"), str):
        raise GrammarError("regex: expected a string")
    if kind == "choice" and not (isinstance(spec.get("choice"), list) and spec["choice"]
                                 and all(isinstance(c, str) and c for c in spec["choice"])):
        raise GrammarError("choice: expected a non-empty list of non-empty strings")
    return spec


def _grammar(spec: dict) -> str:
    from llguidance import LLMatcher

    kind = spec["type"]
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_LAYOUT)
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(json.dumps(spec["json_schema"].get("schema", {})),
                                                  defaults=JSON_LAYOUT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec["regex"])
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choice"]))


class Grammars:
    """The library's view of one tokenizer (built once: ~1 s for Qwen's 151,665 tokens) and compiled grammars."""

    def __init__(self, tokenizer):
        try:
            from llguidance import LLTokenizer
        except ImportError:
            raise GrammarError("structured output needs the structured extra (llguidance is missing): pip install "
                               "'points[structured]'") from None
        self.tokenizer = LLTokenizer(tokenizer.to_json(), eos_token=tokenizer.im_end_id)
        self.words = (self.tokenizer.vocab_size + 31) // 32  # the mask's int32 words
        self.compiled: OrderedDict[str, str] = OrderedDict()

    def constraint(self, spec: dict) -> "Constraint":
        """A fresh matcher for one request (GrammarError when the library cannot compile the spec)."""
        from llguidance import LLMatcher

        key = json.dumps(spec, sort_keys=True)
        grammar = self.compiled.get(key)
        if grammar is None:
            try:
                grammar = _grammar(spec)
                error = LLMatcher.validate_grammar(grammar, self.tokenizer)
            except (ValueError, TypeError, RuntimeError) as e:
                raise GrammarError(f"cannot be compiled ({_line(e)})") from None
            if error:
                raise GrammarError(f"cannot be compiled ({_line(error)})")
            self.compiled[key] = grammar
            while len(self.compiled) > CACHED:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        matcher = LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise GrammarError(f"cannot be compiled ({_line(matcher.get_error())})")
        return Constraint(matcher, self)


def _line(message) -> str:
    """The library's (multi-line) message on one line."""
    return " ".join(str(message).split())[:300]


class Constraint:
    def __init__(self, matcher, grammars: Grammars):
        self.matcher, self.grammars = matcher, grammars
        self.words = np.zeros(grammars.words, dtype=np.int32)

    def allowed(self, out: torch.Tensor) -> None:
        """Write the tokens the grammar allows next into `out` (int32 [ceil(vocab / 32)], a row of the sampler's
        bitmask: bit t % 32 of word t // 32 for token t; the model's tokens past the tokenizer's are refused).
        On the CPU the library writes into the row itself."""
        n = min(self.grammars.words, out.shape[0])
        if out.device.type == "cpu" and out.is_contiguous() and n == self.grammars.words:
            self.matcher.unsafe_compute_mask_ptr(out.data_ptr(), n * 4)
        else:
            self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
            out[:n].copy_(torch.from_numpy(self.words[:n]))
        out[n:] = 0

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
