"""Flash-attention forward over packed variable-length sequences, in Triton.

Contract (flash-attn's `flash_attn_varlen_func`): q [Lq, Hq, D], k/v [Lk, Hkv, D] hold all sequences back to
back; int32 `cu_seqlens_q` / `cu_seqlens_k` [n + 1] give each sequence's bounds; sequence i's queries attend
only to sequence i's keys. Causal masking is aligned at the end (flash-attn's convention): query r of a
sequence with Nq queries and Nk keys sees keys c <= r + Nk - Nq, so a cached prefill (keys = past + new)
works as well as a plain one. Grouped-query attention without repeating K/V: query head h reads KV head
h // (Hq / Hkv). Any head dim (80 for the vision encoder is padded to a block of 128 and masked on load).
fp16 / bf16 (and fp32) inputs; scores, the online softmax and the accumulator in fp32.

Importing this module imports Triton; `points.runtime.attention` imports it only when the Triton path is chosen.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


# Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw bits (seen with triton 3.9); there the
# operands are upcast to fp32 first. bf16 x bf16 products are exact in fp32, so only the summation order moves.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load(ptrs, a_ok, b_ok, A: tl.constexpr, B: tl.constexpr, UPCAST: tl.constexpr):
    """ptrs [X, Y]; the masks a_ok (broadcast over Y) and b_ok (over X) apply only where A / B say so: the
    loads of whole blocks carry no mask at all."""
    if A and B:
        x = tl.load(ptrs, mask=a_ok & b_ok, other=0.0)
    elif A:
        x = tl.load(ptrs, mask=a_ok, other=0.0)
    elif B:
        x = tl.load(ptrs, mask=b_ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile(acc_a, acc_b, l_i, m_i, q_a, q_b, k_ptr, v_ptr, sk_l, sv_l, n_k, rows, shift, qk_scale, lo, hi,
          SPLIT: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr,
          HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) of one query tile. MASKED: the blocks may hold keys past the sequence's end or
    (CAUSAL) above the diagonal; otherwise every key of every block is visible to every row of the tile."""
    da = tl.arange(0, D_A)
    db = D_A + tl.arange(0, D_B)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        kt_a = _load(k_ptr + cols[None, :] * sk_l + da[:, None], col_ok[None, :], (da < HEAD_DIM)[:, None],
                     MASKED, MASK_A, UPCAST)  # [D_A, BLOCK_N]
        s = tl.dot(q_a, kt_a, input_precision="ieee")
        if SPLIT:
            kt_b = _load(k_ptr + cols[None, :] * sk_l + db[:, None], col_ok[None, :], (db < HEAD_DIM)[:, None],
                         MASKED, MASK_B, UPCAST)
            s += tl.dot(q_b, kt_b, input_precision="ieee")
        s = s * qk_scale  # [BLOCK_M, BLOCK_N], fp32, base-2 units
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays zero
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a = _load(v_ptr + cols[:, None] * sv_l + da[None, :], col_ok[:, None], (da < HEAD_DIM)[None, :],
                    MASKED, MASK_A, False)
        p_in = p.to(v_a.dtype)  # P is rounded to the input dtype before P @ V, as in flash-attention
        if UPCAST:
            p_in, v_a = p_in.to(tl.float32), v_a.to(tl.float32)
        acc_a = acc_a * alpha[:, None] + tl.dot(p_in, v_a, input_precision="ieee")
        if SPLIT:
            v_b = _load(v_ptr + cols[:, None] * sv_l + db[None, :], col_ok[:, None], (db < HEAD_DIM)[None, :],
                        MASKED, MASK_B, UPCAST)
            acc_b = acc_b * alpha[:, None] + tl.dot(p_in, v_b, input_precision="ieee")
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit
def _fwd(Q, K, V, O, cu_q, cu_k, used_k, scale, Q_BUCKET,
         sq_l, sq_h, sk_l, sk_h, sv_l, sv_h, so_l, so_h,
         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, USED_K: tl.constexpr,
         D_A: tl.constexpr, D_B: tl.constexpr, SPLIT: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr,
         PACK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one sequence and one query head (PACK: BLOCK_M (query, head) pairs of
    one KV head's GROUP query heads, so that its K/V tiles are loaded once for all of them). The head dim is covered by D_A
    columns and, when SPLIT, D_B more (80 = 64 + 16: no work spent on padding); MASK_A / MASK_B: the piece
    reaches past HEAD_DIM (loads and stores masked)."""
    m_block, seq = tl.program_id(0), tl.program_id(1)
    q0, k0 = tl.load(cu_q + seq), tl.load(cu_k + seq)
    n_q, n_k = tl.load(cu_q + seq + 1) - q0, tl.load(cu_k + seq + 1) - k0
    if USED_K:  # keys actually used by this sequence (a KV cache's rows are longer than their content)
        n_k = tl.load(used_k + seq)
    slots = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    if PACK:  # the GROUP query heads of one KV head in one tile: slot i is query row i // GROUP, head i % GROUP
        kv_head = tl.program_id(2)
        rows = slots // GROUP
        heads = kv_head * GROUP + slots % GROUP
        q_off = (q0 + rows)[:, None] * sq_l + heads[:, None] * sq_h
        o_off = (q0 + rows)[:, None] * so_l + heads[:, None] * so_h
        first, last = (m_block * BLOCK_M) // GROUP, (m_block * BLOCK_M + BLOCK_M - 1) // GROUP
    else:
        kv_head = tl.program_id(2) // GROUP
        rows = slots
        q_off = (q0 + rows)[:, None] * sq_l + tl.program_id(2) * sq_h
        o_off = (q0 + rows)[:, None] * so_l + tl.program_id(2) * so_h
        first, last = m_block * BLOCK_M, m_block * BLOCK_M + BLOCK_M - 1
    if first >= n_q:
        return
    row_ok = rows < n_q
    da = tl.arange(0, D_A)
    db = D_A + tl.arange(0, D_B)
    q_ptr = Q + q_off
    q_a = tl.load(q_ptr + da[None, :], mask=row_ok[:, None] & (da < HEAD_DIM)[None, :], other=0.0)
    q_b = tl.zeros([BLOCK_M, D_B], q_a.dtype)
    if SPLIT:
        q_b = tl.load(q_ptr + db[None, :], mask=row_ok[:, None] & (db < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        q_a, q_b = q_a.to(tl.float32), q_b.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, D_A], tl.float32)
    acc_b = tl.zeros([BLOCK_M, D_B], tl.float32)
    qk_scale = scale * 1.4426950408889634
    k_ptr = K + k0 * sk_l + kv_head * sk_h
    v_ptr = V + k0 * sv_l + kv_head * sv_h
    shift = n_k - n_q  # causal: query r sees keys <= r + shift
    full = (n_k // BLOCK_N) * BLOCK_N  # blocks wholly inside the sequence
    hi = n_k
    if CAUSAL:
        # blocks every row of this tile sees in full, then the diagonal blocks; nothing above them
        full = tl.minimum(full, tl.maximum((first + shift + 1) // BLOCK_N, 0) * BLOCK_N)
        hi = tl.minimum(n_k, last + 1 + shift)
    acc_a, acc_b, l_i, m_i = _tile(acc_a, acc_b, l_i, m_i, q_a, q_b, k_ptr, v_ptr, sk_l, sv_l, n_k, rows, shift,
                                   qk_scale, 0, full, SPLIT, D_A, D_B, MASK_A, MASK_B, HEAD_DIM, False, CAUSAL,
                                   UPCAST, BLOCK_N)
    acc_a, acc_b, l_i, m_i = _tile(acc_a, acc_b, l_i, m_i, q_a, q_b, k_ptr, v_ptr, sk_l, sv_l, n_k, rows, shift,
                                   qk_scale, full, hi, SPLIT, D_A, D_B, MASK_A, MASK_B, HEAD_DIM, True, CAUSAL,
                                   UPCAST, BLOCK_N)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    o_ptr = O + o_off
    tl.store(o_ptr + da[None, :], (acc_a / l_i[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (da < HEAD_DIM)[None, :])
    if SPLIT:
        tl.store(o_ptr + db[None, :], (acc_b / l_i[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (db < HEAD_DIM)[None, :])


def flash_attn_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor,
                     causal: bool = True, **tiles) -> torch.Tensor:
    """Prefill against a KV cache without copying it: q [B, T, Hq, D] (rows right-padded to T), one layer's
    k/v cache [B, Hkv, max_len, D], used [B] = keys each row holds after this write (its position + T).
    -> [B, T, Hq, D]. The cache is read in place through a strided view whose sequence b starts at slot
    b * Hkv * max_len (in units of one head vector). `tiles`: as flash_attn_varlen's."""
    B, T, H, D = q.shape
    _, Hkv, max_len, _ = k_cache.shape
    if k_cache.stride() != (Hkv * max_len * D, max_len * D, D, 1) or v_cache.stride() != k_cache.stride():
        raise ValueError("flash_attn_cache: the caches must be contiguous [B, Hkv, max_len, D]")
    rows = (B - 1) * Hkv * max_len + max_len  # the last row's last head ends exactly at the storage end
    k = k_cache.as_strided((rows, Hkv, D), (D, max_len * D, 1))
    v = v_cache.as_strided((rows, Hkv, D), (D, max_len * D, 1))
    dev = q.device
    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32) * T
    cu_k = torch.arange(B + 1, device=dev, dtype=torch.int32) * (Hkv * max_len)
    out = flash_attn_varlen(q.reshape(B * T, H, D), k, v, cu_q, cu_k, T, causal=causal,
                            seqused_k=used.to(torch.int32), **tiles)
    return out.view(B, T, H, D)


def head_pieces(head_dim: int, split: bool = True) -> tuple[int, int]:
    """The head dim as two power-of-two widths (the second 0 when one suffices), each >= 16 (tl.dot's least):
    80 -> (64, 16), 128 -> (128, 0), 100 -> (64, 64) with the last 28 masked. split=False: one padded piece."""
    one = max(16, triton.next_power_of_2(head_dim))
    if not split or one == head_dim or head_dim <= 16:
        return one, 0
    first = one // 2
    return first, max(16, triton.next_power_of_2(head_dim - first))


# Tile shapes, warps and pipeline stages the autotuner measures on the first call of each key (head dim,
# causal, grouping, query-length bucket). Chosen by tools/tune_attention.py on an H200 (bf16, 2026-11-27): each
# is the best or within 5% of it somewhere; 128 x 64 with 4 warps led on every vision shape (head dim 80),
# the 8-warp ones and 64 x 128 on the causal ones (head dim 128). The four others tried were never best.
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
           for m, n, w, st in [(128, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4),
                               (128, 128, 8, 3)]]


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "PACK", "USED_K", "D_A", "SPLIT", "Q_BUCKET"]
try:
    _fwd_tuned = triton.autotune(CONFIGS, key=_KEY, do_bench=_quick_bench)(_fwd)
except TypeError:  # a Triton without the do_bench argument
    _fwd_tuned = triton.autotune(CONFIGS, key=_KEY, warmup=5, rep=20)(_fwd)


def q_bucket(max_seqlen_q: int) -> int:
    """Autotuning key for the query length: a power of four, so a handful of tunings cover every length."""
    b = 16
    while b < max_seqlen_q:
        b *= 4
    return b


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool = False,
                      scale: float | None = None, out: torch.Tensor | None = None,
                      seqused_k: torch.Tensor | None = None, *, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int = 4, num_stages: int = 2,
                      split: bool = True, pack_gqa: bool | None = None) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] (last dim contiguous), int32 cu_seqlens [n + 1] -> [Lq, Hq, D]
    (written into `out` when given). Scale defaults to 1/sqrt(D). `seqused_k` (int32 [n], optional): sequence
    i uses only its first seqused_k[i] keys (flash-attn's argument of that name).

    Tiles: autotuned over CONFIGS on a GPU; block_m / block_n (with num_warps, num_stages) fix them instead
    (tests, tools/tune_attention.py); Triton's interpreter uses 64 x 64 unless told. split=False covers the
    head dim with one padded power-of-two piece instead of two exact ones (for measuring the difference).
    pack_gqa (default: whenever query heads share KV heads): a tile holds (query, head) pairs of one KV head's
    query heads, which then share every K/V load."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"flash_attn_varlen: expected q [Lq, Hq, D] and k, v [Lk, Hkv, D], got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"flash_attn_varlen: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32 or cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("flash_attn_varlen: cu_seqlens_q and cu_seqlens_k must be int32 tensors of the same length")
    if seqused_k is not None and (seqused_k.dtype != torch.int32 or seqused_k.shape[0] != cu_seqlens_k.shape[0] - 1):
        raise ValueError("flash_attn_varlen: seqused_k must be an int32 tensor with one entry per sequence")
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        raise ValueError("flash_attn_varlen: the head dimension of q, k, v must be contiguous")
    L, H, D = q.shape
    out = torch.empty_like(q) if out is None else out
    n = cu_seqlens_q.shape[0] - 1
    if n == 0 or L == 0:
        return out
    d_a, d_b = head_pieces(D, split)
    group = H // k.shape[1]
    pack = group > 1 if pack_gqa is None else pack_gqa and group > 1
    rows, programs = (max_seqlen_q * group, k.shape[1]) if pack else (max_seqlen_q, H)
    # without a second piece D_B is a placeholder width (never loaded or stored)
    args = (q, k, v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k if seqused_k is None else seqused_k,
            scale if scale is not None else 1 / math.sqrt(D), q_bucket(max_seqlen_q),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    consts = dict(GROUP=group, PACK=pack, HEAD_DIM=D, CAUSAL=causal, UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
                  USED_K=seqused_k is not None, D_A=d_a, D_B=d_b or 16, SPLIT=d_b > 0, MASK_A=d_a > D,
                  MASK_B=d_a + d_b > D)
    if block_m is None and INTERPRETED:
        block_m, block_n = 64, 64
    if block_m is not None:
        grid = (triton.cdiv(max(rows, 1), block_m), n, programs)
        _fwd[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=block_n or block_m, num_warps=num_warps,
                   num_stages=num_stages)
    else:
        _fwd_tuned[lambda meta: (triton.cdiv(max(rows, 1), meta["BLOCK_M"]), n, programs)](*args, **consts)
    return out
