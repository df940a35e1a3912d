"""A request and what its caller holds: the prompt and settings in; its text pieces as events, the reason it
ended, token counts and timings out; a stream that cancels it when dropped. The scheduler
(points.runtime.scheduler) queues and runs requests; iterating one waits for its events (or, without a worker
thread, drives the scheduler's steps meanwhile).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from points.runtime.generation import GenerationConfig

END = object()  # the last event of a request


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` waiting requests already."""


@dataclass(eq=False)
class Request:
    """One generation: its prompt and settings in; text pieces, the reason it ended and token counts out.
    Iterating yields the reply's text pieces as they are made (their concatenation is the reply)."""

    prompt: object  # points.io.chat.Prompt (pixel_values, grid_thw)
    ids: list[int]
    cfg: GenerationConfig
    scheduler: object  # the points.runtime.scheduler.Scheduler it was submitted to
    on_event: Callable[["Request", object], None] | None = None  # called from the generating thread
    finish_reason: str | None = None  # "stop" | "length" | "repetition" | "cancelled" | "error"
    error: BaseException | None = None
    completion_tokens: int = 0
    cancelled: bool = False
    step_failed: bool = False  # it ended with a failure of a whole decode step, not of its own
    token_ids: list[int] = field(default_factory=list)  # once done: the ids chosen for it (a stop token included)
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (not prefilled again)
    # with cfg.logprobs: per generated token but a stop token, (id, log-probability, [(id, log-probability)] of
    # the cfg.logprobs most likely), the model's own distribution (points.runtime.sampling)
    logprobs: list = field(default_factory=list)
    speculative: object = None  # a points.runtime.speculative drafter proposing tokens to verify, or None
    drafted_tokens: int = 0  # tokens its drafter proposed, and how many of them were accepted
    accepted_tokens: int = 0
    share_prompt: bool = False  # its prompt's K/V go to the prefix cache once prefilled (siblings: n > 1)
    constraint: object = None  # points.runtime.grammar.Constraint, for a cfg.response_format
    # finish_reason "repetition": (the index in token_ids where the loop starts, its period in tokens)
    repetition: tuple[int, int] | None = None
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
        if event is not END:
            self.pieces.append(event)
        self.events.put(event)
        if self.on_event is not None:
            self.on_event(self, event)

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                event = self.scheduler._next_event(self)
                if event is END:
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
