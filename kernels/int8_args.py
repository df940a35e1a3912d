"""The argument checks the int8 weight-only products share (`cpu_int8.int8_gemv`, `triton_int8.int8_mm`): one
contract, x [..., K] float @ (weight [N, K] int8 * scale [N])^T + bias [N]; each kernel adds its own device check."""

from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def check_int8_args(name: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> None:
    """A one-line ValueError naming the product (`name`) and what it expected."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: weight int8 [N, {x.shape[-1]}] expected, got {weight.dtype} {list(weight.shape)}")
    if scale.shape != (weight.shape[0],) or (bias is not None and bias.shape != scale.shape):
        raise ValueError(f"{name}: scale and bias [{weight.shape[0]}] expected, got {list(scale.shape)} and "
                         f"{None if bias is None else list(bias.shape)}")
    if x.dtype not in FLOATS or scale.dtype not in FLOATS:
        raise ValueError(f"{name}: x and scale in float32, bfloat16 or float16, got {x.dtype} and {scale.dtype}")
