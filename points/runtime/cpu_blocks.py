"""Many-row products (prefills, the vision encoder) from narrow weights on the CPU, a block of weight rows at a time.

    compute = compute_dtype(torch.bfloat16)          # bfloat16 itself, or float32 where that is faster here
    y = blocked_linear(x, rows_of, out_features, bias, compute)

Where a CPU has no native bfloat16 arithmetic (no AVX-512 BF16, no AMX: most laptops and the AVX2 EPYC this
project is measured on), PyTorch's bfloat16 product runs far below its float32 one (9.6 against 60.8 GFLOP/s
for [2048, 896] x [896, 4864] there): so bfloat16 weights, and int4 codes, are widened to float32 one block of
rows at a time (BLOCK_BYTES of float32, in cache; the whole float weight never exists) and multiplied at the
float32 rate, reading half the bytes (a quarter, or an eighth). Where the CPU has it, bfloat16 stays bfloat16
(AMX Xeon: 2.2-2.5 TFLOP/s, several times float32).

The choice is a rule where the measurements agree (avx512_bf16 or amx_bf16 in /proc/cpuinfo: bfloat16), and a
measurement elsewhere, made to survive a busy moment: both products over the same weights, alternated, five
rounds each, medians compared, float32 taken only when it is at least MARGIN faster (otherwise the usual
product stays); once per process and dtype, before any compiled step (the linear plan asks when it is
applied). POINTS_BLOCKS=native|float32 forces one.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from points.kernels import cpu_build

BLOCK_BYTES = 4 << 20  # float32 bytes of weight rows widened at a time
MARGIN = 1.25  # float32 must be this much faster to be chosen
NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")

_CHOSEN: dict = {}  # dtype -> compute dtype, decided once per process


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU many-row product of `dtype` weights computes in: `dtype`, or float32 (see the module)."""
    if dtype == torch.float32:
        return dtype
    if dtype not in _CHOSEN:
        forced = os.environ.get("POINTS_BLOCKS")
        if forced in ("native", "float32"):
            _CHOSEN[dtype] = dtype if forced == "native" else torch.float32
        elif any(f in cpu_build.cpu_flags() for f in NATIVE_FLAGS) or torch.compiler.is_compiling():
            _CHOSEN[dtype] = dtype
        else:
            _CHOSEN[dtype] = torch.float32 if measure(dtype) >= MARGIN else dtype
    return _CHOSEN[dtype]


def measure(dtype: torch.dtype, rows: int = 128, shape: tuple[int, int] = (2048, 2048), rounds: int = 5) -> float:
    """How many times faster the float32 blocks multiply `rows` rows by a `shape` weight in `dtype` than
    PyTorch's product in `dtype`: medians of `rounds` alternated timings each."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g).to(dtype)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    ways = {"native": lambda: F.linear(x, w),
            "float32": lambda: blocked_linear(x, lambda a, b, dt: w[a:b].to(dt), shape[0], None, torch.float32)}
    with torch.inference_mode():
        median = cpu_build.alternated_medians(ways, rounds)
    return median["native"] / median["float32"]


def blocked_linear(x: torch.Tensor, rows_of: Callable[[int, int, torch.dtype], torch.Tensor], out_features: int,
                   bias: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor:
    """x [..., in] @ W^T + bias -> [..., out] in x's dtype, W's rows [a, b) given by `rows_of(a, b, compute)`
    one block at a time, the products in `compute`."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(compute)
    step = max(16, BLOCK_BYTES // max(1, k * 4))
    y = torch.empty(x2.shape[0], out_features, dtype=compute)
    for a in range(0, out_features, step):
        b = min(out_features, a + step)
        y[:, a:b] = F.linear(x2, rows_of(a, b, compute))
    if bias is not None:
        y += bias.to(compute)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
