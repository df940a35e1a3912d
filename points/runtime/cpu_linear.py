"""Few-row float products on the CPU through this project's kernel (points.kernels.cpu_gemv), as a transform.

    use_cpu_kernels(decoder)      # its nn.Linear layers (lm_head too) become GemvLinear: same parameters

A `GemvLinear` is an nn.Linear (the same weight and bias Parameters, the same state_dict) whose forward
sends inputs of a few rows (decode steps, short prefills) to the kernel the machine's measured plan chooses
for that dtype and row count (`cpu_gemv.plan`: PyTorch's product, or the kernel on AVX2 / AVX-512 /
AVX-512 BF16, whichever was fastest here), and everything else (more rows, autograd, other devices or
dtypes) to F.linear. `points.load` applies it to a CPU decoder in float32 or bfloat16 where the kernel can
be built; POINTS_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from points.kernels import cpu_gemv


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
        return F.linear(x, self.weight, self.bias)


def use_cpu_kernels(module: nn.Module) -> int:
    """Every plain nn.Linear inside `module` (float32 / bfloat16, on the CPU) becomes a GemvLinear holding the
    same Parameters; returns how many. A no-op where the kernel is not available."""
    if not cpu_gemv.available():
        return 0
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype in cpu_gemv.DTYPE_CODES):
                new = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                found = cpu_gemv.plan(child.weight.dtype)
                new.by_rows = (None,) + tuple(found.get(next(r for r in cpu_gemv.ROWS if r >= rows))
                                              for rows in range(1, cpu_gemv.ROWS[-1] + 1))
                setattr(parent, name, new)
                swapped += 1
    return swapped
