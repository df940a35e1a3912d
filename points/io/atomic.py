"""Building a directory atomically: in a hidden sibling `.NAME.partial-PID`, renamed into place at the end.

    with partial_dir(dst) as tmp:
        ...write into tmp...
        os.rename(tmp, dst)

On any failure the sibling is removed, SIGTERM included (while the block runs, SIGTERM is turned into
`Terminated`, an exception, so that the cleanup runs; the earlier handler is restored afterwards). Siblings
left by processes that no longer exist (SIGKILL, a power cut) are removed when the next one starts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM arrived while a directory was being built (exit status 143 when uncaught by the CLI)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` siblings of `dst` whose process is gone; return them."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.partial-(\d+)")
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


@contextmanager
def partial_dir(dst: Path):
    dst = Path(dst)
    remove_stale_partials(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
