"""The int4 weight-only product for a few rows on the CPU (`int4_gemv.cpp`), compiled on first use, through ctypes.

    from points.kernels import cpu_int4
    if cpu_int4.available():
        y = cpu_int4.int4_gemv(x, packed, scale, offset, group_size=128)   # points.io.quantized's int4 format

x [..., K] float32 / bfloat16 / float16 on the CPU; packed uint8 [N, groups * group_size / 2], scale and
offset [N, groups] (offset None: the symmetric scheme). The activations are rounded to int8 per group of
group_size inputs, the weights' groups, inside the call (`quantize_activations` is that rounding, in PyTorch,
for tests and tools), as llama.cpp's q4 x q8 products do per block; the sums are exact in int32 within a
group, float32 across groups.

Optional, as `cpu_int8` (the same build: `cpu_build`). The instruction set follows the CPU's flags, a rule
and not a timing (no busy moment can spoil it): AVX-512 VNNI (vpdpbusd) where the CPU has it, AVX-512BW
where it has that, AVX2 elsewhere (`isa()`; `POINTS_INT4_ISA=avx2|avx512|avx512_vnni` forces a lower one,
for tests and benchmarks; tools/bench_int8.py times each). Registered as the custom op `points::int4_gemv`,
one opaque call in a compiled step.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from points.kernels import cpu_build

SOURCE = Path(__file__).with_name("int4_gemv.cpp")
ISAS = ("avx2", "avx512", "avx512_vnni")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _setup(lib: ctypes.CDLL) -> None:
    fn = lib.points_int4_gemv
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p]
                   + [ctypes.c_int] * 2 + [ctypes.c_int64] * 4)
    fn.restype = ctypes.c_int
    fn = lib.points_int4_dequantize
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    fn.restype = ctypes.c_int


_library = cpu_build.Library(SOURCE, _setup)


available = _library.available  # () -> bool: built (or found in the cache) and loaded
reason = _library.reason  # () -> why it is not available (None when it is)


_ISA: list[str] = []  # isa(), decided once per process


def isa() -> str:
    """The instruction set the products run on: the best the CPU reports, or POINTS_INT4_ISA (a lower one);
    decided on the first call (before any torch.compile trace: `points.runtime.quantize` asks at the swap)."""
    if not _ISA:
        _ISA.append(_best_isa())
    return _ISA[0]


def _best_isa() -> str:
    flags = cpu_build.cpu_flags()
    best = ("avx512_vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags else
            "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2")
    forced = os.environ.get("POINTS_INT4_ISA")
    if forced in ISAS and ISAS.index(forced) <= ISAS.index(best):
        return forced
    return best


def isas() -> tuple[str, ...]:
    """Every instruction set this CPU can run the kernel on (tests run each)."""
    return ISAS[:ISAS.index(_best_isa()) + 1]


def _run(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
         bias: torch.Tensor | None, group_size: int, which: str) -> torch.Tensor:
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"points::int4_gemv is not available: {reason()}")
    n, k, sdt = packed.shape[0], x.shape[-1], scale.dtype
    # bound to names, so that a copy (made only where one is needed: ~4 us a call saved) lives until the call returns
    x2 = x if x.is_contiguous() else x.contiguous()
    packed = packed if packed.is_contiguous() else packed.contiguous()
    scale = scale if scale.is_contiguous() else scale.contiguous()
    if offset is not None and (offset.dtype != sdt or not offset.is_contiguous()):
        offset = offset.to(sdt).contiguous()
    if bias is not None and (bias.dtype != sdt or not bias.is_contiguous()):
        bias = bias.to(sdt).contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    lib.points_int4_gemv(x2.data_ptr(), DTYPE_CODES[x.dtype], packed.data_ptr(), scale.data_ptr(),
                         None if offset is None else offset.data_ptr(), None if bias is None else bias.data_ptr(),
                         DTYPE_CODES[sdt], y.data_ptr(), DTYPE_CODES[x.dtype], ISAS.index(which),
                         x2.numel() // k if k else 0, n, k, group_size)
    return y


cpu_build.cpu_op("int4_gemv", "(Tensor x, Tensor packed, Tensor scale, Tensor? offset, Tensor? bias, int group_size, "
                  "str which) -> Tensor", _run,
                  lambda x, packed, scale, offset, bias, group_size, which: x.new_empty(*x.shape[:-1], packed.shape[0]))


def check_int4_args(name: str, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor | None, bias: torch.Tensor | None, group_size: int) -> None:
    """One-line ValueErrors naming the product and what it expected (the int4 format of points.io.quantized)."""
    k = x.shape[-1]
    groups = -(-k // group_size) if group_size in (32, 64, 128) else 0
    if not groups:
        raise ValueError(f"{name}: group_size must be 32, 64 or 128, got {group_size!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != groups * group_size // 2:
        raise ValueError(f"{name}: packed uint8 [N, {groups * group_size // 2}] expected for {k} inputs in groups "
                         f"of {group_size}, got {packed.dtype} {list(packed.shape)}")
    want = (packed.shape[0], groups)
    if scale.shape != want or (offset is not None and offset.shape != want):
        raise ValueError(f"{name}: scale and offset {list(want)} expected, got {list(scale.shape)} and "
                         f"{None if offset is None else list(offset.shape)}")
    if bias is not None and bias.shape != (packed.shape[0],):
        raise ValueError(f"{name}: bias [{packed.shape[0]}] expected, got {list(bias.shape)}")
    if x.dtype not in DTYPE_CODES or scale.dtype not in DTYPE_CODES:
        raise ValueError(f"{name}: x and scale in float32, bfloat16 or float16, got {x.dtype} and {scale.dtype}")


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, *, group_size: int = 128, which: str | None = None) -> torch.Tensor:
    """x [..., K] @ W^T + bias -> [..., N] in x's dtype, W the int4 weight (q * scale + offset, or
    (q - 8) * scale without offsets) and x rounded to int8 per group (see the module). `which`: one of
    `isas()` (default `isa()`). Under torch.compile it is the custom op `points::int4_gemv`, unchecked."""
    which = which or isa()
    if torch.compiler.is_compiling():
        return torch.ops.points.int4_gemv(x, packed, scale, offset, bias, group_size, which)
    if x.device.type != "cpu" or packed.device.type != "cpu":
        raise ValueError(f"int4_gemv: CPU tensors expected, got x on {x.device}, weights on {packed.device}")
    check_int4_args("int4_gemv", x, packed, scale, offset, bias, group_size)
    if which not in isas():
        raise ValueError(f"int4_gemv: which = {which!r}, expected one of {isas()} (what this CPU has)")
    return _run(x, packed, scale, offset, bias, group_size, which)


def planned(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
            bias: torch.Tensor | None, group_size: int, which: str) -> torch.Tensor:
    """int4_gemv without its checks, for a layer that made them once (Int4Linear: shapes fixed at the swap)."""
    if torch.compiler.is_compiling():
        return torch.ops.points.int4_gemv(x, packed, scale, offset, bias, group_size, which)
    return _run(x, packed, scale, offset, bias, group_size, which)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, in_features: int,
                    group_size: int, first: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight rows [first, first + rows) as float32 or bfloat16 [rows, in_features] (q * s + o in float32, one
    rounding): the block a many-row product multiplies before the next one is made. No checks (the layer's)."""
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"points::int4_gemv is not available: {reason()}")
    packed, scale = packed.contiguous(), scale.contiguous()
    offset = None if offset is None else offset.to(scale.dtype).contiguous()
    out = torch.empty(rows, in_features, dtype=dtype)
    lib.points_int4_dequantize(packed.data_ptr(), scale.data_ptr(), None if offset is None else offset.data_ptr(),
                               DTYPE_CODES[scale.dtype], out.data_ptr(), DTYPE_CODES[dtype], first, rows,
                               in_features, group_size)
    return out


def quantize_activations(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] as the kernel sees it, in float64: per group of `group_size` inputs (zero-padded to a whole
    group), xs = max |x| / 127 in float32 and round(x / xs) (half to even), times xs. For tests and tools."""
    k = x.shape[-1]
    pad = -k % group_size
    v = torch.nn.functional.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, group_size)
    xs = v.abs().amax(-1, keepdim=True) / 127
    q = torch.where(xs > 0, torch.round(v / torch.where(xs > 0, xs, 1)), 0)
    return (q.double() * xs.double()).reshape(*x.shape[:-1], -1)[..., :k]
