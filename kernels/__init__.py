"""Kernels, packaged as `points.kernels`, each optional and called from one dispatch point:

- `flash_varlen` (Triton): flash-attention forward over packed variable-length sequences, with the KV-cache
  variant the decoder prefill uses; `points.runtime.attention` imports it only when the Triton path is
  chosen, so nothing Triton is imported on a machine that never runs it.
- `cpu_int8` (C++ with AVX2, built on first use by the machine's compiler, called through ctypes): the int8
  weight-only product for a few rows; `points.runtime.quantize` calls it, and falls back to PyTorch's
  kernels where it cannot be built.
- `triton_int8` (Triton): the int8 weight-only product for a few rows on CUDA; `points.runtime.quantize`
  imports it only when that kernel is chosen.
"""

from points import submodules

__getattr__ = submodules(__name__)  # `points.kernels.NAME` imports the module NAME on first use
