"""The float product for a few rows on the CPU (`float_gemv.cpp`), weights in nn.Linear's layout, through ctypes.

    from points.kernels import cpu_gemv
    if cpu_gemv.available():
        y = cpu_gemv.float_gemv(x, weight, bias)     # x [..., K], weight [N, K], bias [N]: bfloat16 or float32

Optional, as `cpu_int8` (the same build: `cpu_build`). The instruction set is chosen from /proc/cpuinfo:
`avx512_bf16` dot products for bf16 where the CPU has them, AVX-512F where it has that, AVX2 elsewhere
(`isa()` says which; `POINTS_GEMV_ISA=avx2|avx512|avx512_bf16` forces a lower one, for tests and benchmarks).
Registered as the custom op `points::float_gemv`, one opaque call inside a compiled step.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from points.kernels import cpu_build

SOURCE = Path(__file__).with_name("float_gemv.cpp")
ISAS = ("avx2", "avx512", "avx512_bf16")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_state: dict = {}  # the measured plans, by dtype


def _setup(lib: ctypes.CDLL) -> None:
    fn = lib.points_float_gemv
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 2 + [ctypes.c_int64] * 3
    fn.restype = ctypes.c_int


_library = cpu_build.Library(SOURCE, _setup)


available = _library.available  # () -> bool: built (or found in the cache) and loaded
reason = _library.reason  # () -> why it is not available (None when it is)


def isa() -> str:
    """The instruction set the products run on (the best the CPU reports, or POINTS_GEMV_ISA)."""
    flags = cpu_build.cpu_flags()
    best = ("avx512_bf16" if {"avx512f", "avx512bw", "avx512_bf16"} <= flags else
            "avx512" if {"avx512f", "avx512bw"} <= flags else "avx2")
    forced = os.environ.get("POINTS_GEMV_ISA")
    if forced in ISAS and ISAS.index(forced) <= ISAS.index(best):
        return forced
    return best


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, which: str | None = None) -> torch.Tensor:
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"points::float_gemv is not available: {reason()}")
    n, k = weight.shape
    code = ISAS.index(which or isa())
    if code == 2 and weight.dtype != torch.bfloat16:
        code = 1  # (the dot-product instruction is bf16's)
    # bound to names, so that a copy lives until the call returns
    x2, weight, bias = x.reshape(-1, k).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    lib.points_float_gemv(x2.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                          DTYPE_CODES[x.dtype], code, x2.shape[0], n, k)
    return y.view(*x.shape[:-1], n)


cpu_build.cpu_op("float_gemv", "(Tensor x, Tensor weight, Tensor? bias, str which) -> Tensor", _run,
                  lambda x, weight, bias, which: x.new_empty(*x.shape[:-1], weight.shape[0]))


def float_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               which: str | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T + bias -> [..., N], all bfloat16 or all float32 on the CPU: float32 sums, the
    bias added in float32, one rounding. `which`: one of ISAS (default: `isa()`). Under torch.compile it is the
    custom op `points::float_gemv`, unchecked (the caller checked when it was traced; without `which`: AVX2)."""
    if torch.compiler.is_compiling():
        return torch.ops.points.float_gemv(x, weight, bias, which or "avx2")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"float_gemv: CPU tensors expected, got x on {x.device}, weight on {weight.device}")
    if x.dtype not in DTYPE_CODES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"float_gemv: x, weight and bias in one dtype, float32 or bfloat16; got {x.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"float_gemv: weight [N, {x.shape[-1]}] and bias [N] expected, got {list(weight.shape)} and "
                         f"{None if bias is None else list(bias.shape)}")
    if which is not None and (which not in ISAS or ISAS.index(which) > ISAS.index(isa())):
        raise ValueError(f"float_gemv: which = {which!r}, expected one of {ISAS[:ISAS.index(isa()) + 1]} (what this "
                         "CPU has)")
    return _run(x, weight, bias, which)


def planned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, which: str) -> torch.Tensor:
    """float_gemv without its checks, for a caller that made them once (GemvLinear: the weight's dtype and
    shape fixed at the swap, `which` from the plan, x checked on the way in)."""
    if torch.compiler.is_compiling():
        return torch.ops.points.float_gemv(x, weight, bias, which)
    return _run(x, weight, bias, which)


# ----------------------------------------------------------------------------------------------- the choice

ROWS = (1, 2, 4, 8)  # the row counts measured; more rows than the last always run PyTorch's product
TUNE_SHAPE = (4864, 896)  # [N, K] of the weights the choice is measured on (a Qwen2.5-0.5B-sized product)
TUNE_BYTES = 160 << 20  # weights streamed per measurement: beyond any last-level cache


MARGIN = 1.1  # a kernel must beat PyTorch's product by this much to be chosen over it
ROUNDS = 5


BUSY_LOAD = 0.5  # load average per CPU above which a measured plan is not kept in the cache


def machine_busy() -> bool:
    """Whether other work is running here (the 1-minute load average above BUSY_LOAD per CPU)."""
    try:
        return os.getloadavg()[0] > BUSY_LOAD * (os.cpu_count() or 1)
    except OSError:
        return False


def choose(median: dict) -> str | None:
    """From the median seconds of each candidate (None: PyTorch's product): the fastest ISA when it beats
    PyTorch's by MARGIN, else PyTorch's."""
    best = min((c for c in median if c is not None), key=median.get, default=None)
    return best if best is not None and median[None] >= MARGIN * median[best] else None


def _tune(dtype: torch.dtype) -> dict[int, str | None]:
    """For each row count of ROWS: the fastest of PyTorch's product and each ISA of the kernel, streamed over
    distinct weights (TUNE_BYTES of them). Made to survive a busy moment: the candidates alternate, ROUNDS
    passes each, medians compared, and the kernel is taken only when it beats PyTorch's product by MARGIN (a
    load that comes and goes during the measurement slows every candidate alike, and a near-tie keeps the
    default). None = PyTorch's."""
    import torch.nn.functional as F

    n, k = TUNE_SHAPE
    g = torch.Generator().manual_seed(0)
    count = max(2, TUNE_BYTES // (n * k * dtype.itemsize))
    weights = [torch.randn(n, k, generator=g).to(dtype) for _ in range(count)]
    best_isa = isa()
    choices = [None] + [i for i in ISAS[:ISAS.index(best_isa) + 1] if i != "avx512_bf16" or dtype == torch.bfloat16]
    plan = {}
    with torch.inference_mode():
        for rows in ROWS:
            x = torch.randn(rows, k, generator=g).to(dtype)
            products = {c: F.linear if c is None else (lambda x, w, c=c: _run(x, w, None, c)) for c in choices}
            passes = {c: (lambda p=p: [p(x, w) for w in weights]) for c, p in products.items()}
            plan[rows] = choose(cpu_build.alternated_medians(passes, ROUNDS))
    return plan


def plan(dtype: torch.dtype) -> dict[int, str | None]:
    """Which product runs `rows` rows of `dtype` on this machine: {rows: ISA or None (PyTorch's)} for ROWS,
    measured once per CPU, flags, thread count, torch version and kernel source, and kept in the kernel
    cache (`cpu_plan-*.json`), unless the machine was busy before or after the measurement (`machine_busy`):
    such a plan serves this process only; {} where the kernel is not available."""
    import hashlib
    import json

    if dtype not in DTYPE_CODES or not available():
        return {}
    key = dtype
    if key in _state:
        return _state[key]
    with _lock:
        if key in _state:
            return _state[key]
        ident = json.dumps([cpu_build.cpu_model(), sorted(cpu_build.cpu_flags()), torch.get_num_threads(),
                            torch.__version__, str(dtype), SOURCE.read_text(), ROWS, TUNE_SHAPE, isa(), MARGIN,
                            ROUNDS])
        path = cpu_build.cache_dir() / f"cpu_plan-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
        try:
            found = {int(r): c for r, c in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            found = None
        if found is None or set(found) != set(ROWS):
            busy = machine_busy()
            found = _tune(dtype)
            try:
                if busy or machine_busy():  # (used now, kept for no later process: measured again next time)
                    raise OSError("measured on a busy machine")
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_text(json.dumps(found))
                os.replace(tmp, path)
            except OSError:
                pass  # (measured again next time)
        _state[key] = found
        return found

