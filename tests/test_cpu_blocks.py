"""Many-row products in blocks (points.runtime.cpu_blocks): the numbers of a float32 product of the widened
weight whatever the block, the choice forced or by rule, and the layers that take it."""

import pytest
import torch
import torch.nn.functional as F

from points.runtime import cpu_blocks
from points.runtime.cpu_linear import GemvLinear, gemv_linear


@pytest.mark.parametrize("out_features", [7, 300])
def test_blocked_product_is_the_float32_product_rounded_once(monkeypatch, out_features):
    monkeypatch.setattr(cpu_blocks, "BLOCK_BYTES", 64 * 4 * 20)  # 20 rows a block: several blocks and a rest
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, 64, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(out_features, generator=g).to(torch.bfloat16)
    y = cpu_blocks.blocked_linear(x, lambda a, z, dt: w[a:z].to(dt), out_features, b, torch.float32)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, out_features)
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16))


def test_the_choice_is_forced_by_the_environment_or_a_rule(monkeypatch):
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {})
    monkeypatch.setenv("POINTS_BLOCKS", "float32")
    assert cpu_blocks.compute_dtype(torch.bfloat16) == torch.float32
    assert cpu_blocks.compute_dtype(torch.float32) == torch.float32
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {})
    monkeypatch.setenv("POINTS_BLOCKS", "native")
    assert cpu_blocks.compute_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {})
    monkeypatch.delenv("POINTS_BLOCKS")
    monkeypatch.setattr(cpu_blocks.cpu_build, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert cpu_blocks.compute_dtype(torch.bfloat16) == torch.bfloat16  # the rule: no timing
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {})
    monkeypatch.setattr(cpu_blocks.cpu_build, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(cpu_blocks, "measure", lambda dtype: 1.1)  # faster, but within the margin
    assert cpu_blocks.compute_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {})
    monkeypatch.setattr(cpu_blocks, "measure", lambda dtype: 3.0)
    assert cpu_blocks.compute_dtype(torch.bfloat16) == torch.float32


def test_measure_times_both_products():
    assert cpu_blocks.measure(torch.bfloat16, rows=8, shape=(64, 64), rounds=2) > 0


@torch.no_grad()
def test_gemv_linear_takes_the_blocks_for_many_bfloat16_rows(monkeypatch):
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {torch.bfloat16: torch.float32})
    linear = torch.nn.Linear(48, 40).to(torch.bfloat16)
    layer = gemv_linear(linear)
    assert type(layer) is GemvLinear
    x = torch.randn(20, 48).to(torch.bfloat16)
    want = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(layer(x), want)
    monkeypatch.setattr(cpu_blocks, "_CHOSEN", {torch.bfloat16: torch.bfloat16})
    assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
