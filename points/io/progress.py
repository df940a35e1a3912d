"""A one-line progress display (tensors and bytes done) on a terminal; silent when output is not one."""

import sys
import time


class Progress:
    def __init__(self, label: str, total_items: int, total_bytes: int, *, enabled: bool | None = None,
                 stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.total_items, self.total_bytes = label, total_items, total_bytes
        self.items = self.bytes = 0
        self.start = self._last = time.perf_counter()

    def update(self, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.items == self.total_items):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        pct = 100 * self.bytes / max(self.total_bytes, 1)
        rate = self.bytes / max(now - self.start, 1e-9) / 1e9
        self.stream.write(f"\r{self.label}: {self.items}/{self.total_items} tensors, "
                          f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({pct:3.0f}%, {rate:.2f} GB/s)")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
