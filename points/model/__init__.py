"""The model's math: one file per part, plain PyTorch modules in PyTorch's usual parameter layout.

config (the dataclasses) -> rope -> decoder (Qwen2.5) | vision (NaViT encoder) -> projector (PatchMerger)
-> vlm (POINTSModel: the three composed). Attention calls `points.runtime.attention` for its kernel.
"""
