"""The language model: Qwen2.5 math (the released checkpoint calls it CustomLlama), and Qwen3's.

    tokens [B, T] -> embed [B, T, H]
      -> n_layers x ( x + Attention(RMSNorm(x)),  x + SwiGLU(RMSNorm(x)) )
      -> RMSNorm -> lm_head -> logits [B, T, vocab] in float32

Attention: grouped-query (n_heads query heads share n_kv_heads K/V heads in consecutive groups), q/k/v
with bias, output projection without, 1-D RoPE in float32. Qwen3 (`qk_norm`): no q/k/v bias, an RMSNorm over
each head of q and of k (weights [head_dim]) before the rotary, head_dim given apart from hidden / heads. Positions are 0..L-1 over the whole sequence
(image tokens included); with a KV cache each row continues from its own length. The layers get one
`AttentionMeta` per forward (positions, the cache, how much of it to read, the kernel: points.model.attention)
and pass it through; the modules themselves hold no kernel choice.

Fused projections (our layout): `attn.qkv` rows are [q; k; v]; `mlp.up_gate` rows are [up; gate], as the
released checkpoint stores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from points.model.config import DecoderConfig
from points.model.rope import apply_rotary, inv_freq, rotary_tables
from points.model.attention import AttentionMeta, causal_attention
from points.model.cache import KVCache


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is that formula (pow, mean, add, rsqrt, mul in one call, the same bits), over float32 here
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.layer = layer  # which layer of the cache
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.out_bias)
        self.heads = (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta):
        qkv = self.qkv(x).unflatten(-1, (-1, self.head_dim))  # [B, T, Hq + 2 Hkv, D]
        n_q, n_kv, _ = self.heads
        qk = qkv[:, :, :n_q + n_kv]
        if self.qk_norm:  # (Qwen3) each head normed over its D
            qk = torch.cat([self.q_norm(qk[:, :, :n_q]), self.k_norm(qk[:, :, n_q:])], dim=2)
        qk = apply_rotary(qk, *rope)  # q's and k's heads turned together
        q, k, v = qk[:, :, :n_q], qk[:, :, n_q:], qkv[:, :, n_q + n_kv:]  # [B, T, Hq, D], [B, T, Hkv, D] x 2
        y = causal_attention(q, k, v, meta, self.layer)  # [B, T, Hq, D]
        return self.out(y.flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.up_gate = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=cfg.ffn_up_bias)  # rows [up; gate]
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.ffn_down_bias)

    def forward(self, x):
        up, gate = self.up_gate(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, meta):
        x = x + self.attn(self.attn_norm(x), rope, meta)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tied:  # (POINTS-Reader) the head is the embedding matrix: one Parameter, as transformers ties it
            self.lm_head.weight = self.embed.weight

    def new_cache(self, batch_size: int, max_len: int | None = None, *, block: int = 1) -> KVCache:
        """A cache on this model's device and dtype; max_len defaults to the context length (block: see
        KVCache)."""
        w = self.embed.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, self.cfg.head_dim,
                       max_len or self.cfg.max_seq_len, dtype=w.dtype, device=w.device, block=block)

    def forward(self, tokens: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                meta: AttentionMeta | None = None, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in float32.

        tokens [B, T] (or embeds [B, T, H], e.g. with image features spliced in).
        meta: where these tokens sit and where their K/V go, from `cache.reserve(T)`; without it the
            sequence starts at position 0, nothing is kept and SDPA attends.
        last [B]: return only the logits at index last[b] of each row -> [B, vocab]; [B, K]: at K indices per
            row -> [B, K, vocab]; default [B, T, vocab].
        """
        x = self.embed(tokens) if embeds is None else embeds
        B, T, _ = x.shape
        if meta is None:
            meta = AttentionMeta.no_cache(B, T, x.device)
        cos, sin = rotary_tables(meta.positions, inv_freq(self.cfg.head_dim, self.cfg.rope_theta, x.device),
                                 self.cfg.rope_scale)
        rope = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D]: one table for every head
        for layer in self.layers:
            x = layer(x, rope, meta)
        if last is not None:
            rows = torch.arange(B, device=x.device)
            x = x[rows if last.dim() == 1 else rows[:, None], last]  # [B, H] or [B, K, H]
        return self.lm_head(self.norm(x)).float()
