"""Compiled attention and decoding paths, packaged as `points.kernels`.

Empty until the Triton kernels land; `points.attention` is the single dispatch point that will call them.
Nothing here may import Triton at module import time (CUDA-free machines never load it).
"""
