"""The CPU kernel as a transform (points/runtime/cpu_linear.py): the same Parameters and state_dict, few rows on
the measured plan's kernel, everything else on F.linear, autograd untouched; `points.load` applies it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from points.kernels import cpu_gemv
from points.runtime.cpu_linear import GemvLinear
from points.runtime.linears import use_cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason=f"the CPU kernel: {cpu_gemv.reason()}")


def _net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 200), nn.ReLU(), nn.Linear(200, 40, bias=False)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_parameters_and_numbers(dtype):
    net = _net(dtype)
    params, state = list(net.parameters()), {k: v.data_ptr() for k, v in net.state_dict().items()}
    assert use_cpu_kernels(net) is net
    assert all(type(m) is GemvLinear for m in (net[0], net[2]))
    assert all(a is b for a, b in zip(net.parameters(), params))
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == state
    assert len(net[0].by_rows) == cpu_gemv.ROWS[-1] + 1 and net[0].by_rows[0] is None
    ref = _net(dtype)
    with torch.inference_mode():
        for rows in (1, 3, 8, 9, 40):
            x = torch.randn(rows, 96).to(dtype)
            got, want = net(x), ref(x)
            if rows > cpu_gemv.ROWS[-1]:
                assert torch.equal(got, want)  # more rows: PyTorch's product itself
            else:
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_autograd_takes_pytorchs_product():
    net = _net(torch.float32)
    use_cpu_kernels(net)
    x = torch.randn(1, 96, requires_grad=True)
    net(x).sum().backward()
    ref = _net(torch.float32)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(net[0].weight.grad, ref[0].weight.grad)


def test_load_puts_every_part_on_it(pipe):
    """The decoder's layers for their few-row products, the vision encoder's and the projector's for their
    many-row ones (float32 blocks where this CPU multiplies bfloat16 slower)."""
    for part in (pipe.model.decoder, pipe.model.vision, pipe.model.projector):
        assert {type(m) for m in part.modules() if isinstance(m, nn.Linear)} == {GemvLinear}
    x = torch.randn(1, pipe.model.decoder.cfg.hidden_size)
    head = pipe.model.decoder.lm_head
    with torch.inference_mode():
        torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)
