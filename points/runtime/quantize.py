"""Weight-only int8 and int4 quantization of the decoder: the layers, their products and kernels. The swap
itself is the linear plan's (points.runtime.linears: a quantization is one of the things a layer becomes):

    from points.runtime.linears import quantize_decoder
    quantize_decoder(pipe.model.decoder)                 # int8: q/k/v, out, up/gate, down of every layer
    quantize_decoder(pipe.model.decoder, lm_head=True)   # and the output projection
    quantize_decoder(pipe.model.decoder, "int4")         # int4, groups of 128 with offsets (group_size=, symmetric=)

Scheme "int4" (points.io.quantized): each quantized `nn.Linear` becomes an `Int4Linear` (state `weight`, the
uint8 codes two a byte, `scale` and `offset` per group, `bias`); its product (`int4_linear`) is, for up to
INT4_GEMV_ROWS rows on a CPU, this project's kernel `points.kernels.cpu_int4` (the activations rounded to int8
per weight group, as llama.cpp's q4 x q8 products do per block: tools/quantization_quality.py measures what that
costs), and
otherwise the weight dequantized to the activations' dtype and PyTorch's product.

Scheme "int8" (points.io.quantized: what is stored, and which projections): one scale per output channel,
the layer computes x @ (W8 * scale)^T + bias, i.e. (x @ W8^T) * scale + bias. Activations, norms, rotary and softmax are untouched (float32 where they were);
the vision encoder and the projector stay in the model dtype. Each quantized `nn.Linear` becomes an
`Int8Linear` whose state is `weight` (int8 [out, in]), `scale` ([out], model dtype) and `bias`: plain tensors
that `state_dict()` hands out and `points convert --quantize int8` writes.

The product's kernel (`quantize_decoder(..., kernel=)`, held by each Int8Linear: "auto" by default, or one
of KERNELS forced, for tests and benchmarks) is chosen here, by device and number of rows (tools/bench_int8.py measured them;
docs/benchmarks.md has the figures):
- CPU, up to 64 rows (decode, short prefills), eager or compiled: `points.kernels.cpu_int8`, this project's
  own AVX2 kernel (compiled on first use where a C++ compiler is found; one sequential stream per thread,
  float32 accumulation). On the project's AMD EPYC it reads int8 at 2x the rate of PyTorch's
  `_weight_int8pack_mm` at one row, 2.0x the bf16 product and 5.8x the float32 one;
- CPU, more rows (prefills) in bf16 / fp16: whichever of `torch.ops.aten._weight_int8pack_mm` and the
  dequantization (`F.linear(x, W8.to(x.dtype)) * scale`) is faster on this machine, measured once per process
  and dtype at the first such product (`many_rows_kernel`: 256 rows of a [2048, 4096] weight, the two
  alternated five times, medians, dequantize only when 1.25x faster; ~0.3 s): on the AMD EPYC without AMX the int8pack kernel (bf16 products there run at ~22 GFLOP/s), on an Intel
  Xeon with AMX the dequantization (613-643 GFLOP/s against 175-186 for int8pack at 360 rows of the 3B
  Reader's MLP shapes, 2026-12-07), where the static rule made an int8 prefill 3.5x slower than it needs;
- CPU, up to 64 rows where that kernel is not available: int8pack for bf16 / fp16 activations; for float32
  (any rows) the dequantization, which measured faster there than the int8pack kernel;
- CUDA, up to TRITON_ROWS rows, where Triton is installed: `points.kernels.triton_int8`, this project's
  Triton kernel (int8 rows read once, scaled in registers, K split where N alone leaves the GPU idle; the
  custom op `points::int8_mm` in the compiled step). Not yet measured on a GPU: the last GPU run (H200,
  2026-11-27) predates it and measured the other two paths at 0.06x (`_weight_int8pack_mm`) and 0.41x (the
  compiled dequantize-multiply) of the bf16 products, so until a run says otherwise int8 on CUDA warns once
  that bfloat16 may be faster (`cuda_notice`);
- CUDA, more rows or without Triton: the dequantize-multiply written out, which inductor fuses into the
  product under torch.compile; in eager it materialises W (the portable fallback, slow);
- anywhere, when the input needs a gradient (LoRA on a quantized base: the codes frozen, gradients flowing
  through them to earlier layers' adapters): the dequantize-multiply, whose backward PyTorch has; the kernels
  have none. The same holds for int4.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from points.io.quantized import dequantize_int4, dequantize_int8, describe, quantize_weight, quantized_modules, stored_tensors
from points.kernels import cpu_build, cpu_int4, cpu_int8
from points.runtime.cpu_blocks import blocked_linear, compute_dtype

GEMV_ROWS = 64  # up to this many rows the CPU kernel beats the others (bench_int8: 1.0x int8pack at 64 in bf16)
TRITON_ROWS = 16  # one tile of the Triton kernel's rows (decode batches); prefills take the dequantize-multiply
KERNELS = ("auto", "gemv", "int8pack", "dequantize", "triton")  # auto: the rule above; the others force one
HAS_TRITON = importlib.util.find_spec("triton") is not None


def choose_kernel(device_type: str, rows: int, dtype: torch.dtype, inner: int) -> str:
    """The rule above: the kernel "auto" takes for `rows` rows of `inner` inputs in `dtype` on a device."""
    if device_type != "cpu":
        return "triton" if device_type == "cuda" and HAS_TRITON and rows <= TRITON_ROWS else "dequantize"
    if rows <= GEMV_ROWS and cpu_int8.available():
        return "gemv"
    if dtype == torch.float32 or inner % 8:
        return "dequantize"
    return many_rows_kernel(dtype) if rows > GEMV_ROWS else "int8pack"


_MANY_ROWS: dict = {}  # activation dtype -> the faster many-row kernel here, measured once per process


def many_rows_kernel(dtype: torch.dtype) -> str:
    """"int8pack" or "dequantize", whichever multiplies 256 rows by an int8 [2048, 4096] weight faster on this
    machine in `dtype` (alternated, five timings each, medians compared, dequantize taken only when 1.25x
    faster: a busy moment slows both alike; measured the first time it is asked; inside a torch.compile
    trace, int8pack unmeasured)."""
    if dtype not in _MANY_ROWS:
        if torch.compiler.is_compiling():
            return "int8pack"
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (2048, 4096), dtype=torch.int8, generator=g)
        scale, x = torch.rand(2048, generator=g).to(dtype), torch.randn(256, 4096, generator=g).to(dtype)
        with torch.inference_mode():
            median = cpu_build.alternated_medians({k: (lambda k=k: int8_linear(x, w, scale, None, k))
                                                   for k in ("int8pack", "dequantize")})
        _MANY_ROWS[dtype] = "dequantize" if median["int8pack"] >= 1.25 * median["dequantize"] else "int8pack"
    return _MANY_ROWS[dtype]


def _needs_grad(x: torch.Tensor, *floats: torch.Tensor | None) -> bool:
    """Whether a product must carry a gradient (QLoRA: the codes frozen, the input not; or a float part of the
    layer set to train): the kernels (CPU through ctypes, Triton's custom ops) have no backward, so such a
    product is the dequantized one, whatever kernel was asked."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in floats))


def _auto_kernel(x: torch.Tensor) -> str:
    return choose_kernel(x.device.type, x.numel() // x.shape[-1], x.dtype, x.shape[-1])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                kernel: str = "auto") -> torch.Tensor:
    """x [..., in] @ (weight * scale)^T + bias -> [..., out] in x's dtype, on `kernel` (one of KERNELS)."""
    if _needs_grad(x, scale, bias):
        kernel = "dequantize"
    elif kernel == "auto":
        kernel = _auto_kernel(x)
    if kernel == "gemv":
        return cpu_int8.int8_gemv(x, weight, scale, bias)
    if kernel == "triton":
        from points.kernels.triton_int8 import int8_mm

        return int8_mm(x, weight, scale, bias)
    if kernel == "int8pack":
        if x.shape[-1] % 8:  # torch 2.13's CPU kernel reads past the end there (segfaults at 2+ rows in bf16)
            raise ValueError(f"int8 kernel 'int8pack': the input size must be a multiple of 8, got {x.shape[-1]}")
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                              scale.to(x.dtype)).reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output row (scheme "int8")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel = check_kernel(kernel)
        _stored_parameters(self, describe("int8"), bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias, self.kernel)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] it computes with (float32 unless `dtype`)."""
        return dequantize_int8(self.weight, self.scale, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8, kernel={self.kernel}")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"int8 kernel {kernel!r}: expected one of {KERNELS}")
    return kernel


CUDA_NOTICE = ("points: int8 on CUDA runs this project's Triton kernel, not yet measured on a GPU; the last GPU "
               "run (H200) measured int8's other paths at 0.06x-0.41x of the bfloat16 products, so bfloat16 may "
               "decode faster (README, 'int8 on CUDA')")


def cuda_notice(device: torch.device) -> None:
    """The one-time warning of what int8 costs on CUDA (until a GPU run measures the Triton kernel faster)."""
    if torch.device(device).type == "cuda":
        warnings.warn(CUDA_NOTICE, stacklevel=3)


# ----------------------------------------------------------------------------------------------- int4

INT4_KERNELS = ("auto", "gemv", "dequantize", "triton")  # auto: the rule of int4_linear; the others force one
# Up to this many rows the CPU kernel, past them blocks of dequantized rows (tools/bench_int8.py --rows 16 32 64,
# small preset, bf16, Xeon with AMX, the VNNI path it takes: the kernel 1.67x the blocks at 16 rows, 1.08x at 32,
# 0.66x at 64). Not measured on CPUs whose bf16 products are not native: there the blocks compute in float32,
# 3-6x slower than AMX's bf16 here, which should leave the AVX2 / AVX-512BW paths ahead at 32 rows as well.
INT4_GEMV_ROWS = 32


def int4_kernel(device_type: str, rows: int) -> str:
    """The kernel "auto" takes for `rows` rows on a device (int4_linear's rule)."""
    if device_type == "cpu":
        return "gemv" if rows <= INT4_GEMV_ROWS and cpu_int4.available() else "dequantize"
    return "triton" if device_type == "cuda" and HAS_TRITON and rows <= TRITON_ROWS else "dequantize"


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                bias: torch.Tensor | None, group_size: int, kernel: str = "auto") -> torch.Tensor:
    """x [..., in] @ W^T + bias -> [..., out] in x's dtype, W the int4 weight of points.io.quantized (weight:
    the packed codes). kernel "gemv": points.kernels.cpu_int4 (activations rounded to int8 per weight group);
    "triton": points.kernels.triton_int4 (W dequantized in registers to x's dtype, float32 sums);
    "dequantize": W in float, then PyTorch's product: on the CPU a block of rows at a time in the dtype
    points.runtime.cpu_blocks measured faster (x's, or float32), elsewhere W whole in x's dtype (what inductor
    fuses under torch.compile); "auto": gemv for up to INT4_GEMV_ROWS rows on a CPU where it is built, triton
    for up to TRITON_ROWS rows on CUDA where Triton is installed, else dequantize. A product that must carry a
    gradient is the dequantized one whatever the kernel (the others have no backward)."""
    if _needs_grad(x, scale, offset, bias):
        kernel = "dequantize"
    elif kernel == "auto":
        kernel = int4_kernel(x.device.type, x.numel() // x.shape[-1] if x.shape[-1] else 0)
    if kernel == "gemv":
        return cpu_int4.planned(x, weight, scale, offset, bias, group_size, cpu_int4.isa())
    if kernel == "triton":
        from points.kernels.triton_int4 import int4_mm

        return int4_mm(x, weight, scale, offset, bias, group_size=group_size)
    if x.device.type == "cpu" and cpu_int4.available() and not torch.compiler.is_compiling():
        k = x.shape[-1]
        return blocked_linear(x, lambda a, b, dt: cpu_int4.dequantize_rows(weight, scale, offset, k, group_size, a,
                                                                          b - a, dt),
                              weight.shape[0], bias, compute_dtype(x.dtype))
    w = dequantize_int4(weight, scale, offset, x.shape[-1], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


class Int4Linear(nn.Module):
    """A Linear whose weight is int4 in groups of `group_size` inputs, with a scale (and, asymmetric, an
    offset) per group (scheme "int4"). State: `weight` (uint8 codes, two a byte), `scale`, `offset` (None when
    symmetric), `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, *, group_size: int = 128, symmetric: bool = False, kernel: str = "auto"):
        super().__init__()
        if kernel not in INT4_KERNELS:
            raise ValueError(f"int4 kernel {kernel!r}: expected one of {INT4_KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric, self.kernel = group_size, symmetric, kernel
        _stored_parameters(self, describe("int4", group_size=group_size, symmetric=symmetric), bias, dtype, device)
        if self.symmetric:
            self.register_parameter("offset", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight, self.scale, self.offset, self.bias, self.group_size, self.kernel)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] it computes with (float32 unless `dtype`)."""
        return dequantize_int4(self.weight, self.scale, self.offset, self.in_features, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}, "
                f"kernel={self.kernel}")


def _stored_parameters(layer: nn.Module, quantization: dict, bias: bool, dtype: torch.dtype, device) -> None:
    """The layer's frozen, empty Parameters: the tensors points.io.quantized.stored_tensors lists for its shape
    (codes in their own dtype, scales and offsets in `dtype`), then `bias` (or None)."""
    for name, (shape, dt) in stored_tensors(quantization, layer.out_features, layer.in_features).items():
        setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=dt or dtype, device=device), requires_grad=False))
    layer.bias = (nn.Parameter(torch.empty(layer.out_features, dtype=dtype, device=device), requires_grad=False)
                  if bias else None)


# ----------------------------------------------------------------------------------------------- the swap

def quantized_layer(quantization: dict, linear: nn.Module, kernel: str = "auto", *, empty: bool = False) -> nn.Module:
    """The quantized layer `quantization` (points.io.quantized.describe's dict) makes of `linear`: its weight
    quantized, or (`empty`) the layer's structure only, on the weight's device, to load stored tensors into."""
    w = linear.weight
    args = (linear.in_features, linear.out_features, linear.bias is not None, w.dtype)
    if quantization["scheme"] == "int8":
        out = Int8Linear(*args, device=w.device if empty else "meta", kernel=kernel)
    else:
        out = Int4Linear(*args, device=w.device if empty else "meta", group_size=quantization["group_size"],
                         symmetric=quantization["symmetric"], kernel=kernel)
    if not empty:
        for name, t in quantize_weight(w, quantization).items():
            setattr(out, name, nn.Parameter(t, requires_grad=False))
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return out


def projection_names(module: nn.Module, lm_head: bool) -> list[str]:
    """The names inside `module` (a Decoder, or a model holding one as `decoder`) of the projections a scheme
    quantizes (points.io.quantized.quantized_modules), in order; [] for a module without decoder layers."""
    decoder = getattr(module, "decoder", module)
    if not hasattr(decoder, "layers"):
        return []
    prefix = "decoder." if decoder is not module else ""
    return [prefix + n for n in quantized_modules(len(decoder.layers), lm_head)]


def quantized_linears(decoder, lm_head: bool = False) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every projection the scheme quantizes (points.io.quantized), in order."""
    out = []
    for name in quantized_modules(len(decoder.layers), lm_head):
        parent, _, attr = name.rpartition(".")
        out.append((decoder.get_submodule(parent) if parent else decoder, attr))
    return out


def decide_kernels(quantization: dict | None) -> None:
    """Build (or find in the cache) the CPU kernel a quantization's layers call and decide its instruction set
    now, outside any torch.compile trace of the step that will call it."""
    if quantization and quantization["scheme"] == "int4" and cpu_int4.available():
        cpu_int4.isa()
