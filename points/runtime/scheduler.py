"""Continuous batching: one scheduler under every way of generating (Pipeline.chat and chat_batch, points run,
points serve, points bench's serving rows).

    scheduler = Scheduler(model, tokenizer, engine, max_batch=8, prefix=PrefixCache())
    request = scheduler.submit(prompt, ids, GenerationConfig(max_new_tokens=64))
    for piece in request:            # drives the steps itself, or waits for the worker thread (start())
        print(piece, end="")

The scheduler decides; the runner (points.runtime.runner) executes. The scheduler holds the queue and the
rows as plain values (a row: its request, how many of its positions are in the cache, the tokens chosen),
never a tensor. At every step:
1. Rows whose request finished or was cancelled are freed (their K/V kept in the prefix cache).
2. Waiting requests are admitted into free rows while the prompt tokens not yet prefilled fit the step's
   budget (`max_prefill_tokens`): the runner restores the longest cached prefix of the prompt into the row,
   runs the vision encoder for the images after it (or takes their features from the vision cache).
3. The budget is handed out to the rows still prefilling, oldest first: a prompt that fits is prefilled
   whole, a longer one a chunk now and the rest at the next steps.
4. One forward: with prompt chunks or speculative drafts, the runner's packed forward of the chunks, every
   generating row's next token and its drafts (a long prompt joins the batch without stopping it for more
   than one chunk; prompts admitted together are prefilled together); otherwise the engine's one-token step
   over rows [0, last generating row] (compiled: that many rounded up to a power of two). A row whose last
   chunk ran gets its first token; a row with drafts keeps the ones `verify` accepts and one more.
Every row has its own settings (temperature, top-p/k, penalty, seed, stop strings, max tokens, a loop guard:
points.runtime.loops) in the per-row `Picker`; a row's tokens depend only on its own prompt and noise, so a
greedy reply is the one the request gets alone (up to float summation order: equal in float32, tested) and a seeded one repeats.

Speculative decoding (a request's cfg.speculative, or the scheduler's `speculative` default): rows that
decode greedily or sample without a repetition penalty, a grammar or log-probabilities get drafts
(points.runtime.speculative); the others decode one token a step in the same forward. A row's number of
drafts adapts: doubled (up to the drafter's k) when all were kept; when none was, halved, and the row
decodes n x SPECULATIVE_PAUSE steps without drafts (n: such misses in a row) before it tries again, so
drafts that are never right cost little more than plain decoding.

The cache grows (to the next power of two, rows copied) when an admitted request needs more positions than
it has. A failure while admitting a request (its image, its prefix) fails that request only; a failure inside
a step's forward (out of memory, an interrupt) fails the requests of that step and leaves the scheduler empty
and usable.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig, Reply
from points.runtime.loops import LoopGuard
from points.runtime.prefix import PrefixCache
from points.runtime.request import END, QueueFull, Request, Stream
from points.runtime.runner import Chunk, Decoding, Runner
from points.runtime.speculative import drafter
from points.runtime.vision import FeatureCache

__all__ = ["MAX_PREFILL_TOKENS", "QueueFull", "Request", "Scheduler", "Stream"]  # (Request, Stream: request.py's)

MAX_PREFILL_TOKENS = 512  # prompt tokens one step prefills (the rest of a longer prompt at the next steps)
SPECULATIVE_K = 4  # drafts per step of a drafter that names no k
SPECULATIVE_PAUSE = 8  # steps a row decodes without drafts after n verifications in a row kept none: n x this


def check_prefill_budget(value) -> int:
    """`max_prefill_tokens`, checked: an integer >= 1 (ValueError naming it otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_prefill_tokens = {value!r}: expected an integer >= 1")
    return value


def _drafting(request: Request) -> bool:
    """Whether a row's rule lets `verify` choose its tokens (the others decode one token a step)."""
    cfg = request.cfg
    return cfg.repetition_penalty == 1.0 and request.constraint is None and cfg.logprobs is None


def _full_k(request: Request) -> int:
    """The most drafts its drafter proposes a step (SPECULATIVE_K for one that names no k)."""
    return getattr(request.speculative, "k", SPECULATIVE_K)


@dataclass
class _Row:
    request: Request
    reply: Reply
    key: list[int]  # the prompt's prefix-cache key
    pos: int  # positions of this row written in the cache
    order: int  # admission order: the oldest prefilling row gets the budget first
    chosen: list[int] = field(default_factory=list)  # every token chosen for it, in order
    draft: object = None  # its drafter's state (points.runtime.speculative), when it drafts
    k: int = 0  # drafts it asks for now (halved when none is kept, doubled back when all are)
    pause: int = 0  # steps left without drafts (drafts that keep failing would cost a wider forward each step)
    misses: int = 0  # verifications in a row that kept no draft
    guard: LoopGuard | None = None  # its cfg.repetition_guard, watching the tokens chosen

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.request.ids)


class Scheduler:
    def __init__(self, model, tokenizer, engine: Engine | None = None, *, max_batch: int = 8,
                 prefix: PrefixCache | None = None, max_queue: int | None = None,
                 vision_cache: FeatureCache | None = None, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 speculative=None):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: expected an integer >= 1")
        check_prefill_budget(max_prefill_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.runner = Runner(model, engine or Engine(model.decoder), max_batch, vision_cache)
        self.max_batch, self.prefix, self.max_queue = max_batch, prefix, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.speculative = drafter(speculative)
        self.stop_ids = {tokenizer.im_end_id, tokenizer.eos_id}
        self.waiting: list[Request] = []
        self.rows: list[_Row | None] = [None] * max_batch
        self._admitted = 0
        self._lock = threading.RLock()  # one step at a time
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting: Request | None = None
        self._in_step = False
        self._grammars = None

    @property
    def engine(self) -> Engine:
        return self.runner.engine

    @property
    def vision_cache(self) -> FeatureCache | None:
        return self.runner.vision_cache

    @property
    def cache(self):
        """The runner's KV cache (None before the first request)."""
        return self.runner.cache

    def use_engine(self, engine: Engine) -> None:
        """Run the steps on another engine (eager or compiled) from the next request on."""
        with self._lock:
            if self.busy:
                raise RuntimeError("the scheduler's engine can only change while no request is generating")
            self.runner.use_engine(engine)

    # ------------------------------------------------------------------ submitting and waiting

    def submit(self, prompt, ids: list[int], cfg: GenerationConfig,
               on_event: Callable[[Request, object], None] | None = None, *, share_prompt: bool = False) -> Request:
        """Queue a prepared prompt (points.runtime.generation.prepare); raises QueueFull when `max_queue`
        requests wait already. share_prompt: the prompt's K/V go into the prefix cache as soon as it is
        prefilled (not only when the request ends), so requests for the same prompt queued after it (several
        choices of one question) restore it instead of prefilling it and encoding its images again."""
        request = Request(prompt, list(ids), cfg, self, on_event, share_prompt=share_prompt)
        request.speculative = self.speculative if cfg.speculative is None else drafter(cfg.speculative)
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
        """Rows prefilling or generating now."""
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
        """Free finished rows, admit waiting requests into free rows, run one forward. Returns whether any
        request is left (waiting or generating)."""
        with self._lock, torch.inference_mode():  # (the step holds no yield: the mode never leaks)
            self._in_step = True
            try:
                self._free_finished()
                self._admit()
                self._free_finished()  # (one cancelled while it was being admitted leaves before any forward)
                if any(r is not None for r in self.rows):
                    self._run()
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

    def _unprefilled(self) -> int:
        return sum(len(r.request.ids) - r.pos for r in self.rows if r is not None and r.prefilling)

    def _admit(self) -> None:
        skipped = 0  # requests left waiting for a sibling's shared prompt
        while None in self.rows and self._unprefilled() < self.max_prefill_tokens:
            with self._work:
                if len(self.waiting) <= skipped:
                    return
                request = self.waiting[skipped]
                if self.prefix is not None and any(
                        r is not None and r.prefilling and r.request.share_prompt and r.request.ids == request.ids
                        for r in self.rows):
                    skipped += 1  # its sibling's prompt is in the prefix cache once prefilled: restore it then
                    continue
                self.waiting.pop(skipped)
                self._admitting = request
            if request.cancelled:  # (cancelled since this step freed the others)
                self._admitting = None
                self._end(request, "cancelled")
                continue
            i = self.rows.index(None)
            try:
                self._begin(i, request)
            except Exception as e:  # this request's failure only (an image that fails to encode, memory)
                self.rows[i] = None
                self.runner.free(i)
                self._admitting = None
                request.error = e
                self._end(request, "error")

    def _begin(self, i: int, request: Request) -> None:
        """Request into row i: its cached prefix restored, its later images encoded; its prompt's chunks follow."""
        key, reused = self.runner.begin(i, request, self.prefix, len(request.ids) + request.cfg.max_new_tokens)
        request.cached_tokens = reused
        with self._work:  # (in a row and no longer admitting at once: load() counts it once)
            self._admitted += 1
            guard = LoopGuard(request.cfg.repetition_guard) if request.cfg.repetition_guard else None
            self.rows[i] = _Row(request, Reply(self.tokenizer, request.cfg.stop), key, reused, self._admitted,
                                guard=guard)
            self._admitting = None

    def _run(self) -> None:
        """This step's forward: prompt chunks within the budget, every generating row's token (and drafts)."""
        budget, chunks = self.max_prefill_tokens, []
        for i, row in sorted(((i, r) for i, r in enumerate(self.rows) if r is not None and r.prefilling),
                             key=lambda x: x[1].order):
            n = min(len(row.request.ids) - row.pos, budget)
            if n <= 0:
                break
            chunks.append(Chunk(i, row.request, row.pos, n, row.pos + n == len(row.request.ids)))
            budget -= n
        generating = [i for i, r in enumerate(self.rows) if r is not None and not r.prefilling]
        decoding = [Decoding(i, self.rows[i].request, self.rows[i].pos, self.rows[i].chosen[-1], self._drafts(i))
                    for i in generating]
        if not chunks and not any(d.drafts for d in decoding):
            return self._decode(generating)
        tokens, recorded, kept = self.runner.mixed(decoding, chunks)
        for c in chunks:
            row = self.rows[c.row]
            row.pos += c.n
            if c.last:
                row.request.first_token_at = time.perf_counter()
                if row.request.share_prompt and self.prefix is not None:
                    self._keep(row.key[:len(row.request.ids)], c.row, "a prompt to share")
                if row.request.speculative is not None and _drafting(row.request):
                    row.draft, row.k = row.request.speculative.start(row.request.ids), _full_k(row.request)
        for d in decoding:
            self.rows[d.row].pos += 1 + kept.get(d.row, 0)
            if d.drafts:
                self._adapt(self.rows[d.row], len(d.drafts), kept[d.row])
        self._push_all(tokens, recorded)

    @staticmethod
    def _adapt(row: _Row, drafted: int, kept: int) -> None:
        """A verification's outcome counted, and the row's next k: doubled (up to its drafter's) when every
        draft was kept; when none was, halved, after a pause longer with each such miss in a row."""
        row.request.drafted_tokens += drafted
        row.request.accepted_tokens += kept
        if kept == drafted:
            row.k, row.misses = min(_full_k(row.request), 2 * row.k), 0
        elif kept == 0:
            row.k, row.misses = max(1, row.k // 2), row.misses + 1
            row.pause = SPECULATIVE_PAUSE * row.misses

    def _drafts(self, i: int) -> list[int]:
        """Row i's drafts for this step: at most its current k, and no more than its max_new_tokens leave room
        for (every draft kept and one more token)."""
        row = self.rows[i]
        if row.draft is None:
            return []
        if row.pause:
            row.pause -= 1
            return []
        k = min(row.k, row.request.cfg.max_new_tokens - len(row.chosen) - 1)
        return row.draft.propose(row.chosen, k)[:k] if k > 0 else []

    def _decode(self, generating: list[int]) -> None:
        n = generating[-1] + 1
        lengths = [r.pos if r is not None else 0 for r in self.rows]
        constrained = {i: self.rows[i].request.constraint for i in generating
                       if self.rows[i].request.constraint is not None}
        chosen, recorded = self.runner.decode(lengths, n, constrained)
        for i in generating:
            self.rows[i].pos += 1
        self._push_all({i: [chosen[i]] for i in generating}, recorded)

    def _push_all(self, tokens: dict, recorded: dict) -> None:
        for i in sorted(tokens):
            for token in tokens[i]:
                if self.rows[i] is None:  # (it ended at an earlier token, or a callback ended it meanwhile)
                    break
                self._push(i, token, recorded.get(i))

    def _push(self, i: int, token: int, recorded=None) -> None:
        """Token `token` chosen for row i: its text to the request; the row ends at a stop, a stop string,
        max_new_tokens, or when its guard sees a loop (finish_reason "repetition", request.repetition set)."""
        row = self.rows[i]
        row.chosen.append(token)
        ended = token in self.stop_ids and not row.request.cfg.ignore_eos
        if recorded is not None and not ended:
            row.request.logprobs.append((token, recorded[0], recorded[1][:row.request.cfg.logprobs]))
        if row.request.constraint is not None and not ended:
            row.request.constraint.consume(token)
        last = len(row.chosen) >= row.request.cfg.max_new_tokens
        looped = row.guard is not None and not ended and row.guard.push(token)
        piece = row.reply.push(token, ended, last or looped)
        if piece:
            row.request._emit(piece)
        if row.reply.done:
            if looped and not row.reply.stopped:
                row.request.repetition = row.guard.found
            self._finish(i, "stop" if row.reply.stopped else "repetition" if looped else "length")

    def _finish(self, i: int, reason: str) -> None:
        row = self.rows[i]
        if row is None:
            return
        self.rows[i] = None
        self.runner.free(i)
        try:
            if self.prefix is not None and row.pos > 0:  # what the row holds: the prompt, then the tokens fed back
                self._keep((row.key + row.chosen)[:row.pos], i, "a finished request")
        finally:
            row.request.completion_tokens = row.reply.tokens
            row.request.token_ids = row.chosen[:row.reply.tokens]
            self._end(row.request, reason)

    def _keep(self, key: list[int], i: int, what: str) -> None:
        try:
            self.runner.keep(self.prefix, key, i)
        except Exception as e:  # the cache is an optimisation: its failure (memory) ends no request
            print(f"points scheduler: the prefix cache could not keep {what} ({type(e).__name__}: {e})",
                  file=sys.stderr, flush=True)

    def _end(self, request: Request, reason: str) -> None:
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        request._emit(END)

    def _fail_all(self, e: BaseException) -> None:
        error = e if isinstance(e, Exception) else RuntimeError(f"generation stopped ({type(e).__name__})")
        failed = [(row.request, row.reply.tokens) for row in self.rows if row is not None]
        if self._admitting is not None and not self._admitting.done:
            failed.append((self._admitting, 0))
        for i, row in enumerate(self.rows):
            if row is not None:
                self.runner.free(i)
        self.rows = [None] * self.max_batch
        self._admitting = None
        for request, tokens in failed:
            request.error, request.completion_tokens, request.step_failed = error, tokens, True
            self._end(request, "error")
