"""The vision encoder: Qwen2-VL's NaViT ViT, run as POINTS runs it (no final norm, no merger).

    pixel_values [L, 1176]  (rows from the image processor: one 2x14x14 RGB patch each, (c, t, y, x) order)
      -> patch_embed (the Conv3d kernel [1280, 3, 2, 14, 14] as one Linear 1176 -> 1280, no bias)
      -> 32 x ( x + Attn(LayerNorm(x)),  x + MLP(LayerNorm(x)) )
      -> [L, 1280]

Any number of images (or t-frame videos) of any size are packed into one sequence; `grid_thw` [n, 3] gives
each one's (t, h, w) in 14-px patches. Attention is block-diagonal: each frame of each image attends only to
itself. Rows of one image come in 2x2 spatial-merge order (windows in raster order, patches in raster
order inside a window), which the 2-D rotary embedding follows: channels 0..19 and 40..59 of a head turn
with the patch's row, 20..39 and 60..79 with its column (theta 10000, float32).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from points.model.attention import Packing, varlen_attention
from points.model.config import VisionConfig
from points.model.rope import apply_rotary, cos_sin, inv_freq


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and rounded once to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def patch_positions(grid_thw: list[tuple[int, int, int]], merge: int, device=None) -> torch.Tensor:
    """[L, 2] (row, column) of every patch, in the processor's spatial-merge order, frames repeated."""
    out = []
    for t, h, w in grid_thw:
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        rc = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
        # windows of m x m patches in raster order, raster order inside each window
        rc = rearrange(rc, "(wh mh) (ww mw) c -> (wh ww mh mw) c", mh=merge, mw=merge)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


def rotary_angles(grid_thw: list[tuple[int, int, int]], cfg: VisionConfig, device=None) -> torch.Tensor:
    """[L, head_dim / 2] float32: the row angles (head_dim / 4 of them), then the column angles."""
    freqs = inv_freq(cfg.head_dim // 2, cfg.rope_theta, device)  # [head_dim / 4]
    pos = patch_positions(grid_thw, cfg.spatial_merge_size, device)
    return (pos.float()[..., None] * freqs).flatten(1)


def frame_bounds(grid_thw: list[tuple[int, int, int]]) -> list[int]:
    """cu_seqlens as a host list: 0, then the running end of every frame of every image."""
    bounds = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # which block (for a record of the attention: points.model.attention)
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)  # rows [q; k; v]
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], packing: Packing):
        q, k, v = rearrange(self.qkv(x), "l (qkv h d) -> qkv l h d", qkv=3, d=self.head_dim)  # [L, H, D] each
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = varlen_attention(q, k, v, packing, self.layer)  # each frame attends to itself only
        return self.proj(rearrange(y, "l h d -> l (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim, bias=True)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim, bias=True)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, layer: int = 0):
        super().__init__()
        self.norm1 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg, layer)
        self.norm2 = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, rope, packing):
        x = x + self.attn(self.norm1(x), rope, packing)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg, i) for i in range(cfg.depth))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
        """pixel_values [L, patch_dim] (any float dtype; cast to the encoder's), grid_thw [n, 3] -> [L, embed_dim].
        kernel: the attention kernel, "sdpa" or "triton" (points.model.attention)."""
        grid = check_inputs(pixel_values, grid_thw, self.cfg, self.patch_embed.weight)
        rope, packing = self.layout(grid, pixel_values.device, kernel)
        return self.encode(pixel_values, rope, packing)

    def layout(self, grid: list[tuple[int, int, int]], device=None, kernel: str = "sdpa"):
        """What every block shares for these images: the rotary tables cos, sin [L, 1, head_dim] (float32, one
        table for every head) and the frames' packing (their bounds, the kernel)."""
        cos, sin = cos_sin(rotary_angles(grid, self.cfg, device))
        return (cos[:, None], sin[:, None]), Packing.of(frame_bounds(grid), device, kernel)

    def encode(self, pixel_values: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               packing: Packing) -> torch.Tensor:
        """The encoder's math on checked inputs: patch embedding, then the blocks. `packing` from `layout`,
        or with device bounds only (as a CUDA graph replays them: points.runtime.vision)."""
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [L, E]
        for block in self.blocks:
            x = block(x, rope, packing)
        return x


def check_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, cfg: VisionConfig,
                 weight: torch.Tensor) -> list[tuple[int, int, int]]:
    """Validate the encoder's inputs; return grid_thw as a host list of (t, h, w)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
        shape = list(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values: expected a tensor [L, {cfg.patch_dim}] (one {cfg.in_channels}x"
                         f"{cfg.temporal_patch_size}x{cfg.patch_size}x{cfg.patch_size} patch per row), got {shape}")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values: expected a floating tensor, got {pixel_values.dtype}")
    if pixel_values.device != weight.device:
        raise ValueError(f"pixel_values is on {pixel_values.device} but the vision encoder is on {weight.device}")
    if (not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3
            or grid_thw.is_floating_point() or grid_thw.shape[0] == 0):
        shape = list(grid_thw.shape) if isinstance(grid_thw, torch.Tensor) else type(grid_thw).__name__
        raise ValueError(f"grid_thw: expected an integer tensor [n_images, 3] of (t, h, w) rows, got {shape}")
    grid = [tuple(row) for row in grid_thw.tolist()]
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: every entry must be >= 1")
        if h % m or w % m:
            raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: h and w must be divisible by the spatial merge "
                             f"size {m}")
    total = sum(t * h * w for t, h, w in grid)
    if total != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {total} patches (sum of t*h*w) but pixel_values has "
                         f"{pixel_values.shape[0]} rows")
    return grid
