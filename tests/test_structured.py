"""Structured output (points.runtime.grammar through llguidance): every constrained reply parses and validates,
greedy and sampled, beside free rows in one batch and on the compiled step; what a cut reply is; bad specs."""

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 12},
    "total": {"type": "integer"},
    "paid": {"type": "boolean"},
    "currency": {"enum": ["EUR", "USD", "CNY"]},
    "lines": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "item": {"type": "string", "maxLength": 8}, "qty": {"type": "integer"}}, "required": ["item", "qty"],
        "additionalProperties": False}}},
    "required": ["title", "total", "paid", "currency", "lines"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Read the invoice."}]


def _reply(pipe, messages, **gen):
    request = pipe.submit(messages, **gen)
    return request.text(), request.finish_reason


@pytest.mark.parametrize("gen", [{}, *[{"temperature": 1.0, "seed": s} for s in range(6)]],
                         ids=["greedy", *[f"seed{s}" for s in range(6)]])
def test_every_constrained_reply_validates(pipe, gen):
    text, finish = _reply(pipe, ASK, max_new_tokens=300, response_format=FORMAT, **gen)
    assert finish == "stop", (text, finish)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert ": " in text and "\n" not in text  # (compact: one space after ":" and ",", nothing else)


def test_json_object_regex_and_choice(pipe):
    # any JSON object: its keys and strings are unbounded, so random weights may not close it in 60 tokens; every
    # token chosen is one the grammar allowed (a fresh matcher takes them all), and a closed one is a dict
    request = pipe.submit(ASK, max_new_tokens=60, response_format={"type": "json_object"}, temperature=0.8, seed=3)
    text = request.text()
    fresh = pipe.scheduler.grammars().constraint({"type": "json_object"})
    for token in request.token_ids[:request.completion_tokens]:
        if token not in (pipe.tokenizer.im_end_id, pipe.tokenizer.eos_id):
            fresh.consume(token)
    assert not fresh.matcher.is_error() and text.startswith("{")
    assert request.finish_reason == "length" or isinstance(json.loads(text), dict)
    text, _ = _reply(pipe, ASK, max_new_tokens=40, response_format={"type": "regex", "regex": "[0-9]{3}-[A-Z]{2,4}"})
    assert re.fullmatch("[0-9]{3}-[A-Z]{2,4}", text), text
    choices = ["paid", "unpaid", "unknown"]
    for seed in range(3):
        text, finish = _reply(pipe, ASK, max_new_tokens=20, response_format={"type": "choice", "choice": choices},
                              temperature=1.0, seed=seed)
        assert text in choices and finish == "stop"


def test_a_reply_cut_by_max_new_tokens_is_length_and_incomplete(pipe):
    text, finish = _reply(pipe, ASK, max_new_tokens=5, response_format=FORMAT)
    assert finish == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_constrained_and_free_rows_share_a_batch(pipe):
    """The mask is per row: a free row in the same batch is exactly its reply alone; the constrained ones too."""
    free = [{"role": "user", "content": "Tell me about rivers."}]
    want_free = pipe.chat(free, max_new_tokens=12)
    want = pipe.chat(ASK, max_new_tokens=300, response_format=FORMAT)
    requests = [pipe.submit(free, max_new_tokens=12), pipe.submit(ASK, max_new_tokens=300, response_format=FORMAT),
                pipe.submit(ASK, max_new_tokens=300, response_format={"type": "json_object"})]
    texts = [r.text() for r in requests]
    assert texts[0] == want_free and texts[1] == want
    assert requests[2].finish_reason == "length" or isinstance(json.loads(texts[2]), dict)


def test_the_compiled_step_applies_the_mask(e2e_dir, pipe):
    import points
    from points.runtime.engine import Engine

    loaded = points.load(e2e_dir)
    fast = points.Pipeline(loaded.model, loaded.tokenizer, loaded.processor,
                           Engine(loaded.model.decoder, compile=True, backend="eager"))
    for gen in ({}, {"temperature": 1.0, "seed": 5}):
        got = fast.chat(ASK, max_new_tokens=300, response_format=FORMAT, **gen)
        assert got == pipe.chat(ASK, max_new_tokens=300, response_format=FORMAT, **gen)
        jsonschema.validate(json.loads(got), SCHEMA)


@pytest.mark.parametrize("spec, says", [
    ({"type": "xml"}, "type is one of"),
    ({"type": "json_schema"}, "json_schema: expected"),
    ({"type": "regex", "regex": 5}, "regex: expected a string"),
    ({"type": "choice", "choice": []}, "choice: expected a non-empty list"),
    ({"type": "regex", "regex": "(unclosed"}, "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}, "cannot be compiled"),
])
def test_a_bad_response_format_is_named(pipe, spec, says):
    with pytest.raises(ValueError, match=r"response_format") as e:
        pipe.chat(ASK, max_new_tokens=4, response_format=spec)
    assert says in str(e.value)


def test_text_is_free(pipe):
    assert pipe.chat(ASK, max_new_tokens=6, response_format={"type": "text"}) == pipe.chat(ASK, max_new_tokens=6)
