"""Rotary position embeddings (1-D, NeoX "rotate half" convention), always in float32.

Channel i and channel i + D/2 of a head form one rotating pair; pair j turns by angle p * inv_freq[j],
inv_freq[j] = theta^(-2j/D). The vision encoder's 2-D variant reuses `apply_rotary` with its own angles.
"""

import torch


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim/2] float32, computed as transformers does (so the tables agree to the bit)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0):
    """cos, sin of shape [*positions.shape, 2 * len(inv_freq)] in float32.

    `scale` multiplies the positions (CustomLlama's rotary_compress; 1.0 for every released model).
    """
    pos = positions.float()
    if scale != 1.0:
        pos = pos * scale
    return cos_sin(pos[..., None] * inv_freq)  # angles [..., D/2]


def cos_sin(angles: torch.Tensor):
    """Angles [..., D/2] (one per rotating pair) -> cos, sin [..., D] (pair j = channels j and j + D/2)."""
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] in any dtype; cos/sin broadcastable float32 [..., D]. Computed in float32, cast back."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
