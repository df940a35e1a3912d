"""Building the model from a checkpoint: the one sequence behind `points.load`, `load_decoder` and
`load_vision`.

    the files, read and checked and mapped into our names (points.io.checkpoint.load_state_dict)
      -> the modules built on the meta device (nothing allocated, no random init) and given those tensors
      -> the decoder's linear plan (points.runtime.linears.LinearPlan, the one place that decides what each
         linear layer becomes, in its order): a decoder stored quantized, or asked for quantized
         (quantize="int8" / "int4": its weights quantized as they are read, so the float weights are never held
         whole), gets empty Int8Linear / Int4Linear layers to take those tensors (`plan.skeleton`) before
         they are adopted; after, on the CPU, the float layers of every part become GemvLinear (`plan.apply`:
         the same parameters, few-row products on the kernel measured fastest on this machine, many-row
         bfloat16 ones in float32 blocks where that is faster here)
      -> (pipeline.load) a LoRA adapter, when asked, wraps whatever the plan made

Reading and validating files is points.io's; this module is the only one that puts files and modules
together, so io never imports the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from points.errors import CheckpointError
from points.io.checkpoint import load_state_dict
from points.io.config import CheckpointConfig, read_config
from points.io.quantized import describe_asked
from points.model.config import ModelConfig
from points.model.decoder import Decoder
from points.model.projector import PatchMerger
from points.model.vision import VisionEncoder
from points.runtime.linears import LinearPlan


class _SkipInit(TorchFunctionMode):
    """Parameters made on the meta device get no values: skip nn.init's in-place fills (whose first call
    on meta tensors otherwise costs seconds of one-time setup inside torch)."""

    FILLS = {"normal_", "uniform_", "fill_", "zero_", "trunc_normal_", "exponential_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FILLS:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if getattr(target, "is_meta", False):
                return target
        return func(*args, **kwargs)


def materialize(factory: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], prefix: str):
    """Build a module without allocating its parameters (meta device), then adopt the loaded tensors
    named `prefix` + its own names as its parameters (no copy); every parameter must be filled (strict), and
    the module's own ties (a Parameter under two names) hold after. Each parameter keeps the `requires_grad` its module gave it (PyTorch's default, True; False for int8 weights
    and their scales), so the loaded model trains as it is."""
    with torch.device("meta"), _SkipInit():
        module = factory()
    shared = _aliases(module)
    module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
                           strict=True, assign=True)
    for name, first in shared.items():  # (assigning gave each name a Parameter of its own: tie them again)
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(first))
    return module.eval()


def _aliases(module: torch.nn.Module) -> dict[str, str]:
    """The module's tied parameters (a tied head: `lm_head.weight` is `embed.weight`): each further name of a
    Parameter -> its first name."""
    first, out = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def quantization_steps(config: CheckpointConfig, quantize: str | None, quantize_lm_head: bool | None,
                       group_size: int | None = None, symmetric: bool | None = None):
    """(how the checkpoint stores its decoder, what to quantize while loading) for `points.load`'s quantize
    arguments. A checkpoint stored quantized loads as it is: asking for another scheme, or for lm_head, a group
    size or symmetry other than it is stored, is an error (convert again from the float checkpoint)."""
    stored, directory = config.quantization, config.directory
    if stored is None:
        return None, describe_asked(quantize, quantize_lm_head, group_size, symmetric)
    if quantize is not None and quantize != stored["scheme"]:
        raise CheckpointError(f"{directory}: stored quantized as {stored['scheme']!r}, asked for {quantize!r}; "
                              "convert the float checkpoint with that scheme instead")
    asked = {"lm_head": quantize_lm_head, "group_size": group_size, "symmetric": symmetric}
    for key, value in asked.items():
        if value is not None and value != stored.get(key):
            raise CheckpointError(f"{directory}: stored with {key} = {stored.get(key)}; quantize_{key}={value} "
                                  "would need converting the float checkpoint again")
    return stored, None


def build(source: str | Path | CheckpointConfig, make: Callable[[ModelConfig], torch.nn.Module], *,
          parts: tuple[str, ...],
          prefix: str, dtype=None, device="cpu", progress: bool | None = None, quantize: str | None = None,
          quantize_lm_head: bool | None = None, quantize_group_size: int | None = None,
          quantize_symmetric: bool | None = None) -> torch.nn.Module:
    """`make(cfg)` (a module holding a `decoder`, or a Decoder itself) with the checkpoint's tensors of
    `parts` (names after `prefix`): the one sequence every loader runs. `source`: the checkpoint directory, or
    its config.json already read (points.io.config.read_config)."""
    config = source if isinstance(source, CheckpointConfig) else read_config(source)
    stored, after = quantization_steps(config, quantize, quantize_lm_head, quantize_group_size, quantize_symmetric)
    cfg, state = load_state_dict(config, parts=parts, dtype=dtype, device=device, progress=progress,
                                 quantize=after)  # (quantized as read: the float weights are never whole)
    plan = LinearPlan(stored or after, cpu_kernels=torch.device(device).type == "cpu")

    def skeleton():
        module = make(cfg)
        if plan.quantization is not None:
            plan.skeleton(getattr(module, "decoder", module))
        return module

    module = materialize(skeleton, state, prefix)
    del state
    if isinstance(getattr(module, "decoder", module), Decoder):
        plan.apply(module)  # (every part: the vision encoder's many-row products too)
    return module


def load_decoder(directory: str | Path, *, dtype=None, device="cpu", progress: bool | None = None,
                 quantize: str | None = None, quantize_lm_head: bool | None = None,
                 quantize_group_size: int | None = None, quantize_symmetric: bool | None = None) -> Decoder:
    """The language model alone, from any supported checkpoint layout (`quantize*`: as in `points.load`)."""
    return build(directory, lambda cfg: Decoder(cfg.decoder), parts=("decoder",), prefix="decoder.", dtype=dtype,
                 device=device, progress=progress, quantize=quantize, quantize_lm_head=quantize_lm_head,
                 quantize_group_size=quantize_group_size, quantize_symmetric=quantize_symmetric)


def load_vision(directory: str | Path, *, dtype=None, device="cpu",
                progress: bool | None = None) -> tuple[VisionEncoder, PatchMerger]:
    """The vision encoder and the projector, from any supported checkpoint layout."""
    cfg, state = load_state_dict(directory, parts=("vision", "projector"), dtype=dtype, device=device,
                                 progress=progress)
    return (materialize(lambda: VisionEncoder(cfg.vision), state, "vision."),
            materialize(lambda: PatchMerger(cfg), state, "projector."))
