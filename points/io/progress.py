"""The one progress line of long work (loading and converting tensors, a dataset run), redrawn in place on a
terminal and silent when the output is not one.

    bar = Progress("loading x", total=290, unit="tensors", total_bytes=n)   # ... 12/290 tensors, 0.4/1.9 GB (21%, 3.1 GB/s)
    bar = Progress("points run", total=40, unit="items")                    # ... 3/40 items  0.50 items/s  12.1 tok/s  ETA 1m14s
    bar = Progress("points ocr", total=90, unit="pages", per_minute=True, every=10)  # ... 20/90 pages  4.1 pages/min
    bar.update(items=1, nbytes=..., tokens=...); bar.close()

`every`: when the output is no terminal (a log, a batch job) and the line is not switched off (enabled None),
the line is written whole, once per `every` items, instead of nothing.
"""

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, *, unit: str, total_bytes: int | None = None,
                 enabled: bool | None = None, stream=None, every: int | None = None, per_minute: bool = False):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.every = every if enabled is None and not self.enabled else None  # (lines, not a redrawn one)
        self.per_minute = per_minute
        self.label, self.total, self.unit, self.total_bytes = label, total, unit, total_bytes
        self.done = self.bytes = self.tokens = 0
        self.note = ""  # a figure of the work's own, shown after the rates (e.g. a training loss)
        self.start = self._last = time.perf_counter()
        if self.enabled and total_bytes is None:  # a dataset run shows where it starts
            self._draw(self.start)

    def update(self, items: int = 1, nbytes: int = 0, tokens: int = 0, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        self.done += items
        self.bytes += nbytes
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)
        elif self.every and items and (self.done // self.every > (self.done - items) // self.every
                                       or self.done >= self.total):
            self.stream.write(self.line(now).rstrip() + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        dt = max((now or time.perf_counter()) - self.start, 1e-9)
        head = f"{self.label}: {self.done}/{self.total} {self.unit}"
        if self.total_bytes is not None:
            pct = 100 * self.bytes / max(self.total_bytes, 1)
            return (f"{head}, {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({pct:3.0f}%, "
                    f"{self.bytes / dt / 1e9:.2f} GB/s)")
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else None
        eta_s = "--" if eta is None else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        note = f"  {self.note}" if self.note else ""
        shown = f"{rate * 60:.2f} {self.unit}/min" if self.per_minute else f"{rate:.2f} {self.unit}/s"
        return f"{head}  {shown}  {self.tokens / dt:.1f} tok/s{note}  ETA {eta_s}   "

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
