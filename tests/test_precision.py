"""bf16 / fp16 against the fp32 transformers reference: the gap is measured and held to a bound.

Bounds (docs/parity.md): on the tiny model (logits up to ~3.7) max |error| <= 0.1 in bf16 and <= 0.015
in fp16, and never more than twice the gap of transformers' own model cast to the same dtype.
"""

import copy

import pytest
import torch

import points
from conftest import DEVICES

BOUNDS = {torch.bfloat16: 0.1, torch.float16: 0.015}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision_gap(official_dir, ref_decoder, dtype, device):
    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    expected = ref_decoder(tokens).logits
    model = points.load_decoder(official_dir, dtype=dtype, device=device)
    got = model(tokens.to(device)).cpu()
    assert got.dtype == torch.float32
    ours = (got - expected).abs().max().item()
    theirs = (copy.deepcopy(ref_decoder).to(device=device, dtype=dtype)(tokens.to(device)).logits.float().cpu()
              - expected).abs().max().item()
    print(f"\n{dtype} on {device}: max |logit error| ours {ours:.4g}, transformers' own {theirs:.4g}, "
          f"max |logit| {expected.abs().max().item():.3g}")
    assert ours <= BOUNDS[dtype]
    assert ours <= 2 * theirs
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_fp32_on_device(official_dir, ref_decoder, device):
    tokens = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(1))
    model = points.load_decoder(official_dir, device=device)
    torch.testing.assert_close(model(tokens.to(device)).cpu(), ref_decoder(tokens).logits)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_rmsnorm_in_bfloat16_equals_transformers(official_dir, ref_decoder, device):
    """A bf16 model's RMSNorm equals transformers' Qwen2RMSNorm (float32 statistics, one rounding, then the
    weight) on the same bf16 input, bit for bit; computing it in bf16 would not (checked on this input)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    model = points.load_decoder(official_dir, dtype=torch.bfloat16, device=device)
    norm = model.layers[0].attn_norm
    theirs = Qwen2RMSNorm(norm.weight.shape[0], eps=norm.eps).to(device=device, dtype=torch.bfloat16)
    theirs.weight.copy_(torch.randn_like(theirs.weight))
    norm.weight.copy_(theirs.weight)
    x = torch.randn(64, norm.weight.shape[0], generator=torch.Generator().manual_seed(3)) * 10
    x = x.to(device, torch.bfloat16)
    expected = theirs(x)
    assert torch.equal(norm(x), expected)
    in_bf16 = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    assert not torch.equal(in_bf16, expected)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_rotary_in_bfloat16_is_applied_in_float32(official_dir, device, monkeypatch):
    """In a bf16 decoder at positions near 16384, the q and k that reach attention are the rotation of the
    projections computed in float64 from the float32 tables, rounded once to bf16 (>= 99.9% of elements
    equal, the rest one rounding away); transformers' way (tables rounded to bf16 first) agrees far less
    often on the same tensors."""
    import points.model.decoder as decoder_module
    from points.model.rope import inv_freq, rotary_tables
    from points.model.attention import AttentionMeta

    model = points.load_decoder(official_dir, dtype=torch.bfloat16, device=device)
    attn = model.layers[1].attn
    seen = {}
    attn.qkv.register_forward_hook(lambda m, i, out: seen.setdefault("qkv", out))
    real = decoder_module.causal_attention

    def capture(q, k, v, meta, layer):
        if layer == attn.layer:
            seen["q"], seen["k"] = q, k
        return real(q, k, v, meta, layer)

    monkeypatch.setattr(decoder_module, "causal_attention", capture)
    T = 32
    positions = torch.arange(16384 - T, 16384, device=device)[None]
    model(torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(4)).to(device),
          meta=AttentionMeta(positions, T, fresh=True))
    q, k, _ = seen["qkv"].unflatten(-1, (-1, attn.head_dim)).split(attn.heads, dim=-2)
    cos, sin = rotary_tables(positions, inv_freq(attn.head_dim, model.cfg.rope_theta, device))
    cos, sin = cos[:, :, None], sin[:, :, None]

    def rotate(x, cos, sin, dtype):
        x, cos, sin = x.to(dtype), cos.to(dtype), sin.to(dtype)
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    for got, pre in ((seen["q"], q), (seen["k"], k)):
        expected = rotate(pre, cos, sin, torch.float64).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert (got == expected).float().mean() >= 0.999
        ulp = (expected.float().abs().clamp_min(1e-30).log2().floor() - 7).exp2()  # one bf16 step at each value
        assert ((got.float() - expected.float()).abs() <= ulp).all()
        assert (rotate(pre, cos, sin, torch.bfloat16) == expected).float().mean() < 0.99
