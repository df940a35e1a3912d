"""Building this project's C++ CPU kernels on first use (`float_gemv.cpp`, `int8_gemv.cpp`, `int4_gemv.cpp`, each
including `cpu_common.h`) and loading them.

A library is built once per source text (with the headers beside it), compiler and flags into `$POINTS_CACHE/kernels` (default
`~/.cache/points/kernels`), written under a temporary name and renamed, so concurrent first uses do not see
half a file. `load(source, flags, setup)` returns the library with `setup` having declared its functions, or
None and the reason (no x86-64 CPU with AVX2/FMA/F16C, no compiler, a failed build, `POINTS_CPU_KERNELS=0`);
`Library` does that once per process, on first use.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    root = os.environ.get("POINTS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "points")
    return Path(root) / "kernels"


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo reports (read once)."""
    return frozenset(_read_flags())


def _read_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def alternated_medians(ways: dict, rounds: int = 5) -> dict:
    """{name: median seconds of `rounds` calls} of each zero-argument callable in `ways`, after one warm-up call
    each, the ways alternated round by round, so that a load that comes and goes during the measurement slows
    every way alike (the kernel choices' timing: cpu_gemv's plan, and points.runtime's)."""
    import statistics
    import time

    for fn in ways.values():
        fn()
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(runs) for name, runs in times.items()}


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(source: Path, cxx: str, flags: list[str] = FLAGS) -> Path:
    # the source and the headers beside it (cpu_common.h): a change to either builds again
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(text + repr((version, flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {source.name}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, setup: Callable[[ctypes.CDLL], None], flags: list[str] = FLAGS) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why it is not available)."""
    if os.environ.get("POINTS_CPU_KERNELS", "1") == "0":
        return None, "turned off by POINTS_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"needs an x86-64 CPU (this is {platform.machine()})"
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return None, "needs a CPU with AVX2, FMA and F16C"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, g++, c++)"
    try:
        lib = ctypes.CDLL(str(build(source, cxx, flags)))
        setup(lib)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {source.name}: {e}"
    return lib, None


class Library:
    """A kernel's library, built and loaded on the first `get()` (once per process, thread-safe)."""

    def __init__(self, source: Path, setup: Callable[[ctypes.CDLL], None]):
        self.source, self.setup = source, setup
        self._lock = threading.Lock()
        self._done = False
        self._lib: ctypes.CDLL | None = None
        self._why: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if not self._done:
            with self._lock:
                if not self._done:
                    self._lib, self._why = load(self.source, self.setup)
                    self._done = True  # (last: get's unlocked check)
        return self._lib

    def available(self) -> bool:
        return self.get() is not None

    def reason(self) -> str | None:
        """Why the kernel is not available (None when it is)."""
        self.get()
        return self._why


# The operators the CPU kernels register for torch.compile (points::float_gemv, int8_gemv, int4_gemv), kept
# alive here. torch.library's plain registration rather than torch.library.custom_op: a call through it costs
# about 3 us where a custom_op's costs 10 (its autograd and aliasing wrappers), ~1 ms of a compiled small-preset
# decode step's 97 products. Defined once per process: a module reloaded (importlib.reload, a notebook's
# autoreload) swaps the functions behind the registered ones instead of defining the operator again.
_OPS = globals().get("_OPS") or torch.library.Library("points", "FRAGMENT")
_IMPLS: dict[str, tuple[Callable, Callable]] = globals().get("_IMPLS") or {}


def cpu_op(name: str, schema: str, impl: Callable, fake: Callable) -> None:
    """Define points::`name`(`schema`) with `impl` as its CPU kernel and `fake` its shape function (tracing)."""
    first = name not in _IMPLS
    _IMPLS[name] = (impl, fake)
    if first:
        _OPS.define(f"{name}{schema}")
        _OPS.impl(name, lambda *args: _IMPLS[name][0](*args), "CPU")
        torch.library.register_fake(f"points::{name}", lambda *args: _IMPLS[name][1](*args), lib=_OPS)
