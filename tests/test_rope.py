"""RoPE tables and rotated q/k against transformers' Qwen2 rotary, at positions up to 16384."""

import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from points.model.rope import apply_rotary, inv_freq, rotary_tables

POSITIONS = torch.tensor([[0, 1, 2, 3, 127, 128, 1000, 4095, 4096, 8191, 12345, 16383, 16384]])


def _reference(ref_decoder):
    return Qwen2RotaryEmbedding(ref_decoder.config)


def test_inv_freq_is_bit_identical(ref_decoder):
    cfg = ref_decoder.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert torch.equal(inv_freq(head_dim, cfg.rope_parameters["rope_theta"]), _reference(ref_decoder).inv_freq)


def test_real_head_dim_and_theta_table():
    """The 7B shapes: head_dim 128, theta 1e6 (the reference builds 1 / theta^(arange(0, 128, 2) / 128))."""
    expected = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    assert torch.equal(inv_freq(128, 1e6), expected)


def test_cos_sin_tables_match(ref_decoder):
    cfg = ref_decoder.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    x = torch.zeros(1, dtype=torch.float32)
    ref_cos, ref_sin = _reference(ref_decoder)(x, POSITIONS)
    cos, sin = rotary_tables(POSITIONS, inv_freq(head_dim, cfg.rope_parameters["rope_theta"]))
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def test_rotated_q_k_match(ref_decoder):
    cfg = ref_decoder.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    T = POSITIONS.shape[1]
    q = torch.randn(1, 14, T, head_dim, generator=g)  # transformers layout [B, H, T, D]
    k = torch.randn(1, 2, T, head_dim, generator=g)
    ref_cos, ref_sin = _reference(ref_decoder)(q, POSITIONS)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    cos, sin = rotary_tables(POSITIONS, inv_freq(head_dim, cfg.rope_parameters["rope_theta"]))
    cos, sin = cos[:, None], sin[:, None]
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k)


def test_low_precision_input_is_rotated_in_float32():
    """bf16 q: the rotation happens in float32 and is rounded once, so it equals rotating the upcast."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 13, 128, generator=g).to(torch.bfloat16)
    cos, sin = rotary_tables(POSITIONS, inv_freq(128, 1e6))
    cos, sin = cos[:, None], sin[:, None]
    out = apply_rotary(q, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rotary(q.float(), cos, sin).to(torch.bfloat16))
