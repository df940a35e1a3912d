"""The int4 weight-only product for a few rows, in Triton (CUDA; tested in Triton's CPU interpreter).

    from points.kernels.triton_int4 import int4_mm
    y = int4_mm(x, packed, scale, offset, bias, group_size=128)   # points.io.quantized's int4 format

y = x @ W^T + bias, W[n, k] = q[n, k] * s[n, k // G] + o[n, k // G] (o = -8 s without offsets) computed in
float32 and rounded to x's dtype, as the CPU's many-row product and `dequantize_int4(..., x.dtype)` give it;
products and sums in float32 (float32 inputs in the exact "ieee" precision), the bias added to the float32
sums, one rounding. Each program owns BLOCK_N output channels and reads their packed rows once, BLOCK_K codes
at a time (each byte read for its two codes, the second time from cache), dequantized in registers; the rows
of x (decode: 1 to a few) are one padded BLOCK_M tile. K is split over programs where N alone leaves the GPU
idle, as in triton_int8 (float32 partial sums added in a fixed order by its second kernel, shared).

Registered as the custom op `points::int4_mm` (one opaque call in a compiled step and its CUDA graph).
Importing this module imports Triton; `points.runtime.quantize` imports it only when the kernel is chosen.
Not yet run on a GPU (tools/gpu_check.sh times it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from points.kernels.cpu_int4 import check_int4_args
from points.kernels.triton_int8 import BLOCK_M, INTERPRETED, _finish_kernel, _rounded, split_k_for


@triton.jit
def _int4_mm_kernel(x_ptr, w_ptr, s_ptr, o_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, k_per_split, sxm, swn, groups, sym,
                    G: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                    UPCAST: tl.constexpr, IEEE: tl.constexpr, BY_BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lo = pid_k * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    for k0 in range(lo, hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < hi
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        both = n_ok[None, :] & k_ok[:, None]
        byte = tl.load(w_ptr + rn[None, :] * swn + (rk // 2)[:, None], mask=both, other=0).to(tl.int32)
        q = ((byte >> ((rk % 2) * 4)[:, None]) & 0x0F).to(tl.float32)  # [BLOCK_K, BLOCK_N]
        g = rn[None, :] * groups + (rk // G)[:, None]
        s = tl.load(s_ptr + g, mask=both, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = q * s + tl.load(o_ptr + g, mask=both, other=0.0).to(tl.float32)
        else:
            w = (q - 8.0) * s
        if UPCAST:  # (the interpreter: the weight rounded to x's dtype as on a GPU, multiplied in float32)
            w = _rounded(w, x_ptr.dtype.element_ty, BY_BITS).to(tl.float32)
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], _rounded(acc, y_ptr.dtype.element_ty, BY_BITS), mask=ok)


def _launch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
            bias: torch.Tensor | None, group_size: int, block_n: int | None = None, block_k: int | None = None,
            split_k: int | None = None) -> torch.Tensor:
    block_n = block_n or (128 if INTERPRETED else 64)
    block_k = block_k or 128
    n, k = packed.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    packed, scale = packed.contiguous(), scale.contiguous()
    offset = None if offset is None else offset.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    split = split_k or split_k_for(n, k, block_n, block_k, x.device)
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    by_bits = INTERPRETED and x.dtype == torch.bfloat16
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, BLOCK_M))
    _int4_mm_kernel[grid](x2, packed, scale, scale if offset is None else offset, scale if bias is None else bias, y,
                          ws, m, n, k, k_per, x2.stride(0), packed.stride(0), scale.shape[1], y.stride(0),
                          G=group_size, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
                          UPCAST=INTERPRETED and x.dtype != torch.float32, IEEE=x.dtype == torch.float32,
                          BY_BITS=by_bits, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    if split > 1:
        block = 1024
        _finish_kernel[(triton.cdiv(m * n, block),)](ws, scale, scale if bias is None else bias, y, m, n,
                                                     y.stride(0), HAS_SCALE=False, HAS_BIAS=bias is not None,
                                                     SPLIT_K=split, BY_BITS=by_bits, BLOCK=block)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("points::int4_mm", mutates_args=())
def _int4_mm_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    return _launch(x, packed, scale, offset, bias, group_size)


@_int4_mm_op.register_fake
def _(x, packed, scale, offset, bias, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, *, group_size: int = 128, block_n: int | None = None,
            block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] (float32 / bfloat16 / float16) @ W^T + bias -> [..., N] in x's dtype (see the module).
    block_n, block_k, split_k: the tiles and the split of K, for tests and tuning; under torch.compile the
    custom op `points::int4_mm` runs with the defaults."""
    if torch.compiler.is_compiling():
        return torch.ops.points.int4_mm(x, packed, scale, offset, bias, group_size)
    check_int4_args("int4_mm", x, packed, scale, offset, bias, group_size)
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"int4_mm: x, packed and scale on one device, got {x.device}, {packed.device}, {scale.device}")
    return _launch(x, packed, scale, offset, bias, group_size, block_n, block_k, split_k)
