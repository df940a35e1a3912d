"""Attention dispatch: the one place the decoder (and later the vision encoder) calls into a kernel.

Grouped-query attention is computed without repeating K/V: the `rep` query heads that share one KV head
are folded into the query-length axis, so each KV head meets one [rep * T, D] block of queries.
"""

import torch
import torch.nn.functional as F


def position_mask(q_pos: torch.Tensor, kv_len: int, rep: int) -> torch.Tensor:
    """Boolean mask [B, 1, rep * T, kv_len]: key j is visible to the query at position p iff j <= p.

    q_pos [B, T] holds each query's absolute position (rows may differ). Built once per forward and
    shared by every layer. Cache slots past a row's length are never visible, whatever they hold.
    """
    keys = torch.arange(kv_len, device=q_pos.device)
    mask = keys <= q_pos[..., None]  # [B, T, S]
    return mask[:, None].repeat(1, 1, rep, 1)  # query index r * T + t sees mask[t]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask from `position_mask` -> [B, Hq, T, D].

    Query head h uses KV head h // (Hq / Hkv), as in transformers' repeat_kv. Scale 1/sqrt(D); the fused
    SDPA kernels accumulate the softmax in float32 for every input dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, (Hq // Hkv) * T, D), k, v, attn_mask=mask)
    return out.view(B, Hq, T, D)
