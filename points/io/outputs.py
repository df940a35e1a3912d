"""Where a dataset command (`points run`, `points score`) writes: checked before any work, held by one run.

    check_output(out, source=inp)   # refuses, naming the reason, before anything is read or written
    with OutputLock(out):           # an exclusive flock on `OUT.lock`; a second run is told who holds it
        ...

`check_output` refuses an output that is the input (the same file once paths and links are resolved), a
directory, and a folder that does not exist or cannot be written (tried by creating a file in it, which
also answers for read-only mounts and root). `OutputLock` takes `fcntl.flock` on a file beside OUT, writes
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


class OutputError(ValueError):
    """An output that cannot be written, or is being written by another run; the message says which."""


def check_output(out: Path, *, source: Path | None = None, flag: str = "--output") -> None:
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{flag} {out}: is a directory; expected a file path (it is written at the end)")
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise OutputError(f"{flag} {out}: is the input file (--input {source}); writing it would replace the "
                          "dataset: choose another output path")
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"{flag} {out}: the folder {folder} {what}; create it first")
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
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
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
