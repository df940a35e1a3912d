"""Weight-only int8 as it is stored: the schemes, which projections a scheme quantizes, and the quantization
of one weight. The one list of each, read by the checkpoint mapping and the converter (points.io.checkpoint),
the config reader (points.io.config) and the module swap that runs it (points.runtime.quantize).

Scheme "int8": symmetric, one scale per output channel: scale[o] = max_i |W[o, i]| / 127 (kept in the model
dtype), W8 = round(W / scale) in [-127, 127]; the layer computes x @ (W8 * scale)^T + bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported by the functions that compute: the command line reads SCHEMES alone)
    import torch

SCHEMES = ("int8",)
BLOCK_ELEMENTS = 1 << 18  # quantize_int8's block: 1 MiB of float32 (measured 4x faster than the whole matrix)
PROJECTIONS = ("attn.qkv", "attn.out", "mlp.up_gate", "mlp.down")  # of every decoder layer


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize = {scheme!r}: unknown scheme; expected one of {SCHEMES}")
    return scheme


def quantized_modules(n_layers: int, lm_head: bool) -> list[str]:
    """The decoder's modules (names inside `Decoder`) a scheme quantizes, in module order."""
    return [f"layers.{i}.{m}" for i in range(n_layers) for m in PROJECTIONS] + (["lm_head"] if lm_head else [])


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], scale [out] in `scale_dtype`, default the
    weight's). The scale is rounded to its dtype first and the weight divided by the rounded scale, so that
    W8 * scale is the dequantized weight exactly as the layer uses it. A zero row gets scale 1.
    Computed a block of rows at a time in float32 (one block's copy stays in cache; the weight is read once
    and never written), the same numbers as the whole matrix at once."""
    import torch

    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        block = w[start:start + rows].to(torch.float32, copy=True)
        amax = block.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)
        scale[start:start + rows] = s
        q[start:start + rows] = block.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """int8 [out, in] and scale [out] -> the weight in `dtype` (default float32)."""
    w = q.float() * scale.float()[:, None]
    return w if dtype is None else w.to(dtype)
