"""The projector: Qwen2-VL's PatchMerger, trained from scratch by POINTS (`vision_projector` in the release).

    vision features [N, 1280] -> LayerNorm -> [N/4, 5120] (each 2x2 spatial-merge window concatenated; the
    processor's row order puts its 4 patches next to each other) -> Linear 5120 -> 5120 -> GELU (exact erf)
    -> Linear 5120 -> hidden (3584) = one LLM token per window.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from points.model.config import ModelConfig
from points.model.vision import LayerNorm


class PatchMerger(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.window = cfg.vision.spatial_merge_size ** 2
        self.norm = LayerNorm(cfg.vision.embed_dim, eps=cfg.vision.norm_eps)
        self.fc1 = nn.Linear(cfg.merge_dim, cfg.merge_dim, bias=True)
        self.fc2 = nn.Linear(cfg.merge_dim, cfg.decoder.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, embed_dim] -> [N / window, hidden]."""
        if x.dim() != 2 or x.shape[1] != self.norm.normalized_shape[0] or x.shape[0] % self.window:
            raise ValueError(f"projector input: expected [N, {self.norm.normalized_shape[0]}] with N a multiple "
                             f"of {self.window} (whole spatial-merge windows), got {list(x.shape)}")
        x = rearrange(self.norm(x), "(n w) e -> n (w e)", w=self.window)  # the window's features side by side
        return self.fc2(F.gelu(self.fc1(x)))
