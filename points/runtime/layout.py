"""An opt-in CPU transform: the decoder's tall float32 projection weights stored transposed in memory.

A one-token decode step is a string of matrix-vector products, and how fast a CPU's BLAS streams a weight
depends on its memory layout, differently from one CPU to the next. `tools/bench_linear.py` (one-row
products over 40 distinct [9728, 896] weights, 2 threads):

    AMD EPYC (no AVX-512)    float32: row-major 2635 us, transposed 1579 us   bfloat16: 579 us vs 12159 us
    Intel Xeon with AMX      bfloat16: row-major 1073 us, transposed 1475 us

So only float32 on some CPUs gains, and bfloat16 can lose 20x: the model keeps PyTorch's usual row-major
layout, and this transform is an explicit choice for float32 on a CPU where the bench says it pays.

    from points.runtime.linears import transpose_tall_linears
    transpose_tall_linears(pipe.model.decoder)          # LinearPlan(transposed=True).apply

Every Linear with more outputs than inputs (q/k/v, gate/up, lm_head) gets a weight of the same shape and
values whose storage is column-major (strides (1, out)). `state_dict()` stays canonical: it hands out
contiguous row-major copies of those weights (one copy per call), so saving and loading are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn


def transposed_linear(name: str, linear: nn.Linear) -> nn.Linear:
    """Store `linear`'s weight transposed in memory, in place (float32 CPU weights only; a ValueError naming
    `name` otherwise); returns it (points.runtime.linears decides which layers: the tall ones)."""
    w = linear.weight
    if w.dtype != torch.float32 or w.device.type != "cpu":
        raise ValueError(f"transpose_tall_linears: {name}.weight is {str(w.dtype).removeprefix('torch.')} on "
                         f"{w.device}; the transposed layout is for float32 CPU weights only (it is slower "
                         "elsewhere, see points.runtime.layout)")
    linear.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    linear.register_state_dict_post_hook(_row_major_weight)
    return linear


def _row_major_weight(linear: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + "weight"] = state[prefix + "weight"].contiguous()
