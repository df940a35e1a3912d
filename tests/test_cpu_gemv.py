"""The CPU float product (kernels/float_gemv.cpp through points.kernels.cpu_gemv) against float64 products,
on every instruction set this CPU has, bf16 and fp32, odd sizes and 1 to 9 rows; inside torch.compile as one op."""

import pytest
import torch
import torch.nn.functional as F

from points.kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"the CPU kernel: {cpu_gemv.reason()}")
ISAS = cpu_gemv.ISAS[:cpu_gemv.ISAS.index(cpu_gemv.isa()) + 1] if cpu_gemv.available() else ()


def _bound(x, w, bias, want, dtype):
    """|error| allowed per output against the float64 product: float32 sums ((K + 1) * 2^-24 of
    sum |x w| + |bias|, loose), plus half a unit in the last place of the output in its dtype."""
    mag = x.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
    return mag * (x.shape[-1] + 1) * 2.0 ** -24 + want.abs() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24)


@pytest.mark.parametrize("which", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, n, k", [(1, 37, 200), (2, 64, 896), (3, 5, 31), (4, 129, 1000), (5, 300, 64),
                                        (9, 17, 4864), (1, 1, 7)])
def test_products_equal_float64_within_float32_sums(which, dtype, rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    for bias in (None, b):
        got = cpu_gemv.float_gemv(x, w, bias, which=which)
        want = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        assert got.dtype == dtype and got.shape == (rows, n)
        err = (got.double() - want).abs()
        assert (err <= _bound(x, w, bias, want, dtype) + 1e-30).all(), (which, err.max().item())
        if dtype == torch.bfloat16:  # one rounding of a float32 sum: within a unit of PyTorch's own product
            ours, stock = got.float(), F.linear(x, w, bias).float()
            assert ((ours - stock).abs() <= stock.abs() * 2.0 ** -7 + 1e-6).all()


def test_batched_leading_dims_and_errors():
    x = torch.randn(2, 3, 40)
    w = torch.randn(11, 40)
    torch.testing.assert_close(cpu_gemv.float_gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_gemv.float_gemv(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"weight \[N, 40\]"):
        cpu_gemv.float_gemv(x, torch.randn(11, 41))
    with pytest.raises(ValueError, match="which"):
        cpu_gemv.float_gemv(x, w, which="sse")


def test_one_opaque_op_under_torch_compile():
    w, b = torch.randn(64, 96).bfloat16(), torch.randn(64).bfloat16()

    def f(x):
        return torch.relu(cpu_gemv.float_gemv(x, w, b)) * 2

    x = torch.randn(2, 96).bfloat16()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_the_plan_leaves_pytorchs_product_only_by_a_margin():
    """A near-tie keeps the default (a busy moment cannot tip it); a clear win takes the fastest ISA."""
    assert cpu_gemv.choose({None: 1.0, "avx2": 0.95, "avx512": 0.97}) is None
    assert cpu_gemv.choose({None: 1.0, "avx2": 0.8, "avx512": 0.6}) == "avx512"
    assert cpu_gemv.choose({None: 0.5, "avx2": 0.8}) is None


def test_a_plan_measured_on_a_busy_machine_is_not_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("POINTS_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.setattr(cpu_gemv, "_tune", lambda dtype: {r: None for r in cpu_gemv.ROWS})
    monkeypatch.setattr(cpu_gemv, "machine_busy", lambda: True)
    if not cpu_gemv.available():
        pytest.skip(f"points.kernels.cpu_gemv: {cpu_gemv.reason()}")
    assert cpu_gemv.plan(torch.float32) == {r: None for r in cpu_gemv.ROWS}
    assert not list((tmp_path / "kernels").glob("cpu_plan-*.json"))
    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.setattr(cpu_gemv, "machine_busy", lambda: False)
    cpu_gemv.plan(torch.float32)
    assert len(list((tmp_path / "kernels").glob("cpu_plan-*.json"))) == 1
