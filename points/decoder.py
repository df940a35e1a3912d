"""The language model: Qwen2.5 math (the released checkpoint calls it CustomLlama).

    tokens [B, T] -> embed [B, T, H]
      -> n_layers x ( x + Attention(RMSNorm(x)),  x + SwiGLU(RMSNorm(x)) )
      -> RMSNorm -> lm_head -> logits [B, T, vocab] in float32

Attention: grouped-query (n_heads query heads share n_kv_heads K/V heads in consecutive groups), q/k/v
with bias, output projection without, 1-D RoPE in float32. Positions are 0..L-1 over the whole sequence
(image tokens included); with a KV cache each row continues from its own length.

Fused projections (our layout): `attn.qkv` rows are [q; k; v], `mlp.gate_up` rows are [gate; up].
"""

import torch
import torch.nn.functional as F
from torch import nn

from points.attention import causal_attention, triton_prefill, use_triton
from points.cache import KVCache
from points.config import DecoderConfig
from points.rope import apply_rotary, inv_freq, rotary_tables


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.out_bias)
        self.split = (q_dim, kv_dim, kv_dim)

    def forward(self, x, cos, sin, q_pos, kv_len: int, cache: KVCache | None, layer: int, fast: bool, fresh: bool):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim), cos, sin)  # [B, T, Hq, D]
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # [B, T, Hkv, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if fast:  # prefill on the Triton kernel
            if cache is not None:
                cache.write(layer, q_pos, k, v, kv_len)
            return self.out(triton_prefill(q, k, v, q_pos, cache, layer).reshape(B, T, -1))
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        else:
            k, v = cache.write(layer, q_pos, k, v, kv_len)  # [B, Hkv, kv_len, D]
        y = causal_attention(q.transpose(1, 2), k, v, q_pos, fresh)  # [B, Hq, T, D]
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=cfg.ffn_up_bias)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.ffn_down_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, q_pos, kv_len, cache, layer, fast, fresh):
        x = x + self.attn(self.attn_norm(x), cos, sin, q_pos, kv_len, cache, layer, fast, fresh)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_backend = "auto"  # prefill attention: "auto" | "sdpa" | "triton" (points.attention.use_triton)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache on this model's device and dtype; max_len defaults to the context length.

        After `compile()`, the step's shapes are static, so the cache is shaped to keep the number of graphs
        small: max_len is rounded up to a power of two (>= 256), keys are read in blocks of 256 slots, and
        its tensors are marked as static addresses (CUDA graphs write them in place instead of copying)."""
        w = self.embed.weight
        max_len = max_len or self.cfg.max_seq_len
        block = 1
        if self._compiled_step is not None:
            block = 256
            max_len = max(max_len, min(1 << max(max_len - 1, block - 1).bit_length(), self.cfg.max_seq_len))
        cache = KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, self.cfg.head_dim, max_len,
                        dtype=w.dtype, device=w.device, block=block)
        if self._compiled_step is not None:
            for t in (cache.k, cache.v):
                torch._dynamo.mark_static_address(t, guard=False)
        return cache

    def forward(self, tokens: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                cache: KVCache | None = None, n_new: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in float32.

        tokens [B, T] (or embeds [B, T, H], e.g. with image features spliced in).
        cache: continue each row from cache.pos and store the new K/V; without a cache the sequence
            starts at position 0 and nothing is kept.
        n_new [B]: real tokens per row when rows are right-padded to T (cache only; default all T).
        last [B]: return only the logits at index last[b] of each row -> [B, vocab]; default [B, T, vocab].
        """
        x = self.embed(tokens) if embeds is None else embeds
        B, T, _ = x.shape
        if cache is None:
            logits = self.run(x, torch.arange(T, device=x.device).expand(B, T), None, T, last, fresh=True)
        else:
            logits = self.run(x, cache.positions(T), cache, cache.visible(T), last, fresh=cache.span == 0)
            cache.advance(T, n_new)
        return logits

    def run(self, x: torch.Tensor, q_pos: torch.Tensor, cache: KVCache | None, kv_len: int,
            last: torch.Tensor | None, fresh: bool = False) -> torch.Tensor:
        """The layers on embeddings x [B, T, H] at positions q_pos [B, T], reading the first kv_len cache
        slots (fresh: every row starts at position 0, so plain causal attention holds); touches no host
        state (the compile target)."""
        B, T, _ = x.shape
        cos, sin = rotary_tables(q_pos, inv_freq(self.cfg.head_dim, self.cfg.rope_theta, x.device),
                                 self.cfg.rope_scale)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D]: broadcast over heads
        fast = T > 1 and use_triton(self.attn_backend, x.device)  # one-token steps stay on SDPA
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, q_pos, kv_len, cache, i, fast, fresh)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last]  # [B, H]
        return self.lm_head(self.norm(x)).float()

    _compiled_step = None

    def _step(self, tokens: torch.Tensor, q_pos: torch.Tensor, cache: KVCache, kv_len: int, pick):
        logits = self.run(self.embed(tokens), q_pos, cache, kv_len, None)[:, -1]
        return logits if pick is None else pick(logits, tokens)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, pick=None) -> torch.Tensor:
        """One token per row: tokens [B, 1] -> logits [B, vocab] float32, or with `pick` (a
        points.sampling.Picker) the next token ids [B], chosen in the same graph. Runs the compiled step
        after `compile()`."""
        step = self._step
        if self._compiled_step is not None:
            torch.compiler.cudagraph_mark_step_begin()  # earlier steps' outputs may be overwritten
            if pick is not None:
                pick.mark_static()
            step = self._compiled_step
        out = step(tokens, cache.positions(1), cache, cache.visible(1), pick)
        cache.advance(1)
        return out

    def compile(self, mode: str | None = None, backend="inductor") -> "Decoder":
        """Compile the one-token decode step, with the next-token choice when one is given, into one graph
        (static shapes: one graph per cache length and key-block count, see `new_cache`). mode defaults to
        "reduce-overhead" (CUDA graphs) on CUDA."""
        if mode is None and self.embed.weight.device.type == "cuda":
            mode = "reduce-overhead"
        self._compiled_step = torch.compile(self._step, mode=mode, backend=backend, fullgraph=True, dynamic=False)
        return self
