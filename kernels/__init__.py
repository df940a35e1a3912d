"""Triton kernels, packaged as `points.kernels`: `flash_varlen` (flash-attention forward over packed
variable-length sequences, with the KV-cache variant the decoder prefill uses).

`points.runtime.attention` is the single dispatch point that calls them, and imports them only when the
Triton path is chosen: nothing here is imported on a machine that never runs Triton.
"""
