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
    W8 * scale is the dequantized weight exactly as the layer uses it. A zero row gets scale 1."""
    import torch

    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """int8 [out, in] and scale [out] -> the weight in `dtype` (default float32)."""
    w = q.float() * scale.float()[:, None]
    return w if dtype is None else w.to(dtype)
