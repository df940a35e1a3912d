"""Which attention kernel runs: the measured rule behind `attn="auto"`, and the checks of a forced choice.

The model computes attention with whichever kernel its per-forward metadata names (`points.model.attention`:
"sdpa" or "triton"); whoever runs the model (the engine, the vision runner, generation) asks this module
which one, from the user's `attn` ("sdpa" and "triton" force one; "auto" is the rule below) and the shapes
of that forward.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "sdpa", "triton")

# attn="auto" on CUDA chooses per call, from the shapes, whichever measured faster (tools/tune_attention.py and
# tools/probe_vision.py on an H200, bf16, 2026-11-27; figures in docs/benchmarks.md; applied to every CUDA device):
# - vision: Triton (one launch for every segment) when the longest segment has at most VISION_TRITON_SHORT
#   patches (the kernel alone is 0.75x SDPA on one 1024-patch image, but the whole 448x448 encode is 1.6x
#   faster without the per-segment launches), or when there are at least VISION_TRITON_MANY[0] segments of
#   at most VISION_TRITON_MANY[1] (64 x 256: 19x, 16 x 1024: 2.4x, 4 x 1024: 1.65x, 8 x 2048: 1.03x);
#   SDPA's flash kernel on fewer or longer segments (2 x 2048: 0.96x, 4 x 4096: 0.97x, 1 x 16384: 0.95x).
# - decoder prefill from an empty cache: SDPA's causal flash kernel (Triton through the cache measured 0.19x,
#   0.46x, 0.66x at 512, 2048, 8192 tokens); after cached tokens (SDPA needs an explicit mask there): Triton
#   from PREFILL_CACHED_TRITON new tokens on (2048 after 2048: 1.81x; 512 after 1024: 0.91x, so SDPA below).
VISION_TRITON_SHORT = 1024
VISION_TRITON_MANY = (4, 2048)
PREFILL_CACHED_TRITON = 1024


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn = {backend!r}: expected one of {BACKENDS}")
    return backend


@functools.cache
def triton_installed() -> bool:
    """Looked up once: the choice is made on every prefill and every vision forward."""
    return importlib.util.find_spec("triton") is not None


def auto_vision(longest: int, segments: int) -> bool:
    """attn="auto"'s choice for packed vision attention on CUDA: True = Triton."""
    many, at_most = VISION_TRITON_MANY
    return longest <= VISION_TRITON_SHORT or (segments >= many and longest <= at_most)


def auto_prefill(n_new: int, fresh: bool) -> bool:
    """attn="auto"'s choice for a decoder prefill of n_new tokens per row on CUDA: True = Triton."""
    return not fresh and n_new >= PREFILL_CACHED_TRITON


def use_triton(backend: str, device: torch.device, faster: bool = False) -> bool:
    """'sdpa' / 'triton' force one; 'auto' is Triton on CUDA, when installed, where `faster` (the caller's
    auto_vision / auto_prefill for its shapes) says it measured faster. Forcing Triton without it (or without
    CUDA, outside Triton's CPU interpreter) is a clear error."""
    check_backend(backend)
    have_triton = triton_installed()
    if backend == "triton":
        if not have_triton:
            raise ValueError("attn = 'triton' but Triton is not installed (pip install 'points[triton]')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attn = 'triton' needs CUDA tensors, got {device} (or set TRITON_INTERPRET=1 to "
                             "run the kernels in Triton's CPU interpreter)")
        return True
    return backend == "auto" and faster and device.type == "cuda" and have_triton


def prefill_kernel(attn: str, device: torch.device, n_new: int, fresh: bool) -> str:
    """The kernel of a decoder prefill of n_new tokens per row ("sdpa" for one-token steps)."""
    return "triton" if n_new > 1 and use_triton(attn, device, auto_prefill(n_new, fresh)) else "sdpa"


def vision_kernel(attn: str, device: torch.device, bounds: list[int]) -> str:
    """The kernel of packed vision attention over frames with these cu_seqlens bounds."""
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return "triton" if use_triton(attn, device, auto_vision(longest, len(bounds) - 1)) else "sdpa"
