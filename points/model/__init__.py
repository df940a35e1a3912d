"""The model's math: one file per part, plain PyTorch modules in PyTorch's usual parameter layout.

config (the dataclasses) -> rope, attention (SDPA or the Triton kernel, as the per-forward metadata says)
and cache (the static KV cache) -> decoder (Qwen2.5) | vision (NaViT encoder) -> projector (PatchMerger) ->
vlm (POINTSModel: the three composed). Nothing here imports the rest of the package.
"""

from points import submodules

__getattr__ = submodules(__name__)  # `points.model.NAME` imports the module NAME on first use
