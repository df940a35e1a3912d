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
def test_norms_and_rotary_run_in_float32(official_dir, device):
    """RMSNorm of a bf16 input equals the float32 computation rounded once."""
    model = points.load_decoder(official_dir, dtype=torch.bfloat16, device=device)
    x = torch.randn(3, 224, device=device).to(torch.bfloat16) * 10
    norm = model.layers[0].attn_norm
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)
