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
def _fwd(Q, K, V, O, cu_q, cu_k, used_k, scale,
         sq_l, sq_h, sk_l, sk_h, sv_l, sv_h, so_l, so_h,
         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, USED_K: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    m_block, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, k0 = tl.load(cu_q + seq), tl.load(cu_k + seq)
    n_q, n_k = tl.load(cu_q + seq + 1) - q0, tl.load(cu_k + seq + 1) - k0
    if USED_K:  # keys actually used by this sequence (a KV cache's rows are longer than their content)
        n_k = tl.load(used_k + seq)
    if m_block * BLOCK_M >= n_q:
        return
    kv_head = head // GROUP
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < n_q, dims < HEAD_DIM
    q = tl.load(Q + (q0 + rows)[:, None] * sq_l + head * sq_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    shift = n_k - n_q  # causal: query r sees keys <= r + shift
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, (m_block + 1) * BLOCK_M + shift)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        kt = tl.load(K + (k0 + cols)[None, :] * sk_l + kv_head * sk_h + dims[:, None],
                     mask=col_ok[None, :] & dim_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N] fp32
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + shift)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (k0 + cols)[:, None] * sv_l + kv_head * sv_h + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        p = p.to(v.dtype)  # P is rounded to the input dtype before P @ V, as in flash-attention
        if UPCAST:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + (q0 + rows)[:, None] * so_l + head * so_h + dims[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def flash_attn_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, used: torch.Tensor,
                     causal: bool = True) -> torch.Tensor:
    """Prefill against a KV cache without copying it: q [B, T, Hq, D] (rows right-padded to T), one layer's
    k/v cache [B, Hkv, max_len, D], used [B] = keys each row holds after this write (its position + T).
    -> [B, T, Hq, D]. The cache is read in place through a strided view whose sequence b starts at slot
    b * Hkv * max_len (in units of one head vector)."""
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
                            seqused_k=used.to(torch.int32))
    return out.view(B, T, H, D)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool = False,
                      scale: float | None = None, block_m: int = 64, block_n: int = 64,
                      out: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] (last dim contiguous), int32 cu_seqlens [n + 1] -> [Lq, Hq, D]
    (written into `out` when given). Scale defaults to 1/sqrt(D). `seqused_k` (int32 [n], optional): sequence
    i uses only its first seqused_k[i] keys (flash-attn's argument of that name)."""
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
    grid = (triton.cdiv(max(max_seqlen_q, 1), block_m), n, H)
    _fwd[grid](q, k, v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k if seqused_k is None else seqused_k, scale if scale is not None else 1 / math.sqrt(D),
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               out.stride(0), out.stride(1),
               GROUP=H // k.shape[1], HEAD_DIM=D, CAUSAL=causal, UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
               USED_K=seqused_k is not None,
               BLOCK_M=block_m, BLOCK_N=block_n,
               BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out
