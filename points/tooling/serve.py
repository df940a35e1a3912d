"""`points serve`: an OpenAI-compatible HTTP server on the continuous-batching scheduler (an ASGI app on
Starlette, served by uvicorn; `pip install 'points[serve]'`).

    points serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-queue 64] [--api-key KEY]
                 [--preset NAME]

Routes: POST /v1/chat/completions (the Chat Completions API, streamed as server-sent events with
"stream": true), GET /v1/models, GET /health (no key needed), and the official WePOINTS server's POST /chat
(its body and its answer). Every request is one row of the scheduler (points.runtime.scheduler), so
concurrent requests decode together; a greedy reply equals `Pipeline.chat` of the same conversation alone.

Presets (an extension): a request's "preset" field names one of the model's presets (POINTS-Reader's
"reader", POINTS-GUI-G's "gui"; GET /v1/models lists them beside the model's "member"), applied as
`Pipeline.chat(..., preset=)` applies it: its system turn, its prompt for a user turn of images only, its
decoding settings as the defaults under the request's own fields. `--preset NAME` is the preset of every
request that names none (on /chat too). A name the model lacks is a 400 naming the field "preset".

Safe by default: it binds 127.0.0.1; with --api-key every route but /health needs `Authorization: Bearer KEY`
(the scheme in any case, the key compared exactly, in constant time; an empty key, or one with a character
outside visible ASCII, is refused at start); a body over --max-body-mb is refused (413) before it is read
whole; images come as `data:image/...;base64,...` URLs (bytes counted before decoding, pixels checked from the
header before decoding: points.io.processor), `http(s)://` only with --allow-remote-images (size and time
bounded), local paths or `file://` only inside --allow-local-images DIR (resolved, links included, never
outside it). A bad request is a 400 JSON error naming the field (`{"error": {"message", "type", "param",
"code"}}`): a field of the wrong type, an OpenAI field not supported yet (FIELDS: every OpenAI field is
listed, with the values accepted), two fields of one setting that disagree. A field that is neither OpenAI's
nor an extension here is ignored with a log line, as vLLM does (the official /chat route refuses it).
Extensions, as SGLang takes them (POINTS-Reader's model card sends them): top_k, min_p, repetition_penalty,
max_new_tokens (max_tokens' other name), do_sample (false: greedy; true: the temperature given, else the
preset's, else 1), preset. logprobs / top_logprobs: the model's own log-probabilities (points.runtime.sampling). n (1-16): the
choices share one prefill and one vision encoding through the prefix cache, choice k seeded seed + k. More than
--max-batch running + --max-queue waiting requests (a request counts its n) is 429 with Retry-After; never a 500 for bad input. SIGTERM: no new
connections, running requests get --grace-seconds to finish, then the server ends them (a stream's last chunk
says finish_reason "length", then `data: [DONE]`) and exits 0. A client that disconnects has its request
cancelled within one step.

For the operator (points.tooling.metrics): every request that ran leaves one line on stderr under its id (the
response's `id`): route, finish reason, prompt / cached / completion tokens, time to first token and in all;
`usage.prompt_tokens_details.cached_tokens` says how many prompt tokens the prefix cache saved; `GET /metrics`
is Prometheus' text format (queue, busy rows, tokens, prefix-cache hits, time to first token, time per output
token, the vision encoder's time), behind the key like every route but /health; under --replicas each replica
counts its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from points.tooling.metrics import Metrics, log_line

MIB = 1 << 20
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.S)
API_KEY = re.compile(r"[!-~]+")  # visible ASCII: a key any client's header can carry unchanged
CLOSE_AFTER_S = 5.0  # SIGTERM: after the grace period, the seconds before connections still open are closed


class ApiError(Exception):
    """One JSON error answer: HTTP status, message, the request field it is about (param), type and code."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, want: str) -> ApiError:
    return ApiError(400, f"{param}: {want}", param)


# --------------------------------------------------------------------------------------------- requests in

class Images:
    """Where an image part's URL may come from, and its limits."""

    def __init__(self, max_bytes: int, remote: bool = False, local_dir: str | Path | None = None,
                 timeout_s: float = 10.0):
        self.max_bytes, self.remote, self.timeout_s = max_bytes, remote, timeout_s
        self.local_dir = Path(local_dir).resolve() if local_dir is not None else None

    def read(self, url, param: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise _bad(param, "expected a non-empty string (a data:image/...;base64 URL)")
        match = DATA_URL.fullmatch(url)
        if match is not None:
            data = "".join(match.group(1).split())
            if len(data) * 3 // 4 > self.max_bytes:
                raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                               code="image_too_large")
            try:
                return base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise _bad(param, "the data URL's base64 payload is not valid base64") from None
        if url.startswith("data:"):
            raise _bad(param, "a data URL must be data:image/<type>;base64,<payload>")
        if url.startswith(("http://", "https://")):
            if not self.remote:
                raise _bad(param, "remote image URLs are refused (start the server with --allow-remote-images); "
                                  "send the image as a data:image/...;base64 URL")
            return self._fetch(url, param)
        if self.local_dir is None:
            raise _bad(param, "local image paths are refused (start the server with --allow-local-images DIR); "
                              "send the image as a data:image/...;base64 URL")
        path = Path(url.removeprefix("file://"))
        path = (path if path.is_absolute() else self.local_dir / path).resolve()
        if not path.is_relative_to(self.local_dir):
            raise _bad(param, f"local images must lie inside {self.local_dir}")
        try:
            if path.stat().st_size > self.max_bytes:
                raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                               code="image_too_large")
            return path.read_bytes()
        except OSError as e:
            raise _bad(param, f"cannot read the image ({e.strerror or e})") from None

    def _fetch(self, url: str, param: str) -> bytes:
        import urllib.error
        import urllib.request

        import http.client

        deadline, data = time.monotonic() + self.timeout_s, bytearray()
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                while len(data) <= self.max_bytes:  # the whole download within the time limit, not each read
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not complete within {self.timeout_s:g} s")
                    chunk = response.read(min(65536, self.max_bytes + 1 - len(data)))
                    if not chunk:
                        break
                    data += chunk
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            raise _bad(param, f"the image could not be fetched ({getattr(e, 'reason', e)})") from None
        if len(data) > self.max_bytes:
            raise ApiError(413, f"{param}: the image is over the limit of {self.max_bytes // MIB} MiB", param,
                           code="image_too_large")
        return data


DETAIL = {"low": 448 * 448, "high": None, "auto": None}  # an image_url's detail -> its max_pixels (None: the model's)


def messages_of(body: dict, images: Images, max_pixels: int | None = None) -> list[dict]:
    """The request's OpenAI messages -> `Pipeline.chat` messages (images as bytes), every field checked.
    An image_url's own `min_pixels` / `max_pixels` (as SGLang and Qwen-VL users send them) and `detail` (low:
    at most 448 x 448 pixels, 256 image tokens, or the model's max_pixels if lower; high and auto: the model's
    own bounds; an explicit max_pixels wins) become the image item's bounds, each within [784, `max_pixels`] (the model processor's)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "expected an object with \"role\" and \"content\"")
        if m.get("role") not in ("system", "user", "assistant"):
            raise _bad(f"{where}.role", f"expected \"system\", \"user\" or \"assistant\", got {m.get('role')!r:.40}")
        content = m.get("content")
        if isinstance(content, str):
            if not _text(content):
                raise _bad(f"{where}.content", "expected Unicode text (a lone surrogate cannot be encoded)")
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content", "expected a string or a list of content parts")
        parts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not _text(part.get("text")):
                    raise _bad(f"{at}.text", "expected a string of Unicode text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                item = {"type": "image"} | (_pixel_bounds(image_url, f"{at}.image_url", max_pixels)
                                            if isinstance(image_url, dict) else {})
                parts.append(item | {"image": images.read(url, f"{at}.image_url.url")})
            else:
                raise _bad(at, "expected {\"type\": \"text\", \"text\"} or {\"type\": \"image_url\", "
                               "\"image_url\": {\"url\"}}")
        out.append({"role": m["role"], "content": parts})
    return out


def _pixel_bounds(image_url: dict, where: str, most: int | None) -> dict:
    """An image_url's min_pixels / max_pixels / detail -> the image item's bounds (400s naming the field)."""
    from points.io.chat import ITEM_PIXELS_MIN

    detail = image_url.get("detail")
    if detail is not None and detail not in DETAIL:
        raise _bad(f"{where}.detail", f"expected \"low\", \"high\" or \"auto\", got {detail!r:.40}")
    low = DETAIL.get(detail)
    bounds = {"max_pixels": min(low, most or low)} if low is not None else {}  # (never over the model's own)
    for key in ("min_pixels", "max_pixels"):
        value = image_url.get(key)
        if value is None:
            continue
        top = most if most is not None else value
        if not JSON_TYPES["an integer"](value) or not ITEM_PIXELS_MIN <= value <= top:
            raise _bad(f"{where}.{key}", f"expected an integer from {ITEM_PIXELS_MIN} (28 x 28) to {top} (the "
                                         f"model's max_pixels), got {value!r:.40}")
        bounds[key] = value
    if bounds.get("min_pixels", 0) > bounds.get("max_pixels", most or bounds.get("min_pixels", 0)):
        raise _bad(f"{where}.min_pixels", f"{bounds['min_pixels']} is over max_pixels "
                                          f"({bounds.get('max_pixels', most)})")
    return bounds


def _text(s) -> bool:
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
            raise _bad(name, f"expected {field.kind}, got {value!r:.40}")
        if field.only is not None and value not in field.only:
            allowed = " or ".join(json.dumps(v) for v in field.only or (None,))
            raise _bad(name, f"not supported yet (only {allowed} is accepted), got {value!r:.40}")
        if field.keyword is not None:
            if field.keyword in gen and gen[field.keyword] != value:
                raise _bad(name, f"{value!r:.40} disagrees with {named[field.keyword]} = {gen[field.keyword]!r:.40}")
            gen[field.keyword], named[field.keyword] = value, name
    guided = [name for name in GUIDED if body.get(name) is not None and name in fields]
    if guided:
        name = guided[0]
        if len(guided) > 1 or "response_format" in gen:
            other = guided[1] if len(guided) > 1 else "response_format"
            raise _bad(name, f"asks for a second structure beside {other}; give one")
        value = body[name]
        if name == "guided_json":
            try:
                schema = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise _bad(name, "expected a JSON schema (an object, or its JSON text)") from None
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
            raise _bad("top_logprobs", "needs \"logprobs\": true")
    sample = body.get("do_sample") if "do_sample" in fields else None
    if sample is False:  # greedy, whatever temperature says (as `generate(do_sample=False)`)
        gen["temperature"], named["temperature"] = 0.0, "do_sample"
    elif sample is True and not gen.get("temperature"):
        if gen.get("temperature") == 0:
            raise _bad("do_sample", "true needs a temperature > 0, got temperature 0")
        gen["temperature"], named["temperature"] = (defaults or {}).get("temperature") or 1.0, "do_sample"
    stop = gen.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None
    if stop is not None and (stops is None or not 0 < len(stops) <= STOP_LIMIT[0]
                             or not all(_text(x) and 0 < len(x) <= STOP_LIMIT[1] for x in stops)):
        raise _bad("stop", f"expected a string or a list of at most {STOP_LIMIT[0]} strings of 1-{STOP_LIMIT[1]} "
                           f"characters, got {stop!r:.40}")
    try:  # (max_new_tokens, when absent, is set from the prompt's length later: any valid value checks the rest)
        GenerationConfig.from_kwargs(**({"max_new_tokens": 1} | gen))
    except GenerationError as e:
        raise _bad(named.get(e.field, e.field), f"expected {e.want}, got {e.value!r:.40}") from None
    return gen


def ignored_fields(body: dict, fields: dict[str, Field] = FIELDS) -> list[str]:
    """The request's fields that are neither OpenAI's nor this server's extensions (ignored, as vLLM does)."""
    return [name for name in body if name not in fields]


# --------------------------------------------------------------------------------------------- the app

class Server:
    """The app's state: the pipeline, its scheduler running in a worker thread, the limits, the requests in."""

    def __init__(self, pipe, name: str, *, api_key: str | None = None, max_body_bytes: int = 20 * MIB,
                 images: Images | None = None, max_queue: int, preset: str | None = None):
        self.pipe, self.name, self.api_key = pipe, name, api_key
        self.preset = preset  # the preset of every request that names none (--preset; checked by `build`)
        self.max_body_bytes = max_body_bytes
        self.images = images or Images(max_body_bytes)
        self.scheduler = pipe.scheduler
        self.capacity = self.scheduler.max_batch + max_queue  # requests in at once: the rows, then the queue
        self.jobs: set[_Job] = set()  # the requests in, from their admission until their request ends
        self.ending = False  # SIGTERM's grace period is over: every request is ended
        self.created = int(time.time())
        self.metrics = Metrics(self.scheduler)

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect
        from starlette.routing import Route

        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"]),
                  Route("/v1/chat/completions", self.completions, methods=["POST"]),
                  Route("/chat", self.official_chat, methods=["POST"])]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error, ClientDisconnect: self._client_gone,
                    Exception: self._internal_error}
        lifespan = contextlib.asynccontextmanager(self._lifespan)
        return _Guard(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan), self)

    async def _lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:
            self.scheduler.stop()

    # ---------------------------------------------------------------- routes

    async def health(self, request):
        from starlette.responses import JSONResponse

        busy, waiting = self.scheduler.load()
        return JSONResponse({"status": "ok", "model": self.name, "busy_rows": busy, "waiting": waiting,
                             "pid": os.getpid()})

    async def prometheus(self, request):
        from starlette.responses import Response

        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    async def models(self, request):
        from starlette.responses import JSONResponse

        member = self.pipe.member  # (extensions beside OpenAI's fields: the family member, its presets)
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                         "owned_by": "points", "member": member.name,
                                                         "presets": sorted(member.presets),
                                                         "default_preset": self.preset}]})

    async def completions(self, request):
        from starlette.responses import JSONResponse

        body = await self._body(request)
        preset = self._preset(body.get("preset") if isinstance(body.get("preset"), str) else None)
        gen = generation_of(body, defaults=dict(preset.generation) if preset is not None else None, strict=False)
        ignored = ignored_fields(body)
        if ignored:
            print(f"points serve: ignored request field(s) {', '.join(repr(n[:100]) for n in ignored[:8])} (neither "
                  "OpenAI's nor this server's)", file=sys.stderr, flush=True)
        if body.get("model") not in (None, self.name):
            raise ApiError(404, f"model: {body['model']!r:.60} is not served here (this server serves "
                                f"{self.name!r})", "model", code="model_not_found")
        stream = body.get("stream") or False
        usage_chunk = (body.get("stream_options") or {}).get("include_usage") is True
        n = 1 if body.get("n") is None else body["n"]
        if not 1 <= n <= N_MAX:
            raise _bad("n", f"expected an integer from 1 to {N_MAX} (choices per request), got {n!r:.40}")
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        jobs = await self._submit(body, gen, preset, ident, "/v1/chat/completions", n)
        if stream:
            return _CancellingStream(jobs, self._events(jobs, ident, created, usage_chunk, "logprobs" in gen),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = []
        for k, job in enumerate(jobs):
            text = await job.text(request)
            logprobs = None if "logprobs" not in gen else {"content": self._logprobs(job.request.logprobs)}
            choices.append({"index": k, "message": {"role": "assistant", "content": text},
                            "finish_reason": job.finish_reason(), "logprobs": logprobs})
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": self.name,
                             "choices": choices, "usage": _usage(jobs)})

    async def official_chat(self, request):
        """The official WePOINTS server's route: {"messages", "max_tokens", "temperature", "top_p", "top_k"} ->
        {"choices": [{"index": 0, "message": {"role": "assistant", "content"}}]}."""
        from starlette.responses import JSONResponse

        body = await self._body(request)
        job, = await self._submit(body, generation_of(body, OFFICIAL_FIELDS), self._preset(None),
                                  f"chat-{uuid.uuid4().hex}", "/chat")
        text = await job.text(request)
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    # ---------------------------------------------------------------- the pieces

    async def _body(self, request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise self._too_large()
        try:
            body = json.loads(data)
        except ValueError as e:  # (JSONDecodeError, bad UTF-8, an integer of thousands of digits)
            raise ApiError(400, f"the body is not JSON that can be read ({e})") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply to be read") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _preset(self, name: str | None):
        """The request's preset (its field, else --preset's, else None), a 400 naming "preset" if the model lacks it."""
        from points.io.chat import PresetError

        name = self.preset if name is None else name
        if name is None:
            return None
        try:
            return self.pipe.preset(name)
        except PresetError as e:
            raise ApiError(400, f"preset: {e.reason}", "preset", code="preset_not_found") from None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the body is over the limit of {self.max_body_bytes / MIB:g} MiB (--max-body-mb)",
                        code="body_too_large")

    async def _submit(self, body: dict, gen: dict, preset, ident: str, route: str, n: int = 1) -> list["_Job"]:
        """Admit the request's `n` choices (429 when they would pass --max-batch + --max-queue: counted here, on
        the event loop, from admission to the end, so a burst cannot race past the bound) and queue them, its
        images decoded once off the event loop; `preset` (a family Preset, or None) applied to its messages and
        under its settings. The first choice shares its prompt through the prefix cache once prefilled (the
        others restore it: one prefill, one vision encoding); choice k of a seeded request draws with seed + k.
        When each ends it is counted in the metrics and logged in one line under `ident` (`ident`/k for n > 1)."""
        from starlette.concurrency import run_in_threadpool

        if len(self.jobs) + n > self.capacity:
            raise ApiError(429, f"the server is busy ({len(self.jobs)} requests in: --max-batch "
                                f"{self.scheduler.max_batch} running, the rest waiting); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        jobs = [_Job(loop, self.jobs, lambda request, name=(ident if n == 1 else f"{ident}/{k}"):
                     self._ended(name, route, request)) for k in range(n)]

        def prepare():  # (Pipeline.submit builds and checks the prompt: one policy for every entry point)
            messages = messages_of(body, self.images, self.pipe.processor.max_pixels)
            for k, job in enumerate(jobs):
                settings = gen if gen.get("seed") is None or k == 0 else gen | {"seed": (gen["seed"] + k) % 2**64}
                job.request = self.pipe.submit(messages, "messages", preset=preset.name if preset else None,
                                               on_event=job.event, share_prompt=n > 1 and k == 0, **settings)

        try:
            await run_in_threadpool(prepare)
        except ValueError as e:  # the conversation or an image, named by the prompt builder; a grammar refused
            text = str(e)
            if text.startswith("response_format:"):  # (named by the field that asked for it)
                param = next((name for name in GUIDED if body.get(name) is not None), "response_format")
                raise ApiError(400, param + text.removeprefix("response_format"), param) from None
            param = text.split(":", 1)[0] if text.startswith("messages") else "messages"
            raise ApiError(400, text, param) from None
        finally:
            for job in jobs:
                if job.request is None:  # never queued
                    self.jobs.discard(job)
        if self.ending:
            for job in jobs:
                job.request.cancel()
        return jobs

    def _ended(self, ident: str, route: str, request) -> None:
        self.metrics.observe(request)
        print(log_line(ident, route, request), file=sys.stderr, flush=True)

    def end_requests(self) -> None:
        """SIGTERM's grace period is over: every request is ended (cancelled in the scheduler: a stream sends its
        last chunk and [DONE], a plain request its answer, both with finish_reason "length")."""
        self.ending = True
        running = [job.request for job in self.jobs if job.request is not None and not job.request.done]
        for request in running:
            request.cancel()
        if running:
            print(f"points serve: ended {len(running)} request(s) still running after --grace-seconds "
                  "(finish_reason \"length\")", file=sys.stderr, flush=True)

    def _logprobs(self, entries: list) -> list[dict]:
        """Request.logprobs in OpenAI's shape: each token's text, log-probability, bytes and top_logprobs."""
        def one(token: int, logprob: float) -> dict:
            b = self.pipe.tokenizer.token_bytes(token)
            return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}
        return [one(t, lp) | {"top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries]

    async def _events(self, jobs: list["_Job"], ident: str, created: int, usage_chunk: bool, logprobs: bool = False):
        """The stream of `jobs` (a request's choices): each choice's role chunk, its pieces as they come (the
        choices interleaved, each chunk naming its index), its last chunk with its finish reason, then the
        usage chunk when asked and [DONE]."""
        sent = [0] * len(jobs)  # each choice's logprobs entries sent so far

        def chunk(k: int, delta: dict, finish=None, upto: int | None = None) -> str:
            lp = None
            if logprobs and upto is not None:
                lp, sent[k] = {"content": self._logprobs(jobs[k].request.logprobs[sent[k]:upto])}, upto
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                          "model": self.name, "choices": [{"index": k, "delta": delta,
                                                                           "finish_reason": finish,
                                                                           "logprobs": lp}]}) + "\n\n"
        merged = asyncio.Queue()

        async def feed(k: int, job: "_Job"):
            async for piece, upto in job.pieces():
                await merged.put((k, piece, upto))
            await merged.put((k, None, None))
        feeders = [asyncio.ensure_future(feed(k, job)) for k, job in enumerate(jobs)]
        try:
            for k in range(len(jobs)):
                yield chunk(k, {"role": "assistant", "content": ""})
            left = len(jobs)
            while left:
                k, piece, upto = await merged.get()
                if piece is not None:
                    yield chunk(k, {"content": piece}, upto=upto)
                    continue
                left -= 1
                request = jobs[k].request
                if request.error is not None:
                    yield "data: " + json.dumps(ApiError(500, f"generation failed: {request.error}",
                                                         type="server_error").body()) + "\n\n"
                    break
                yield chunk(k, {}, jobs[k].finish_reason(), upto=len(request.logprobs))
            else:
                if usage_chunk:
                    yield ("data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                                  "model": self.name, "choices": [], "usage": _usage(jobs)}) + "\n\n")
            yield "data: [DONE]\n\n"
        finally:
            for feeder in feeders:
                feeder.cancel()
            for job in jobs:
                job.request.cancel()  # a client that went away: its row is freed at the next step

    async def _api_error(self, request, exc):
        return self.error(exc)

    async def _http_error(self, request, exc):
        status = exc.status_code
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return self.error(ApiError(status, message.get(status, exc.detail), code="not_found" if status == 404 else None))

    async def _client_gone(self, request, exc):  # (it left while sending its body: nobody reads this)
        return self.error(ApiError(400, "the client disconnected before its body was complete"))

    async def _internal_error(self, request, exc):
        print(f"points serve: internal error on {request.url.path}: {exc!r}", file=sys.stderr)
        return self.error(ApiError(500, f"internal error: {exc}", type="server_error"))

    @staticmethod
    def error(e: ApiError):
        from starlette.responses import JSONResponse

        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _CancellingStream(jobs, events, **kw):
    """A StreamingResponse that cancels its requests however the response ends: finished, or cut off by the
    client's disconnect (Starlette cancels the sending task; the events generator may be left suspended at
    a yield, so its own `finally` cannot be relied on to run promptly)."""
    from starlette.responses import StreamingResponse

    class Response(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                for job in jobs:
                    if not job.request.done:
                        job.request.cancel()

    return Response(events, **kw)


class _Guard:
    """The ASGI app around Starlette's: the key check (every route but /health), before any route runs."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and self.server.api_key is not None:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # (the scheme is case-insensitive, RFC 9110 11.1; the key is visible ASCII: compared as bytes)
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(b" "), self.server.api_key.encode()):
                error = ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                 type="authentication_error", code="invalid_api_key")
                return await Server.error(error)(scope, receive, send)
        await self.app(scope, receive, send)


class _Job:
    """One request seen from the event loop: the scheduler thread's events arrive in an asyncio queue; it is in
    `jobs` until its last event arrives."""

    def __init__(self, loop, jobs: set, on_end=None):
        self.loop, self.queue, self.request, self.jobs, self.on_end = loop, asyncio.Queue(), None, jobs, on_end
        jobs.add(self)

    def event(self, request, event) -> None:  # called in the scheduler's thread
        # (with the count of logprobs entries made so far: those a streamed piece carries)
        self.loop.call_soon_threadsafe(self._arrived, request, event, len(request.logprobs))

    def _arrived(self, request, event, upto: int) -> None:
        from points.runtime.scheduler import _END

        if event is _END:
            self.jobs.discard(self)
            if self.on_end is not None:  # (the request may end before `submit`'s answer reaches the loop)
                self.on_end(request)
        self.queue.put_nowait((event, upto))

    async def pieces(self):
        from points.runtime.scheduler import _END

        while True:
            event, upto = await self.queue.get()
            if event is _END:
                return
            yield event, upto

    async def text(self, http_request) -> str:
        """The whole reply; the request is cancelled if the client goes away meanwhile."""
        from points.runtime.scheduler import _END

        gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client went away: nobody will read the answer
                    get.cancel()
                    break
                if get.result()[0] is _END:
                    break
        finally:
            gone.cancel()
            if not self.request.done:
                self.request.cancel()
        if self.request.error is not None:
            raise ApiError(500, f"generation failed: {self.request.error}", type="server_error")
        return self.request.reply

    def finish_reason(self) -> str:
        """OpenAI's words: "stop" or "length" (a request cut short, by the server's shutdown too, says "length")."""
        return "stop" if self.request.finish_reason == "stop" else "length"




def _usage(jobs: list[_Job]) -> dict:
    """A request's usage: its prompt once (and what the prefix cache saved of it for the first choice), the
    completion tokens of every choice."""
    first = jobs[0].request
    completion = sum(job.request.completion_tokens for job in jobs)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


async def _disconnected(http_request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------------------------- command

def parser() -> argparse.ArgumentParser:
    from points.tooling.options import add_preset_option, add_weight_options

    p = argparse.ArgumentParser(prog="points serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s (0: any free port)")
    add_weight_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded at once (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row, beyond the --max-batch running; beyond it 429 with "
                        "Retry-After (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=20, help="request body limit, MiB (default: %(default)s)")
    p.add_argument("--max-image-mb", type=float, default=None, help="one image's limit, MiB (default: the body's)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY`, KEY in visible ASCII (default: $POINTS_API_KEY, else "
                        "no key)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off: a server that fetches what clients name can be aimed at its "
                        "own network)")
    p.add_argument("--allow-local-images", type=Path, default=None, metavar="DIR",
                   help="accept local paths and file:// image URLs inside DIR only")
    p.add_argument("--remote-timeout", type=float, default=10.0, help="seconds for a remote image (default: %(default)s)")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="SIGTERM: how long running requests may take to finish; then they are ended, finish_reason "
                        "\"length\" (default: %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true", help="prefill every request from scratch")
    add_preset_option(p, "; the preset of every request whose \"preset\" field names none")
    p.add_argument("--replicas", type=int, default=None,
                   help="N model replicas under Ray Serve (one per GPU on CUDA; pip install 'points[ray]'), routed "
                        "to the least loaded; default: one process, no Ray")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from points.tooling.options import check_weight_options, exit_code

    check_weight_options(p, args)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--port", args.port, 0), ("--replicas", args.replicas, 1)):
        if value is not None and value < low:
            p.error(f"{flag} {value}: expected an integer >= {low}")
    if not args.max_body_mb > 0 or (args.max_image_mb is not None and not args.max_image_mb > 0):
        p.error("--max-body-mb and --max-image-mb must be > 0")
    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        p.error(f"--allow-local-images {args.allow_local_images}: not a directory")
    return exit_code(lambda: _serve(args))


def _serve(args) -> int:
    where = "--api-key" if args.api_key is not None else "POINTS_API_KEY"
    if args.api_key is None:
        args.api_key = os.environ.get("POINTS_API_KEY")
    if args.api_key is not None and not API_KEY.fullmatch(args.api_key):  # (an open server, or a key no one can send)
        raise ValueError(f"{where} is empty: give a key, or none at all to serve without one" if not args.api_key else
                         f"{where} has a character outside visible ASCII (a space, a control or a non-ASCII "
                         "character): no client's Authorization header can carry it")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise ValueError(f"points serve needs the serving extra ({e.name} is missing): pip install "
                         "'points[serve]'") from None
    if args.replicas is not None:
        return run_ray(args)
    return run(build(vars(args)), args.host, args.port, args.grace_seconds)


def build(options: dict) -> Server:
    """The pipeline and the app's state from `points serve`'s options (as a dict: it travels to Ray replicas)."""
    import points

    from points.tooling.options import check_preset

    o = argparse.Namespace(**options)
    check_preset(o.model, o.preset)  # (before the weights load)
    pipe = points.load(o.model, device=o.device, dtype=o.dtype, quantize=o.quantize,
                       quantize_lm_head=o.quantize_lm_head or None, compile=o.compile,
                       prefix_cache=not o.no_prefix_cache, max_batch=o.max_batch)
    body = int(o.max_body_mb * MIB)
    images = Images(int(o.max_image_mb * MIB) if o.max_image_mb else body, o.allow_remote_images,
                    o.allow_local_images, o.remote_timeout)
    name = o.served_model_name or Path(o.model).resolve().name
    return Server(pipe, name, api_key=o.api_key, max_body_bytes=body, images=images, max_queue=o.max_queue,
                  preset=o.preset)


def run_ray(args) -> int:
    """--replicas N: the same app in N Ray Serve replicas (each its own model and scheduler) behind Ray's
    proxy, which routes each request to a replica with few requests in flight; SIGTERM shuts Serve down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'points[ray]'") from None
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    cuda = args.device.startswith("cuda")

    def replica_app():  # runs on each replica
        server = build(options)
        server.scheduler.start()  # (whether or not the proxy runs the app's lifespan)
        return server.app()

    resources = {"num_gpus": 1} if cuda else {"num_cpus": 0}
    deployment = serve.deployment(serve.ingress(replica_app)(type("PointsReplica", (), {})), name="points",
                                  num_replicas=args.replicas, ray_actor_options=resources,
                                  max_ongoing_requests=args.max_batch + args.max_queue)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment.bind(), route_prefix="/")
        name = args.served_model_name or Path(args.model).resolve().name
        print(f"points serve: {name} on http://{args.host}:{args.port} ({args.replicas} replicas under Ray Serve, max "
              f"batch {args.max_batch} each, key {'required' if args.api_key else 'not required'})", file=sys.stderr,
              flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        ray.shutdown()
    print("points serve: stopped", file=sys.stderr, flush=True)
    return 0


def http_server(server: Server, host: str, port: int, grace: float):
    """The app under uvicorn, whose graceful shutdown (SIGTERM, Ctrl-C, `should_exit`) stops accepting
    connections and waits for the running requests; `grace` seconds later the server ends them itself (each
    gets its last chunk or its answer; uvicorn would cancel their tasks: streams cut, a traceback each), and
    CLOSE_AFTER_S later it closes the connections still open (a body still arriving: its task sees a
    disconnect)."""
    import uvicorn

    class Http(uvicorn.Server):
        async def shutdown(self, sockets=None):
            loop = asyncio.get_running_loop()
            timers = [loop.call_later(grace, server.end_requests),
                      loop.call_later(grace + CLOSE_AFTER_S, self.close_connections)]
            try:
                await super().shutdown(sockets)
            finally:
                for timer in timers:
                    timer.cancel()

        def close_connections(self):
            for connection in list(self.server_state.connections):
                connection.transport.close()

    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace + 2 * CLOSE_AFTER_S, lifespan="on")
    return Http(config)


def run(server: Server, host: str, port: int, grace: float) -> int:
    """Serve until SIGTERM / Ctrl-C (http_server's graceful shutdown); one line with the address once requests
    are accepted."""
    http = http_server(server, host, port, grace)

    def announce():
        while not http.started and not http.should_exit:
            time.sleep(0.02)
        if http.started:
            bound = http.servers[0].sockets[0].getsockname()
            where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            print(f"points serve: {server.name} on http://{where}:{bound[1]} (max batch {server.scheduler.max_batch}, "
                  f"key {'required' if server.api_key else 'not required'})", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    stopped = []
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again to the handler it found: this one
    # records it, so that a graceful stop exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    try:
        http.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("points serve: stopped" + (" (SIGTERM)" if stopped else ""), file=sys.stderr, flush=True)
    return 0
