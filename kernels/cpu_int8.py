"""The int8 weight-only product for the CPU (`int8_gemv.cpp`), compiled on first use and called through ctypes.

    from points.kernels import cpu_int8
    if cpu_int8.available():
        y = cpu_int8.int8_gemv(x, weight_int8, scale)      # x [..., K] float, weight [N, K] int8, scale [N]

Optional, like Triton: it needs an x86-64 CPU with AVX2 and FMA and a C++ compiler (`$CXX`, else g++/c++; the
one torch.compile uses on the CPU), built and cached by `cpu_build`. Where anything is missing, `available()` is False,
`reason()` says why, and `points.runtime.quantize` uses PyTorch's kernels instead. `POINTS_CPU_KERNELS=0`
turns it off.

The product is registered as the custom op `points::int8_gemv` so that torch.compile keeps it as one opaque
call (no graph break) in the compiled decode step.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from points.kernels import cpu_build
from points.kernels.int8_args import check_int8_args

SOURCE = Path(__file__).with_name("int8_gemv.cpp")


def _setup(lib: ctypes.CDLL) -> None:
    fn = lib.points_int8_gemv
    fn.argtypes = ([ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 3)
    fn.restype = ctypes.c_int


_library = cpu_build.Library(SOURCE, _setup)


available = _library.available  # () -> bool: built (or found in the cache) and loaded
reason = _library.reason  # () -> why it is not available (None when it is)


DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _run(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"points::int8_gemv is not available: {reason()}")
    n, k = weight.shape
    # every tensor whose address goes to C is bound to a name first: a temporary from .contiguous() or .to()
    # would be freed as soon as its data_ptr() returned, before the call reads it
    x2, weight, scale = x.reshape(-1, k).contiguous(), weight.contiguous(), scale.contiguous()
    if bias is not None:
        bias = bias.to(scale.dtype).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    lib.points_int8_gemv(x2.data_ptr(), DTYPE_CODES[x.dtype], weight.data_ptr(), scale.data_ptr(),
                         None if bias is None else bias.data_ptr(), DTYPE_CODES[scale.dtype],
                         y.data_ptr(), DTYPE_CODES[y.dtype], x2.shape[0], n, k)
    return y.reshape(*x.shape[:-1], n)


cpu_build.cpu_op("int8_gemv", "(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor", _run,
                  lambda x, weight, scale, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (float32 / bfloat16 / float16, CPU) @ (weight [N, K] int8 * scale [N])^T + bias -> [..., N]
    in x's dtype: float32 accumulation, scale and bias applied in float32, one rounding to x's dtype.
    Under torch.compile it is the custom op `points::int8_gemv`; in eager the library is called directly
    (the op's dispatch costs about 3 us a call more)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"int8_gemv: CPU tensors expected, got x on {x.device}, weight on {weight.device}")
    check_int8_args("int8_gemv", x, weight, scale, bias)
    if torch.compiler.is_compiling():
        return torch.ops.points.int8_gemv(x, weight, scale, bias)
    return _run(x, weight, scale, bias)
