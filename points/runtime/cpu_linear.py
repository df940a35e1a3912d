"""Few-row float products on the CPU through this project's kernel (points.kernels.cpu_gemv): the layer.

    gemv_linear(linear)           # a GemvLinear holding the same Parameters (points.runtime.linears: which ones)

A `GemvLinear` is an nn.Linear (the same weight and bias Parameters, the same state_dict) whose forward
sends inputs of a few rows (decode steps, short prefills) to the kernel the machine's measured plan chooses
for that dtype and row count (`cpu_gemv.plan`: PyTorch's product, or the kernel on AVX2 / AVX-512 /
AVX-512 BF16, whichever was fastest here); more rows of bfloat16 (prefills, the vision encoder) in float32
blocks where this CPU multiplies bfloat16 slower (points.runtime.cpu_blocks); everything else (autograd, other
devices or dtypes) to F.linear. `points.load`'s linear plan makes one of each float32 / bfloat16 Linear of a CPU decoder
where the kernel can be built ("gemv"); POINTS_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from points.kernels import cpu_gemv
from points.runtime.cpu_blocks import blocked_linear, compute_dtype


class GemvLinear(nn.Linear):
    # by_rows[r]: the product for r rows from cpu_gemv.plan of the weight's dtype, fixed at the swap (None: PyTorch's;
    # r past the end: PyTorch's)
    by_rows: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        which = self.by_rows[rows] if rows < len(self.by_rows) else None
        if (which is not None and x.is_cpu and x.dtype == self.weight.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return cpu_gemv.planned(x, self.weight, self.bias, which)
        if (which is None and x.is_cpu and x.dtype == self.weight.dtype == torch.bfloat16
                and compute_dtype(torch.bfloat16) == torch.float32 and not torch.is_grad_enabled()):
            return blocked_linear(x, lambda a, b, dt: self.weight[a:b].to(dt), self.out_features, self.bias,
                                  torch.float32)
        return F.linear(x, self.weight, self.bias)


def gemv_linear(linear: nn.Linear) -> GemvLinear:
    """A GemvLinear holding `linear`'s own Parameters (a float32 / bfloat16 CPU nn.Linear), its products by row
    count fixed from the machine's measured plan for the weight's dtype (points.runtime.linears decides which
    layers become one)."""
    new = GemvLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight, linear.bias
    found = cpu_gemv.plan(linear.weight.dtype)
    new.by_rows = (None,) + tuple(found.get(next(r for r in cpu_gemv.ROWS if r >= rows))
                                  for rows in range(1, cpu_gemv.ROWS[-1] + 1))
    return new
