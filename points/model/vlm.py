"""The composed model: vision encoder -> projector -> features spliced into the prompt -> decoder.

    pixel_values [N, 1176], grid_thw [n, 3] -> vision [N, 1280] -> projector [N/4, 3584]
    input_ids [B, L] -> embed [B, L, 3584]; the k-th <|image_pad|> (row-major over the batch) takes
    projector row k -> decoder (positions 0..L-1, image tokens included) -> logits [B, L, vocab] fp32

The model card's `model.chat(...)` call is generation, not math: `points.load` gives a `CardModel`
(points.pipeline), this class with that one method added.
"""

from __future__ import annotations

import torch
from torch import nn

from points.model.config import ModelConfig
from points.model.decoder import Decoder
from points.model.projector import PatchMerger
from points.model.vision import VisionEncoder


class POINTSModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = cfg.image_token_id  # <|image_pad|>: part of the config (`points.load` checks tokenizer.json agrees)
        self.vision = VisionEncoder(cfg.vision)
        self.projector = PatchMerger(cfg)
        self.decoder = Decoder(cfg.decoder)

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
        """[N, 1176] pixels of all images -> [N / 4, hidden] LLM-token features, in prompt order (kernel: the
        vision attention's, "sdpa" or "triton")."""
        pixel_values = pixel_values.to(self.vision.patch_embed.weight.device)
        return self.projector(self.vision(pixel_values, grid_thw, kernel))

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, L, hidden] with the image features written over the <|image_pad|> runs."""
        x = self.decoder.embed(input_ids)
        slots = input_ids == self.image_token_id
        n_slots, n_feats = int(slots.sum()), 0 if features is None else features.shape[0]
        if n_slots != n_feats:
            raise ValueError(f"the prompt has {n_slots} {'<|image_pad|>'} tokens but the images give {n_feats} "
                             "features; each image needs exactly grid_h * grid_w / 4 of them")
        if n_slots:
            x = x.masked_scatter(slots[..., None], features.to(x.dtype))
        return x

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, vocab] (fp32) for the whole sequence, no cache."""
        if (pixel_values is None) != (grid_thw is None):
            raise ValueError("pixel_values and grid_thw go together: give both or neither")
        input_ids = input_ids.to(self.decoder.embed.weight.device)
        features = None if pixel_values is None else self.image_features(pixel_values, grid_thw)
        return self.decoder(embeds=self.embed(input_ids, features))
