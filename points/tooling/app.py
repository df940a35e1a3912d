"""The app of `points serve`: an ASGI app on Starlette (routes, the key check, errors as JSON) over the pipeline's
scheduler. Each request is checked and translated by points.tooling.protocol, its images read under the
points.tooling.images policy, queued through `Pipeline.submit` (one row per choice), streamed or answered
whole, counted and logged by points.tooling.metrics. The command (flags, launch, Ray replicas, SIGTERM) is
points.tooling.serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import sys
import time
import uuid

from points.tooling.images import MIB, Images
from points.tooling.metrics import Metrics, log_line
from points.tooling.protocol import (GUIDED, N_MAX, OFFICIAL_FIELDS, ApiError, generation_of, ignored_fields,
                                     invalid, messages_of)


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
            raise invalid("n", f"expected an integer from 1 to {N_MAX} (choices per request), got {n!r:.40}")
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
        from points.runtime.request import END

        if event is END:
            self.jobs.discard(self)
            if self.on_end is not None:  # (the request may end before `submit`'s answer reaches the loop)
                self.on_end(request)
        self.queue.put_nowait((event, upto))

    async def pieces(self):
        from points.runtime.request import END

        while True:
            event, upto = await self.queue.get()
            if event is END:
                return
            yield event, upto

    async def text(self, http_request) -> str:
        """The whole reply; the request is cancelled if the client goes away meanwhile."""
        from points.runtime.request import END

        gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client went away: nobody will read the answer
                    get.cancel()
                    break
                if get.result()[0] is END:
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
