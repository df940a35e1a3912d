"""Where a dataset command (`points run`, `points score`) writes: checked before any work, held by one run.

    check_output(out, sources={"--input": inp})   # refuses, naming the reason, before anything is read or written
    check_output_dir(out, sources={"--model": model})   # the same for an output directory (points finetune)
    with OutputLock(out):           # an exclusive flock on `OUT.lock`; a second run is told who holds it
        ...

`check_output` refuses an output that is one of the inputs (the same file once paths and links are
resolved), a directory, and a folder that does not exist or cannot be written (tried by creating a file in
it, which also answers for read-only mounts and root). `check_output_dir` refuses a file, an input
directory, and a path under which nothing can be created. `OutputLock` takes `fcntl.flock` on a file beside OUT, writes
its holder (pid, host, start time) into it, and removes it when released; the lock goes with the process, so
a killed run never leaves a lock that blocks (a leftover file is taken over by the next run).
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

from points.errors import WriteError


class OutputError(ValueError):
    """An output that cannot be written, or is being written by another run; the message says which."""


def check_output(out: Path, *, sources: dict[str, Path] | None = None, flag: str = "--output") -> None:
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{flag} {out}: is a directory; expected a file path (it is written at the end)")
    if (given := _input_at(out, sources)) is not None:
        raise OutputError(f"{flag} {out}: is the input file ({' '.join(given)}); writing it would replace it: "
                          "choose another output path")
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"{flag} {out}: the folder {folder} {what}; create it first")
    _probe(folder, out, flag)


def check_output_dir(out: Path, *, sources: dict[str, Path] | None = None, flag: str = "--output") -> None:
    """An output directory (made if missing, with its parents): not a file, not an input directory, and
    writable where it will be made."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: is a file; expected a directory (it is created if missing)")
    if (given := _input_at(out, sources)) is not None:
        raise OutputError(f"{flag} {out}: is the input directory ({' '.join(given)}); writing there would replace "
                          "its files: choose another output directory")
    existing = out
    while not existing.exists():  # the nearest folder that exists: the one written into first
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {out}: {existing} is a file, so no directory can be made under it")
    _probe(existing, out, flag)


def _input_at(out: Path, sources: dict[str, Path] | None) -> tuple[str, str] | None:
    """(flag, path) of the input that `out` is (the same file or directory once links and `..` are resolved)."""
    for flag, source in (sources or {}).items():
        if out.exists() and Path(source).exists() and os.path.samefile(out, source):
            return flag, str(source)
    return None


def _probe(folder: Path, out: Path, flag: str) -> None:
    """Refuse (naming `flag`) a folder in which no file can be created."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=folder)
    except OSError as e:
        raise OutputError(f"{flag} {out}: the folder {folder} cannot be written ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


class OutputLock:
    """An exclusive, non-blocking lock on `OUT.lock`, held from `acquire` to `release` (or the `with`)."""

    def __init__(self, out: Path, flag: str = "--output"):
        self.out, self.flag = Path(out), flag
        self.path = self.out.with_name(self.out.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock (OutputError if another run holds it); a lock file that cannot be made or written (a
        full disk) is a WriteError naming it, and nothing of ours is left behind."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise WriteError(self.path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise OutputError(f"{self.flag} {self.out}: another run is writing it ({holder}, lock "
                                  f"{self.path.name}); wait for it to finish or stop it") from None
            try:  # the holder may have removed the file between our open and our lock: lock the one on disk
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as e:
            self.release()
            raise WriteError(self.path, e) from None
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so that no one locks a file on its way out
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
