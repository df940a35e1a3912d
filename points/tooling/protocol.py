"""The OpenAI request as points reads it: every field of a Chat Completions request checked against one table
(`FIELDS`), the settings it asks for turned into `Pipeline.chat` keywords (`generation_of`), and its messages
into `Pipeline.chat` messages (`messages_of`, images read through an `Images` policy: points.tooling.images).
Every refusal is an `ApiError` naming the field (400). No HTTP here: points.tooling.app serves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class ApiError(Exception):
    """One JSON error answer: HTTP status, message, the request field it is about (param), type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, want: str) -> ApiError:
    return ApiError(400, f"{param}: {want}", param)


DETAIL = {"low": 448 * 448, "high": None, "auto": None}  # an image_url's detail -> its max_pixels (None: the model's)


def messages_of(body: dict, images, max_pixels: int | None = None) -> list[dict]:
    """The request's OpenAI messages -> `Pipeline.chat` messages (images as bytes, read by `images.read(url, field)`:
    points.tooling.images), every field checked.
    An image_url's own `min_pixels` / `max_pixels` (as SGLang and Qwen-VL users send them) and `detail` (low:
    at most 448 x 448 pixels, 256 image tokens, or the model's max_pixels if lower; high and auto: the model's
    own bounds; an explicit max_pixels wins) become the image item's bounds, each within [784, `max_pixels`] (the model processor's)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected an object with \"role\" and \"content\"")
        if m.get("role") not in ("system", "user", "assistant"):
            raise invalid(f"{where}.role", f"expected \"system\", \"user\" or \"assistant\", got {m.get('role')!r:.40}")
        content = m.get("content")
        if isinstance(content, str):
            if not is_text(content):
                raise invalid(f"{where}.content", "expected Unicode text (a lone surrogate cannot be encoded)")
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(f"{where}.content", "expected a string or a list of content parts")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not is_text(part.get("text")):
                    raise invalid(f"{at}.text", "expected a string of Unicode text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                item = {"type": "image"} | (pixel_bounds(image_url, f"{at}.image_url", max_pixels)
                                            if isinstance(image_url, dict) else {})
                parts.append(item | {"image": images.read(url, f"{at}.image_url.url")})
            else:
                raise invalid(at, "expected {\"type\": \"text\", \"text\"} or {\"type\": \"image_url\", "
                                  "\"image_url\": {\"url\"}}")
        out.append({"role": m["role"], "content": parts})
    return out


def pixel_bounds(image_url: dict, where: str, most: int | None) -> dict:
    """An image_url's min_pixels / max_pixels / detail -> the image item's bounds (400s naming the field)."""
    from points.io.chat import ITEM_PIXELS_MIN

    detail = image_url.get("detail")
    if detail is not None and detail not in DETAIL:
        raise invalid(f"{where}.detail", f"expected \"low\", \"high\" or \"auto\", got {detail!r:.40}")
    low = DETAIL.get(detail)
    bounds = {"max_pixels": min(low, most or low)} if low is not None else {}  # (never over the model's own)
    for key in ("min_pixels", "max_pixels"):
        value = image_url.get(key)
        if value is None:
            continue
        top = most if most is not None else value
        if not JSON_TYPES["an integer"](value) or not ITEM_PIXELS_MIN <= value <= top:
            raise invalid(f"{where}.{key}", f"expected an integer from {ITEM_PIXELS_MIN} (28 x 28) to {top} (the "
                                            f"model's max_pixels), got {value!r:.40}")
        bounds[key] = value
    if bounds.get("min_pixels", 0) > bounds.get("max_pixels", most or bounds.get("min_pixels", 0)):
        raise invalid(f"{where}.min_pixels", f"{bounds['min_pixels']} is over max_pixels "
                                             f"({bounds.get('max_pixels', most)})")
    return bounds


def is_text(s) -> bool:
    """A string that is Unicode text (JSON lets a lone surrogate through; no tokenizer can encode it)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


JSON_TYPES = {"an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),  # (True == 1 in Python)
              "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "a boolean": lambda v: isinstance(v, bool), "a string": lambda v: isinstance(v, str),
              "a list": lambda v: isinstance(v, list), "an object": lambda v: isinstance(v, dict)}


@dataclass(frozen=True)
class Field:
    """A request field the server knows: its JSON type(s) as the error says them ("a string or a list"); the
    `Pipeline.chat` keyword it sets (the value then checked by GenerationConfig); `only`: the values accepted
    while the field is not supported yet (its "off" values; () refuses every value but null)."""

    kind: str
    keyword: str | None = None
    only: tuple | None = None

    def fits(self, value) -> bool:
        return any(JSON_TYPES[kind](value) for kind in self.kind.split(" or "))


# The Chat Completions request fields: OpenAI's (every one: a field this server cannot honour is refused unless it
# has its "off" value) and the extensions SGLang and vLLM users send (marked). Supporting one = giving it a keyword
# (or reading it in the route) and dropping its `only`. A field outside both is ignored, with a log line.
FIELDS = {
    "messages": Field("a list"),  # (each message checked by messages_of)
    "model": Field("a string"),
    "stream": Field("a boolean"),
    "stream_options": Field("an object"),
    "user": Field("a string"),  # (metadata: unused)
    "metadata": Field("an object"),  # (unused)
    "service_tier": Field("a string"),  # (unused: one tier)
    "prompt_cache_key": Field("a string"),  # (unused: the prefix cache keys on the prompt itself)
    "safety_identifier": Field("a string"),  # (unused)
    "store": Field("a boolean", only=(False,)),
    "max_tokens": Field("an integer", "max_new_tokens"),
    "max_completion_tokens": Field("an integer", "max_new_tokens"),
    "temperature": Field("a number", "temperature"),
    "top_p": Field("a number", "top_p"),
    "seed": Field("an integer", "seed"),
    "stop": Field("a string or a list", "stop"),
    "n": Field("an integer"),  # (1 to N_MAX choices, read by the route)
    "logprobs": Field("a boolean"),  # (read after the loop: logprobs true sets the keyword, top_logprobs its n)
    "top_logprobs": Field("an integer"),
    "frequency_penalty": Field("a number", only=(0,)),
    "presence_penalty": Field("a number", only=(0,)),
    "logit_bias": Field("an object", only=({},)),
    "response_format": Field("an object", "response_format"),  # (text, json_object, json_schema: a grammar)
    "tools": Field("a list", only=([],)),
    "tool_choice": Field("a string or an object", only=("none",)),
    "parallel_tool_calls": Field("a boolean"),  # (without tools nothing is called)
    "functions": Field("a list", only=([],)),  # (OpenAI's older tools)
    "function_call": Field("a string or an object", only=("none",)),
    "modalities": Field("a list", only=(["text"],)),
    "audio": Field("an object", only=()),
    "prediction": Field("an object", only=()),
    "reasoning_effort": Field("a string", only=()),
    "verbosity": Field("a string", only=()),
    "web_search_options": Field("an object", only=()),
    "best_of": Field("an integer", only=(1,)),  # (OpenAI's legacy completions; vLLM's)
    # extensions (SGLang's sampling fields, as POINTS-Reader's model card sends them; vLLM has the same)
    "top_k": Field("an integer", "top_k"),
    "min_p": Field("a number", "min_p"),
    "repetition_penalty": Field("a number", "repetition_penalty"),
    "max_new_tokens": Field("an integer", "max_new_tokens"),
    "do_sample": Field("a boolean"),  # (false: greedy; true: the temperature given, the preset's, else 1)
    "preset": Field("a string"),  # (one of the model's presets, read by the route)
    "speculative": Field("a string", "speculative"),  # (points': "ngram", "ngram:K" or "off", over --speculative)
    # vLLM's structured-output extensions (read after the loop, into response_format); its grammar form is refused
    "guided_json": Field("a string or an object"),
    "guided_regex": Field("a string"),
    "guided_choice": Field("a list"),
    "guided_grammar": Field("a string", only=()),
    "structured_outputs": Field("an object", only=()),
}
N_MAX = 16  # choices per request
GUIDED = ("guided_json", "guided_regex", "guided_choice")  # vLLM's names for a response_format
OFFICIAL_FIELDS = {name: FIELDS[name] for name in ("messages", "max_tokens", "temperature", "top_p", "top_k")}
STOP_LIMIT = (4, 256)  # stop strings per request, characters each (OpenAI's bound: each is scanned every token)


def generation_of(body: dict, fields: dict[str, Field] = FIELDS, defaults: dict | None = None,
                  strict: bool = True) -> dict:
    """Every field of the request checked against `fields` (one of the wrong type or not supported yet is a 400
    naming it; an unknown one too when `strict`, else left for the route to log), before any image is read ->
    the generation settings as `Pipeline.chat` keywords (absent or null fields keep the defaults: greedy, as the
    model card). Two fields of one setting (max_tokens and max_new_tokens) that disagree are a 400 naming the
    second. `defaults` (a preset's settings): what do_sample true samples with when no temperature is given."""
    from points.runtime.generation import GenerationConfig, GenerationError

    gen, named = {}, {}
    for name, value in body.items():
        field = fields.get(name)
        if field is None:
            if strict:
                raise ApiError(400, f"{name:.100}: unrecognized request field", name[:100])
            continue
        if value is None:
            continue
        if not field.fits(value):
            raise invalid(name, f"expected {field.kind}, got {value!r:.40}")
        if field.only is not None and value not in field.only:
            allowed = " or ".join(json.dumps(v) for v in field.only or (None,))
            raise invalid(name, f"not supported yet (only {allowed} is accepted), got {value!r:.40}")
        if field.keyword is not None:
            if field.keyword in gen and gen[field.keyword] != value:
                raise invalid(name, f"{value!r:.40} disagrees with {named[field.keyword]} = {gen[field.keyword]!r:.40}")
            gen[field.keyword], named[field.keyword] = value, name
    guided = [name for name in GUIDED if body.get(name) is not None and name in fields]
    if guided:
        name = guided[0]
        if len(guided) > 1 or "response_format" in gen:
            other = guided[1] if len(guided) > 1 else "response_format"
            raise invalid(name, f"asks for a second structure beside {other}; give one")
        value = body[name]
        if name == "guided_json":
            try:
                schema = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise invalid(name, "expected a JSON schema (an object, or its JSON text)") from None
            gen["response_format"] = {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}}
        else:
            kind = "regex" if name == "guided_regex" else "choice"
            gen["response_format"] = {"type": kind, kind: value}
        named["response_format"] = name
    if "logprobs" in fields:
        top = body.get("top_logprobs")
        if body.get("logprobs") is True:
            gen["logprobs"], named["logprobs"] = top or 0, "top_logprobs" if top is not None else "logprobs"
        elif top is not None:
            raise invalid("top_logprobs", "needs \"logprobs\": true")
    sample = body.get("do_sample") if "do_sample" in fields else None
    if sample is False:  # greedy, whatever temperature says (as `generate(do_sample=False)`)
        gen["temperature"], named["temperature"] = 0.0, "do_sample"
    elif sample is True and not gen.get("temperature"):
        if gen.get("temperature") == 0:
            raise invalid("do_sample", "true needs a temperature > 0, got temperature 0")
        gen["temperature"], named["temperature"] = (defaults or {}).get("temperature") or 1.0, "do_sample"
    stop = gen.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None
    if stop is not None and (stops is None or not 0 < len(stops) <= STOP_LIMIT[0]
                             or not all(is_text(x) and 0 < len(x) <= STOP_LIMIT[1] for x in stops)):
        raise invalid("stop", f"expected a string or a list of at most {STOP_LIMIT[0]} strings of 1-{STOP_LIMIT[1]} "
                              f"characters, got {stop!r:.40}")
    try:  # (max_new_tokens, when absent, is set from the prompt's length later: any valid value checks the rest)
        GenerationConfig.from_kwargs(**({"max_new_tokens": 1} | gen))
    except GenerationError as e:
        raise invalid(named.get(e.field, e.field), f"expected {e.want}, got {e.value!r:.40}") from None
    return gen


def ignored_fields(body: dict, fields: dict[str, Field] = FIELDS) -> list[str]:
    """The request's fields that are neither OpenAI's nor this server's extensions (ignored, as vLLM does)."""
    return [name for name in body if name not in fields]
