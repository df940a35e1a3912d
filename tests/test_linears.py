"""The linear plan (points.runtime.linears): one description of what each linear layer becomes, applied in one
walk, idempotent, the same layers whichever way a model got there (quantized as read, or swapped after)."""

import torch
from torch import nn

import points
from points.kernels import cpu_gemv
from points.runtime.cpu_linear import GemvLinear
from points.runtime.linears import LinearPlan, quantize_decoder
from points.runtime.lora import LoraConfig, add_lora
from points.runtime.quantize import Int4Linear


def test_the_plan_of_a_loaded_model_says_what_each_layer_is(official_dir):
    decoder = points.load_decoder(official_dir, quantize="int4", quantize_group_size=32, quantize_lm_head=False)
    plan = decoder.linear_plan
    assert plan == LinearPlan({"scheme": "int4", "lm_head": False, "group_size": 32, "symmetric": False},
                              cpu_kernels=True)
    table = plan.table(decoder)
    float_kind = "gemv" if cpu_gemv.available() else "float"
    assert table["layers.0.attn.qkv"] == table["layers.1.mlp.down"] == "int4"
    assert table["lm_head"] == float_kind and isinstance(decoder.lm_head, GemvLinear) is (float_kind == "gemv")
    assert set(table) == {f"layers.{i}.{p}" for i in range(len(decoder.layers))
                          for p in ("attn.qkv", "attn.out", "mlp.up_gate", "mlp.down")} | {"lm_head"}
    add_lora(decoder, LoraConfig(rank=2, targets=("q",)))
    assert plan.table(decoder)["layers.0.attn.qkv"] == "int4 + lora"
    layers = dict(decoder.named_modules())
    assert plan.apply(decoder) is decoder and dict(decoder.named_modules()) == layers  # nothing left to do


@torch.no_grad()
def test_quantizing_after_loading_equals_quantizing_as_read(official_dir):
    """A float decoder loaded on the CPU (GemvLinear layers) then quantized by the plan: the same layers and
    tensors as asking for int4 while loading."""
    swapped = quantize_decoder(points.load_decoder(official_dir), "int4", group_size=64, lm_head=True)
    read = points.load_decoder(official_dir, quantize="int4", quantize_group_size=64, quantize_lm_head=True)
    assert swapped.linear_plan == read.linear_plan
    assert {n: type(m) for n, m in swapped.named_modules()} == {n: type(m) for n, m in read.named_modules()}
    assert isinstance(read.lm_head, Int4Linear)
    a, b = swapped.state_dict(), read.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_transposed_takes_the_place_of_the_cpu_kernel():
    """The two float layouts exclude each other: a tall GemvLinear asked to be transposed becomes a plain
    Linear over the same values (the kernel reads rows), a wide one stays as it was."""
    net = nn.Sequential(nn.Linear(16, 48), nn.Linear(48, 16))
    LinearPlan(cpu_kernels=True).apply(net)
    weight = net[0].weight.detach().clone()
    LinearPlan(transposed=True).apply(net)
    assert type(net[0]) is nn.Linear and net[0].weight.stride() == (1, 48) and torch.equal(net[0].weight, weight)
    assert type(net[1]) is (GemvLinear if cpu_gemv.available() else nn.Linear)
