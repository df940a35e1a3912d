"""Continuous batching: one scheduler under every way of generating (Pipeline.chat and chat_batch, points run,
points serve).

    scheduler = Scheduler(model, tokenizer, engine, max_batch=8, prefix=PrefixCache())
    request = scheduler.submit(prompt, ids, GenerationConfig(max_new_tokens=64))
    for piece in request:            # drives the steps itself, or waits for the worker thread (start())
        print(piece, end="")

A queue of requests and a batch of at most `max_batch` rows over one KV cache. At every step:
1. Rows whose request finished or was cancelled are freed (their K/V kept in the prefix cache).
2. While a row is free and a request waits, it is admitted: the longest prefix of its prompt that the
   prefix cache holds is copied into its row, the vision encoder runs for its images after that prefix,
   the rest of the prompt is prefilled into its row alone, and its first token is chosen.
3. One decode step for every row at once (each row at its own position; a free row in the middle feeds a
   dummy token at position 0 and its output is ignored): eager over rows [0, last busy row], compiled over
   that many rows rounded up to a power of two (at most `max_batch`): a few row counts, so a few graphs
   per key block. Rows are always taken lowest first, so a lone request runs one row.
Every row has its own settings (temperature, top-p/k, penalty, seed, stop strings, max tokens) in the
per-row `Picker`; a row's tokens depend only on its own prompt and noise, so a greedy reply is the one the
request gets alone (up to float summation order: equal in float32, tested) and a seeded one repeats.

The cache grows (to the next power of two, rows copied) when an admitted request needs more positions than
it has. A failure while admitting a request fails that request only; a failure inside a decode step (out
of memory, an interrupt) fails the requests of that step and leaves the scheduler empty and usable.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig, Reply
from points.runtime.prefix import PrefixCache, prompt_key
from points.runtime.sampling import Picker
from points.runtime.vision import FeatureCache, image_features

_END = object()  # the last event of a request


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` waiting requests already."""


@dataclass(eq=False)
class Request:
    """One generation: its prompt and settings in; text pieces, the reason it ended and token counts out.
    Iterating yields the reply's text pieces as they are made (their concatenation is the reply)."""

    prompt: object  # points.io.chat.Prompt (pixel_values, grid_thw)
    ids: list[int]
    cfg: GenerationConfig
    scheduler: "Scheduler"
    on_event: Callable[["Request", object], None] | None = None  # called from the generating thread
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: BaseException | None = None
    completion_tokens: int = 0
    cancelled: bool = False
    step_failed: bool = False  # it ended with a failure of a whole decode step, not of its own
    token_ids: list[int] = field(default_factory=list)  # once done: the ids chosen for it (a stop token included)
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (not prefilled again)
    # with cfg.logprobs: per generated token but a stop token, (id, log-probability, [(id, log-probability)] of
    # the cfg.logprobs most likely), the model's own distribution (points.runtime.sampling)
    logprobs: list = field(default_factory=list)
    share_prompt: bool = False  # its prompt's K/V go to the prefix cache once prefilled (siblings: n > 1)
    constraint: object = None  # points.runtime.grammar.Constraint, for a cfg.response_format
    images_encoded: int = 0  # images the vision encoder ran for (not those of the cached prefix, nor cached ones)
    images_cached: int = 0  # images whose features came from the vision cache
    vision_seconds: float = 0.0  # the vision encoder's time for them
    submitted_at: float = field(default_factory=time.perf_counter)  # perf_counter() times
    first_token_at: float | None = None
    finished_at: float | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    pieces: list[str] = field(default_factory=list)  # every piece emitted so far

    @property
    def reply(self) -> str:
        """The text emitted so far (the whole reply once done)."""
        return "".join(self.pieces)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating for this request: its row is freed at the next step (or it leaves the queue)."""
        self.cancelled = True
        self.scheduler._cancelled()

    def _emit(self, event) -> None:
        if event is not _END:
            self.pieces.append(event)
        self.events.put(event)
        if self.on_event is not None:
            self.on_event(self, event)

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                event = self.scheduler._next_event(self)
                if event is _END:
                    if self.error is not None:
                        raise self.error
                    return
                yield event
        finally:
            if not self.done:
                self.cancel()

    def text(self) -> str:
        return "".join(self)

    def stream(self) -> "Stream":
        """The pieces as an iterator that cancels the request when closed or dropped, even unstarted."""
        return Stream(self)


class Stream:
    """An iterator over a request's pieces; `close()` (or being garbage-collected) cancels the request."""

    def __init__(self, request: Request):
        self.request, self._pieces = request, iter(request)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        if not self.request.done:
            self.request.cancel()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass
class _Row:
    request: Request
    reply: Reply
    key: list[int]  # the prompt's prefix-cache key
    pos: int  # positions of this row written in the cache
    chosen: list[int] = field(default_factory=list)  # every token chosen for it, in order


class Scheduler:
    def __init__(self, model, tokenizer, engine: Engine | None = None, *, max_batch: int = 8,
                 prefix: PrefixCache | None = None, max_queue: int | None = None,
                 vision_cache: FeatureCache | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: expected an integer >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.engine = engine or Engine(model.decoder)
        self.max_batch, self.prefix, self.max_queue = max_batch, prefix, max_queue
        self.vision_cache = vision_cache
        self.stop_ids = {tokenizer.im_end_id, tokenizer.eos_id}
        self.waiting: list[Request] = []
        self.rows: list[_Row | None] = [None] * max_batch
        self.cache = None
        self.pick = Picker(max_batch, model.decoder.cfg.vocab_size, self.engine.device)
        self.next_input = torch.zeros(max_batch, dtype=torch.long, device=self.engine.device)
        self._lock = threading.RLock()  # one step at a time
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting: Request | None = None
        self._in_step = False
        self._recorded: dict = {}  # the last choice's log-probabilities, by row (_read_logprobs)
        self._grammars = None

    def use_engine(self, engine: Engine) -> None:
        """Run the steps on another engine (eager or compiled) from the next request on."""
        with self._lock:
            if self.busy:
                raise RuntimeError("the scheduler's engine can only change while no request is generating")
            self.engine, self.cache = engine, None

    # ------------------------------------------------------------------ submitting and waiting

    def submit(self, prompt, ids: list[int], cfg: GenerationConfig,
               on_event: Callable[[Request, object], None] | None = None, *, share_prompt: bool = False) -> Request:
        """Queue a prepared prompt (points.runtime.generation.prepare); raises QueueFull when `max_queue`
        requests wait already. share_prompt: the prompt's K/V go into the prefix cache as soon as it is
        prefilled (not only when the request ends), so requests for the same prompt queued after it (several
        choices of one question) restore it instead of prefilling it and encoding its images again."""
        request = Request(prompt, list(ids), cfg, self, on_event, share_prompt=share_prompt)
        if cfg.response_format is not None:  # (compiled here: a grammar the library refuses raises now)
            from points.runtime.grammar import GrammarError

            try:
                request.constraint = self.grammars().constraint(cfg.response_format)
            except GrammarError as e:
                raise GrammarError(f"response_format: {e}") from None
        with self._work:
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(request)
            self._work.notify_all()
        return request

    def grammars(self):
        """The grammar library's view of this tokenizer (points.runtime.grammar), built on first use."""
        if self._grammars is None:
            from points.runtime.grammar import Grammars

            self._grammars = Grammars(self.tokenizer)
        return self._grammars

    @property
    def busy(self) -> int:
        """Rows generating now."""
        return sum(r is not None for r in self.rows)

    @contextmanager
    def paused(self):
        """No step runs while the block runs (e.g. a recorded forward on the same modules: points.runtime.look)."""
        with self._lock:
            yield

    def load(self) -> tuple[int, int]:
        """(requests being prefilled or generating, requests waiting), read together: a request moving from
        the queue into a row is counted in one of the two, never in neither."""
        with self._work:
            return self.busy + (self._admitting is not None), len(self.waiting)

    def _cancelled(self) -> None:
        """A request was cancelled: the worker frees its row at its next step; without a worker it is freed
        now (no step may come)."""
        if self._thread is not None or self._in_step:  # (inside a step: freed at the next one)
            return self._wake()
        with self._lock, torch.inference_mode():
            self._free_finished()

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def _next_event(self, request: Request):
        """The request's next event; without a worker thread the caller's thread runs the steps meanwhile."""
        while True:
            try:
                return request.events.get_nowait()
            except queue.Empty:
                pass
            if self._thread is not None:
                return request.events.get()
            if not self.step() and request.events.empty():
                raise RuntimeError("points scheduler: a request was lost (nothing left to run and no end given)")

    # ------------------------------------------------------------------ the worker thread (serving)

    def start(self) -> None:
        """Run the steps in a background thread (requests then only wait for their events)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="points-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread after the current step (requests still running are cancelled)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join()
        self._thread = None
        with self._lock:
            for r in [*self.waiting, *(row.request for row in self.rows if row is not None)]:
                r.cancel()
            self.step()

    def _loop(self) -> None:
        while not self._stopping:
            with self._work:
                while not self._stopping and not self.waiting and not self.busy:
                    self._work.wait()
            if not self._stopping:
                try:
                    self.step()
                except Exception as e:  # the step's requests have their error; the worker goes on
                    print(f"points scheduler: a decode step failed ({type(e).__name__}: {e}); its requests "
                          "ended with that error", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """Free finished rows, admit waiting requests into free rows, run one decode step. Returns whether
        any request is left (waiting or generating)."""
        with self._lock, torch.inference_mode():  # (the step holds no yield: the mode never leaks)
            self._in_step = True
            try:
                self._free_finished()
                self._admit()
                self._free_finished()  # (one cancelled while it was being prefilled leaves before any decode)
                if any(r is not None for r in self.rows):
                    self._decode()
            except BaseException as e:  # the batch's failure (memory, an interrupt): its requests end
                self._fail_all(e)
                raise
            finally:
                self._in_step = False
            return bool(self.waiting) or any(r is not None for r in self.rows)

    def _free_finished(self) -> None:
        for i, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._finish(i, "cancelled")
        with self._work:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._end(r, "cancelled")

    def _admit(self) -> None:
        while None in self.rows:
            with self._work:
                if not self.waiting:
                    return
                request = self._admitting = self.waiting.pop(0)
            if request.cancelled:  # (cancelled since this step freed the others)
                self._admitting = None
                self._end(request, "cancelled")
                continue
            i = self.rows.index(None)
            try:
                first = self._prefill(i, request)
            except Exception as e:  # this request's failure only (an image that fails to encode, memory)
                self.rows[i] = None
                self._admitting = None
                request.error = e
                self._end(request, "error")
                continue
            self._push(i, first)

    def _prefill(self, i: int, request: Request) -> int:
        """Request into row i: the cached prefix restored, its later images encoded, the rest prefilled;
        returns its first token."""
        model, engine, ids, cfg = self.model, self.engine, request.ids, request.cfg
        prompt = request.prompt
        key, images = prompt_key(ids, model.image_token_id, prompt.pixel_values, prompt.grid_thw)
        entry, reused = self.prefix.match(key, len(ids) - 1) if self.prefix is not None else (None, 0)
        self._reserve(len(ids) + cfg.max_new_tokens)
        row = self.cache.view_rows(i, i + 1)
        row.pos.zero_()
        row.span = 0
        if entry is not None:
            self.prefix.restore(entry, reused, row)
        later = [im for im in images if im[0] >= reused]  # the images before `reused` are in the cache already
        features = self._features(request, images, later, key) if later else None
        embeds = model.embed(torch.tensor([ids[reused:]], device=engine.device), features)
        logits = engine.prefill(row, embeds=embeds)
        if request.share_prompt and self.prefix is not None:
            self._keep(key[:len(ids)], row, "a prompt to share")
        self.pick.set_row(i, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                          penalty=cfg.repetition_penalty, seed=cfg.seed, logprobs=cfg.logprobs is not None,
                          constrained=request.constraint is not None)
        if request.constraint is not None:
            request.constraint.allowed(self.pick.allowed[i])
        pick = self.pick.view(i, i + 1)
        pick.draw()
        first = int(pick(logits)[0])
        self._recorded = self._read_logprobs(pick, [0], offset=i) if cfg.logprobs is not None else {}
        request.cached_tokens, request.first_token_at = reused, time.perf_counter()
        with self._work:  # (in a row and no longer admitting at once: load() counts it once)
            self.rows[i] = _Row(request, Reply(self.tokenizer, cfg.stop), key, len(ids))
            self._admitting = None
        self.next_input[i] = first
        return first

    def _features(self, request: Request, images: list, later: list, key: list[int]) -> torch.Tensor:
        """The features of the prompt's images `later` (prompt_key's), in order: from the vision cache where it
        holds them (keyed by the image's content and grid), the others encoded in one call and kept."""
        prompt, got, todo = request.prompt, {}, []
        for im in later:
            found = self.vision_cache.get(key[im[0]]) if self.vision_cache is not None else None
            if found is None:
                todo.append(im)
            else:
                got[im[0]] = found
        request.images_cached = len(later) - len(todo)
        if todo:
            start = time.perf_counter()
            encoded = image_features(self.model, torch.cat([prompt.pixel_values[r:r + n] for _, _, r, n in todo]),
                                     torch.stack([prompt.grid_thw[images.index(im)] for im in todo]),
                                     self.engine.attn)
            if encoded.is_cuda:  # (the time the encoder took, not the time to queue it)
                torch.cuda.synchronize(encoded.device)
            request.images_encoded, request.vision_seconds = len(todo), time.perf_counter() - start
            for im, part in zip(todo, encoded.split([im[1] for im in todo])):
                got[im[0]] = part
                if self.vision_cache is not None:
                    self.vision_cache.put(key[im[0]], part if len(todo) == 1 else part.clone())  # (not a view)
        return torch.cat([got[im[0]] for im in later])

    def _reserve(self, positions: int) -> None:
        """A cache of at least `positions` positions per row, the busy rows' K/V carried over."""
        if self.cache is not None and self.cache.max_len >= positions:
            return
        want = max(positions, 2 * self.cache.max_len if self.cache is not None else 0)
        want = min(1 << (want - 1).bit_length(), self.model.decoder.cfg.max_seq_len)
        new = self.engine.new_cache(self.max_batch, max(want, positions))
        old = self.cache
        if old is not None and any(r is not None for r in self.rows):
            new.k[:, :, :, :old.max_len] = old.k
            new.v[:, :, :, :old.max_len] = old.v
            new.pos.copy_(old.pos)
        self.cache = new

    def _decode(self) -> None:
        busy = [i for i, r in enumerate(self.rows) if r is not None]
        n = busy[-1] + 1
        if self.engine.compiled:  # a few row counts (powers of two), so a few graphs per key block
            n = min(self.max_batch, 1 << (n - 1).bit_length())
        view = self.cache if n == self.max_batch else self.cache.view_rows(0, n)
        view.span = max(self.rows[i].pos for i in busy)
        idle = [i for i in range(n) if self.rows[i] is None]
        if idle:  # a free row writes its dummy token at its own position 0, never beyond the cache
            view.pos[idle] = 0
        pick = self.pick if n == self.max_batch else self.pick.view(0, n)
        for i in busy:
            if self.rows[i].request.constraint is not None:
                self.rows[i].request.constraint.allowed(self.pick.allowed[i])
        pick.draw()
        chosen = self.engine.step(self.next_input[:n, None], view, pick)
        self.next_input[:n] = chosen
        chosen = chosen.tolist()
        self._recorded = self._read_logprobs(pick, busy) if pick.recording else {}
        for i in busy:
            if self.rows[i] is not None:  # (an on_event callback may have ended another row meanwhile)
                self.rows[i].pos += 1
                self._push(i, chosen[i])

    @staticmethod
    def _read_logprobs(pick: Picker, rows: list[int], offset: int = 0) -> dict:
        """Row (`offset` + its index in `pick`) -> (log-probability of its token, [(id, log-probability)] of the
        most likely), for the `rows` of `pick` whose request asked (one host read of the recorded buffers)."""
        asking = [r for r in rows if pick.rules[r].logprobs]
        if not asking:
            return {}
        chosen = pick.chosen_logprob.tolist()
        top, ids = pick.top_logprob.tolist(), pick.top_id.tolist()
        return {offset + r: (chosen[r], list(zip(ids[r], top[r]))) for r in asking}

    def _push(self, i: int, token: int) -> None:
        """Token `token` chosen for row i: its text to the request; the row ends at a stop, a stop string,
        max_new_tokens, or when the cache is full."""
        row = self.rows[i]
        row.chosen.append(token)
        recorded = self._recorded.get(i)
        if recorded is not None and token not in self.stop_ids:
            row.request.logprobs.append((token, recorded[0], recorded[1][:row.request.cfg.logprobs]))
        if row.request.constraint is not None and token not in self.stop_ids:
            row.request.constraint.consume(token)
        last = len(row.chosen) >= row.request.cfg.max_new_tokens
        piece = row.reply.push(token, token in self.stop_ids, last)
        if piece:
            row.request._emit(piece)
        if row.reply.done:
            self._finish(i, "stop" if row.reply.stopped else "length")

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        if row is None:
            return
        self.rows[i] = None
        self.pick.set_row(i)  # greedy again: a freed row asks for no noise and no sampling graph
        try:
            if self.prefix is not None:  # what the row holds: the prompt, then every chosen token fed back
                self._keep((row.key + row.chosen)[:row.pos], self.cache.view_rows(i, i + 1), "a finished request")
        finally:
            row.request.completion_tokens = row.reply.tokens
            row.request.token_ids = row.chosen[:row.reply.tokens]
            self._end(row.request, reason)

    def _keep(self, key: list[int], row, what: str) -> None:
        try:
            self.prefix.put(key, row)
        except Exception as e:  # the cache is an optimisation: its failure (memory) ends no request
            print(f"points scheduler: the prefix cache could not keep {what} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    def _end(self, request: Request, reason: str) -> None:
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        request._emit(_END)

    def _fail_all(self, e: BaseException) -> None:
        error = e if isinstance(e, Exception) else RuntimeError(f"generation stopped ({type(e).__name__})")
        failed = [(row.request, row.reply.tokens) for row in self.rows if row is not None]
        if self._admitting is not None and not self._admitting.done:
            failed.append((self._admitting, 0))
        self.rows = [None] * self.max_batch
        self._admitting = None
        for request, tokens in failed:
            request.error, request.completion_tokens, request.step_failed = error, tokens, True
            self._end(request, "error")
