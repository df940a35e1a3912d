"""Weight-only int8 quantization of the decoder: a module swap on the canonical model, nothing in the math.

    quantize_decoder(pipe.model.decoder)                 # q/k/v, out, up/gate, down of every layer
    quantize_decoder(pipe.model.decoder, lm_head=True)   # and the output projection

Scheme "int8": symmetric, one scale per output channel: scale[o] = max_i |W[o, i]| / 127 (kept in the model
dtype), W8 = round(W / scale) in [-127, 127]; the layer computes x @ (W8 * scale)^T + bias, i.e.
(x @ W8^T) * scale + bias. Activations, norms, rotary and softmax are untouched (float32 where they were);
the vision encoder and the projector stay in the model dtype. Each quantized `nn.Linear` becomes an
`Int8Linear` whose state is `weight` (int8 [out, in]), `scale` ([out], model dtype) and `bias`: plain tensors
that `state_dict()` hands out and `points convert --quantize int8` writes.

The product's kernel is chosen here, by device (tools/bench_int8.py measured them; docs/benchmarks.md):
- CPU: `torch.ops.aten._weight_int8pack_mm` (reads the int8 weight directly; on this project's AMD EPYC
  1.12x the bf16 product at one row and 1.88x at four), except float32 activations of several rows, where
  the eager dequantization measured faster (0.79x the fp32 product against 0.19x; at one row 0.47x against
  0.19x): in float32, int8 weights save memory, not time, on that CPU;
- under torch.compile (the compiled decode step, CUDA graphs on CUDA): the dequantize-multiply written out,
  `F.linear(x, W8.to(x.dtype)) * scale`, which inductor fuses;
- CUDA eager: the same expression, run as written (the portable fallback; slow: it materialises W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8",)
# "auto" (the rule above) | "int8pack" | "dequantize": forces one on every device, for tests and benchmarks
KERNEL = "auto"


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"quantize = {scheme!r}: unknown scheme; expected one of {SCHEMES}")
    return scheme


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], scale [out] in `scale_dtype`, default the
    weight's). The scale is rounded to its dtype first and the weight divided by the rounded scale, so that
    W8 * scale is the dequantized weight exactly as the layer uses it. A zero row gets scale 1."""
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ (weight * scale)^T + bias -> [..., out] in x's dtype."""
    kernel = KERNEL
    if kernel == "auto":
        rows = x.numel() // x.shape[-1]
        kernel = ("int8pack" if x.device.type == "cpu" and not torch.compiler.is_compiling()
                  and (x.dtype != torch.float32 or rows == 1) else "dequantize")
    if kernel == "int8pack":
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                              scale.to(x.dtype)).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output row (scheme "int8")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, device="meta")
        q, scale = quantize_int8(w)
        out.weight = nn.Parameter(q, requires_grad=False)
        out.scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantized_linears(decoder, lm_head: bool = False) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection the scheme quantizes, in module order."""
    out = []
    for layer in decoder.layers:
        out += [(layer.attn, "qkv"), (layer.attn, "out"), (layer.mlp, "up_gate"), (layer.mlp, "down")]
    if lm_head:
        out.append((decoder, "lm_head"))
    return out


def quantize_decoder(decoder, scheme: str = "int8", *, lm_head: bool = False):
    """Swap the decoder's projections (and lm_head when asked) for their int8 versions, in place; return the
    decoder. The float weights are let go one layer at a time (a mapped file's pages are not read twice)."""
    check_scheme(scheme)
    if isinstance(decoder.layers[0].attn.qkv, Int8Linear):
        raise ValueError("quantize_decoder: this decoder is already quantized")
    for parent, name in quantized_linears(decoder, lm_head):
        setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    decoder.quantization = {"scheme": scheme, "lm_head": lm_head}
    return decoder


def int8_skeleton(decoder, *, lm_head: bool = False):
    """The module structure of a quantized decoder without computing anything (on the meta device, for
    loading a quantized checkpoint's tensors into): every quantized Linear becomes an empty Int8Linear."""
    for parent, name in quantized_linears(decoder, lm_head):
        lin = getattr(parent, name)
        setattr(parent, name, Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype,
                                         device=lin.weight.device))
    decoder.quantization = {"scheme": "int8", "lm_head": lm_head}
    return decoder
