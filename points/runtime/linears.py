"""What each linear layer becomes: the one plan, built once from the load options and applied in one pass.

    plan = LinearPlan(quantization={"scheme": "int4", ...}, cpu_kernels=True)
    plan.apply(decoder)          # every Linear made what the plan says, in one walk
    plan.table(decoder)          # {module name: "int4" | "int8" | "gemv" | "transposed" | "float" (+ " + lora")}

Kinds, decided per layer by `kind()` in this order (the only place the order is written):

1. "int8" / "int4": the projections a quantization names (points.io.quantized: q/k/v, out, up/gate, down of
   every decoder layer, lm_head when asked) become Int8Linear / Int4Linear (points.runtime.quantize). At load
   the quantized layers are made empty first (`skeleton`) and take the stored or as-read quantized tensors;
   `apply` on a float decoder quantizes the weights it finds.
2. "transposed" (opt-in, float32 on the CPU, `transposed=True`): a tall Linear keeps its class with its weight
   stored column-major (points.runtime.layout; `state_dict()` stays row-major).
3. "gemv" (`cpu_kernels=True`, what `points.load` asks on the CPU, for every part of the model): a float32 /
   bfloat16 Linear becomes a GemvLinear, the same Parameters with few-row products on this machine's measured
   kernel (points.runtime.cpu_linear) and many-row bfloat16 ones in float32 blocks where this CPU multiplies
   bfloat16 slower (points.runtime.cpu_blocks), where that kernel is built.
4. "float": everything else stays the nn.Linear it is.

LoRA adapters come last and on top of whatever the plan made (points.runtime.lora wraps the layer, a
quantized one too: QLoRA); `table` shows them. The plan is kept on the module it was applied to
(`module.linear_plan`), and `apply` is idempotent: a layer already of its kind is left as it is. Each kind is
recognised by its own class, never by a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from points.io.quantized import describe
from points.kernels import cpu_gemv
from points.runtime.cpu_blocks import compute_dtype
from points.runtime.cpu_linear import gemv_linear
from points.runtime.layout import transposed_linear
from points.runtime.lora import LoraLinear
from points.runtime.quantize import (Int4Linear, Int8Linear, cuda_notice, decide_kernels, projection_names,
                                     quantized_layer)


@dataclass(frozen=True)
class LinearPlan:
    quantization: dict | None = None  # points.io.quantized.describe's dict, for a decoder's projections
    cpu_kernels: bool = False  # float few-row products on this CPU's measured kernel
    transposed: bool = False  # float32 tall weights stored column-major (CPU, opt-in; excludes cpu_kernels' copy)
    kernel: str = "auto"  # the quantized layers' product (points.runtime.quantize)

    def quantized_names(self, module: nn.Module) -> set[str]:
        """The names (inside `module`: a Decoder, or a model holding one as `decoder`) of the layers the
        quantization makes quantized."""
        return set(projection_names(module, self.quantization["lm_head"])) if self.quantization else set()

    def kind(self, name: str, linear: nn.Module, quantized: set[str]) -> str:
        """What the layer `name` becomes (see the module's order)."""
        if name in quantized:
            return self.quantization["scheme"]
        if isinstance(linear, (Int8Linear, Int4Linear)):
            return "int8" if isinstance(linear, Int8Linear) else "int4"
        if not isinstance(linear, nn.Linear) or linear.weight.device.type != "cpu":
            return "float"
        if self.transposed and linear.out_features > linear.in_features:
            return "transposed"
        if self.cpu_kernels and linear.weight.dtype in (torch.float32, torch.bfloat16) and cpu_gemv.available():
            return "gemv"
        return "float"

    def layers(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, layer) of every linear layer of `module`, LoRA's base in place of its wrapper, in order."""
        out = []
        for name, m in module.named_modules():
            if isinstance(m, LoraLinear):
                out.append((name, m.base))
            elif isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) and not name.endswith(".base"):
                out.append((name, m))
        return out

    def table(self, module: nn.Module) -> dict[str, str]:
        """{module name: kind, with " + lora" where an adapter wraps it} as the layers are now."""
        quantized = self.quantized_names(module)
        return {name: self.kind(name, layer, quantized)
                + (" + lora" if isinstance(module.get_submodule(name), LoraLinear) else "")
                for name, layer in self.layers(module)}

    def skeleton(self, module: nn.Module) -> nn.Module:
        """The quantized layers made empty (no weights computed), on their weights' device: the structure a
        quantized checkpoint's tensors are loaded into (points.loading)."""
        decide_kernels(self.quantization)
        for name in sorted(self.quantized_names(module)):
            module.set_submodule(name, quantized_layer(self.quantization, module.get_submodule(name), empty=True))
        getattr(module, "decoder", module).quantization = self.quantization
        return module

    def apply(self, module: nn.Module) -> nn.Module:
        """Every linear layer of `module` made what `kind` says, in one walk (layers under a LoRA adapter are
        left as they are); returns `module`."""
        quantized = self.quantized_names(module)
        decoder = getattr(module, "decoder", module)
        if quantized:
            cuda_notice(decoder.embed.weight.device)
            decide_kernels(self.quantization)
        for name, layer in self.layers(module):
            if isinstance(module.get_submodule(name), LoraLinear):
                continue
            kind = self.kind(name, layer, quantized)
            if kind in ("int8", "int4"):
                if not isinstance(layer, (Int8Linear, Int4Linear)):
                    module.set_submodule(name, quantized_layer(self.quantization, layer, self.kernel))
            elif kind == "gemv" and type(layer) is nn.Linear:
                module.set_submodule(name, gemv_linear(layer))
            elif kind == "transposed" and isinstance(layer, nn.Linear) and layer.weight.is_contiguous():
                module.set_submodule(name, transposed_linear(name, _plain(layer)))  # (a GemvLinear's kernel reads rows)
        if quantized:
            decoder.quantization = self.quantization
        decoder.linear_plan = self
        if self.cpu_kernels or quantized:  # (decided now: not inside a compiled step's trace)
            for layer in dict(self.layers(module)).values():
                if layer.weight.device.type == "cpu" and layer.weight.dtype != torch.float32:
                    compute_dtype(getattr(layer, "scale", layer.weight).dtype)
        return module


def quantize_decoder(decoder, scheme: str = "int8", *, lm_head: bool = False, kernel: str = "auto",
                     group_size: int | None = None, symmetric: bool | None = None):
    """Swap the decoder's projections (and lm_head when asked) for their quantized versions (scheme "int8", or
    "int4" with group_size 32 / 64 / 128, default 128, and symmetric), in place; return the decoder. The float
    weights are let go one layer at a time (a mapped file's pages are not read twice). kernel: the product's,
    "auto" or one of the scheme's kernels forced."""
    quantization = describe(scheme, lm_head, group_size, symmetric)
    if getattr(decoder, "quantization", None):
        raise ValueError("quantize_decoder: this decoder is already quantized")
    plan = getattr(decoder, "linear_plan", None) or LinearPlan()
    return LinearPlan(quantization, plan.cpu_kernels, plan.transposed, kernel).apply(decoder)


def use_cpu_kernels(module: nn.Module) -> nn.Module:
    """Every float32 / bfloat16 nn.Linear of `module` on the CPU becomes a GemvLinear (the same Parameters),
    where the kernel is built: LinearPlan(cpu_kernels=True), what `points.load` applies on the CPU."""
    return LinearPlan(cpu_kernels=True).apply(module)


def transpose_tall_linears(module: nn.Module) -> nn.Module:
    """Store the weights of `module`'s tall Linears transposed in memory (float32 CPU weights only; the opt-in
    layout of points.runtime.layout): LinearPlan(transposed=True)."""
    return LinearPlan(transposed=True).apply(module)


def _plain(linear: nn.Linear) -> nn.Linear:
    """`linear` as a plain nn.Linear holding the same Parameters."""
    if type(linear) is nn.Linear:
        return linear
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain
