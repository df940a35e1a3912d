"""A reply caught in a loop, seen while it is being decoded (GenerationConfig.repetition_guard).

    guard = LoopGuard(512)
    for token in tokens:
        if guard.push(token):          # the last 512 tokens are one block of <= 170 tokens repeated
            start, period = guard.found  # the loop begins at tokens[start]; tokens[:start + period] keeps one copy
            break

A document reader that loses its place (POINTS-Reader on a newspaper page, its README says) writes the same
line, table row or cell again and again until max_new_tokens: 2,048 tokens of which all but the first few
hundred are waste. The guard ends such a reply once its last `window` tokens are periodic with a period of at
most window / REPEATS, that is one block written at least REPEATS times in a row, without a single token
differing; any other text (a long table whose rows differ in one cell, a list, a repeated word inside
sentences) never trips it. Each token costs one comparison per period watched (window / REPEATS of them):
for every period p the guard counts how many tokens in a row have equalled the token p before them.
"""

from __future__ import annotations

REPEATS = 3  # copies of the block the window must hold at least (so the longest period watched is window // 3)
MIN_WINDOW = 2 * REPEATS  # the smallest window that watches a period


class LoopGuard:
    def __init__(self, window: int):
        if not isinstance(window, int) or isinstance(window, bool) or window < MIN_WINDOW:
            raise ValueError(f"repetition_guard = {window!r}: expected 0 (off) or an integer >= {MIN_WINDOW}")
        self.window, self.longest = window, window // REPEATS
        self.ids: list[int] = []
        self.runs = [0] * (self.longest + 1)  # runs[p]: tokens in a row equal to the token p before them
        self.found: tuple[int, int] | None = None  # (where the loop starts, its period) once tripped

    def push(self, token: int) -> bool:
        """One more token of the reply; True (and `found` set) when the reply has fallen into a loop."""
        ids, runs = self.ids, self.runs
        ids.append(token)
        n = len(ids)
        for p in range(1, min(self.longest, n - 1) + 1):
            if ids[n - 1 - p] == token:
                runs[p] += 1
                if runs[p] + p >= self.window and self.found is None:
                    self.found = (n - runs[p] - p, p)
            else:
                runs[p] = 0
        return self.found is not None
