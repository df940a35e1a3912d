"""The int8 weight-only product for a few rows, in Triton (CUDA; tested in Triton's CPU interpreter).

    from points.kernels.triton_int8 import int8_mm
    y = int8_mm(x, weight_int8, scale, bias)     # x [..., K], weight [N, K] int8, scale / bias [N]

y[m, n] = (sum_k x[m, k] * W8[n, k]) * scale[n] + bias[n], rounded once to x's dtype. Each program owns
BLOCK_N output channels and reads their int8 rows once, BLOCK_K columns at a time; the rows of x (decode: 1
to a few) are one padded BLOCK_M tile, so a tile of the product is one `tl.dot` of x [BLOCK_M, BLOCK_K]
against the weights converted in registers to x's dtype (int8 is exact in bf16, fp16 and fp32; products in
fp32, sums in fp32; float32 inputs use the exact "ieee" precision). The scale and bias are applied to the
float32 sums in registers. Where N alone gives too few programs to fill the GPU (the down projection: N =
3,584, K = 18,944 at 7B), K is split over SPLIT_K programs that write float32 partial sums, and a second
kernel adds them in a fixed order (deterministic, no atomics) and applies scale and bias.

Registered as the custom op `points::int8_mm` so that torch.compile keeps it as one opaque call in the
compiled decode step (and its CUDA graph); in eager the launch is called directly. Importing this module
imports Triton; `points.runtime.quantize` imports it only when the kernel is chosen.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from points.kernels.int8_args import check_int8_args

# Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw bits (the flash kernel's note): there
# the operands are upcast to float32 first (products of bf16 values and int8 are exact in float32 anyway);
# and it converts float32 to bf16 by truncating: there the output is rounded on its bits first (`_rounded`).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 16  # the smallest tile tl.dot takes; rows beyond it get programs of their own


@triton.jit
def _rounded(y, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """float32 -> dtype, to nearest even. BY_BITS (the interpreter with a bfloat16 output, whose conversion
    truncates): the rounding done on the bits first, so that the conversion is exact, as on a GPU."""
    if BY_BITS:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _int8_mm_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, k_per_split, sxm, swn, sym,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BY_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
        if UPCAST:
            x = x.to(tl.float32)
        w = w.to(x.dtype)  # [BLOCK_K, BLOCK_N], exact
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out = rm[:, None] * sym + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=ok)
    else:
        y = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, _rounded(y, y_ptr.dtype.element_ty, BY_BITS), mask=ok)


@triton.jit
def _finish_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, M, N, sym, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr, BY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The split-K partial sums [SPLIT_K, M, N] added in order, scaled per output (HAS_SCALE: int8's scale;
    triton_int4 scales inside its sums), biased, rounded once."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < M * N
    m, n = i // N, i % N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + i, mask=ok, other=0.0)
    y = acc
    if HAS_SCALE:
        y = acc * tl.load(s_ptr + n, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * sym + n, _rounded(y, y_ptr.dtype.element_ty, BY_BITS), mask=ok)


def split_k_for(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """How many programs share K: the output tiles times the splits reach two waves of the GPU's
    multiprocessors, each split at least four BLOCK_K steps long, at most 16 (1 on the CPU interpreter). At
    7B on 132 SMs with 64 x 128 tiles: down (N 3,584, K 18,944) 8, q/k/v (4,608 x 3,584) 4, out 4, up/gate 1."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * sms and k // (split * 2) >= 4 * block_k and split < 16:
        split *= 2
    return split


def _launch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            block_n: int | None = None, block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    # the GPU's tiles; the interpreter's cost is per program, so it takes larger ones by default (the tests
    # that check the masks pass small ones)
    block_n = block_n or (256 if INTERPRETED else 64)
    block_k = block_k or (256 if INTERPRETED else 128)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    split = split_k or split_k_for(n, k, block_n, block_k, x.device)
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # each split a whole number of blocks
    split = triton.cdiv(k, k_per)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    b = bias if bias is not None else scale
    by_bits = INTERPRETED and x.dtype == torch.bfloat16
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, BLOCK_M))
    _int8_mm_kernel[grid](x2, weight, scale, b, y, ws, m, n, k, k_per, x2.stride(0), weight.stride(0), y.stride(0),
                          HAS_BIAS=bias is not None, SPLIT=split > 1,
                          UPCAST=INTERPRETED and x.dtype != torch.float32, IEEE=x.dtype == torch.float32,
                          BY_BITS=by_bits, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    if split > 1:
        block = 1024
        _finish_kernel[(triton.cdiv(m * n, block),)](ws, scale, b, y, m, n, y.stride(0), HAS_SCALE=True,
                                                     HAS_BIAS=bias is not None, SPLIT_K=split, BY_BITS=by_bits,
                                                     BLOCK=block)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("points::int8_mm", mutates_args=())
def _int8_mm_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, weight, scale, bias)


@_int8_mm_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
            block_n: int | None = None, block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] (float32 / bfloat16 / float16) @ (weight [N, K] int8 * scale [N])^T + bias -> [..., N] in
    x's dtype: float32 sums, scale and bias applied in float32, one rounding. block_n, block_k, split_k: the
    tiles (None: 64 x 128 on a GPU) and the split of K (None: `split_k_for`), for tests and tuning; under
    torch.compile the custom op `points::int8_mm` runs with the defaults."""
    check_int8_args("int8_mm", x, weight, scale, bias)
    if not (x.device == weight.device == scale.device):
        raise ValueError(f"int8_mm: x, weight and scale on one device, got {x.device}, {weight.device}, {scale.device}")
    if torch.compiler.is_compiling():
        return torch.ops.points.int8_mm(x, weight, scale, bias)
    return _launch(x, weight, scale, bias, block_n, block_k, split_k)
