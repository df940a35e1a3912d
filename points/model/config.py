"""Model configuration: what the modules are built from.

Three frozen dataclasses: `DecoderConfig` (the Qwen2.5 / Qwen3 language model), `VisionConfig` (the Qwen2-VL NaViT
encoder) and `ModelConfig` (both, plus the projector, which has no free parameters of its own). Values are
type- and range-checked on construction, so that a bad value names its field instead of failing deep in a
module. Reading them from a checkpoint's config.json (the released vocabularies and ours) is
`points.io.config`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from points.errors import CheckpointError


class ConfigError(CheckpointError):
    """A value the modules cannot be built from. `values` holds the fields involved (this module's names) and
    `template` says what is wrong with `{field}` where each is named: `render` spells them in a config file's
    own names (points.io.config does, so that the message names what the file says)."""

    def __init__(self, section: str, template: str, **values):
        self.section, self.template, self.values = section, template, values
        super().__init__(self.render())

    def render(self, names: dict[str, str] | None = None, where: str | None = None) -> str:
        """names: this module's field -> how to spell it, a pattern with {value} (default "field = {value}")."""
        names = names or {}
        spelled = {k: names.get(k, f"{k} = {{value}}").format(value=repr(v)) for k, v in self.values.items()}
        return f"{where if where is not None else self.section}: {self.template.format(**spelled)}"


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    norm_eps: float
    rope_theta: float
    rope_scale: float  # positions are multiplied by this before the angles (CustomLlama rotary_compress)
    max_seq_len: int
    qkv_bias: bool
    out_bias: bool
    ffn_up_bias: bool  # bias of the fused gate/up projection
    ffn_down_bias: bool
    head_dim: int | None = None  # per head; None: hidden_size / n_heads (Qwen2), given apart in Qwen3 (128 at 4096 / 32)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each q and k head (weight [head_dim]) before the rotary
    tied: bool = False  # the checkpoint's lm_head is its embedding matrix (POINTS-Reader); read from it when loading

    def __post_init__(self):
        _validate(self, "decoder")
        derived = self.head_dim is None
        if derived:
            if self.hidden_size % self.n_heads:
                raise ConfigError("decoder", "{hidden_size} is not divisible by {n_heads}",
                                  hidden_size=self.hidden_size, n_heads=self.n_heads)
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError("decoder", "{n_heads} is not a multiple of {n_kv_heads}", n_heads=self.n_heads,
                              n_kv_heads=self.n_kv_heads)
        if self.head_dim % 2 and derived:
            raise ConfigError("decoder", f"{{hidden_size}} / {{n_heads}} gives head_dim {self.head_dim}, which must be "
                              "even for rotary embeddings", hidden_size=self.hidden_size, n_heads=self.n_heads)
        if self.head_dim % 2:
            raise ConfigError("decoder", "{head_dim}: must be even for rotary embeddings", head_dim=self.head_dim)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    n_heads: int
    mlp_ratio: float
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    norm_eps: float = 1e-6  # fixed in Qwen2-VL's vision blocks, not a config field there
    rope_theta: float = 10000.0  # fixed in Qwen2-VL's VisionRotaryEmbedding

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:  # one row of pixel_values: (c, t, y, x)
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def __post_init__(self):
        _validate(self, "vision")
        if self.embed_dim % self.n_heads:
            raise ConfigError("vision", "{embed_dim} is not divisible by {n_heads}", embed_dim=self.embed_dim,
                              n_heads=self.n_heads)
        if self.head_dim % 4:
            raise ConfigError("vision", f"{{embed_dim}} / {{n_heads}} gives head_dim {self.head_dim}, which must be a "
                              "multiple of 4 (2-D rotary)", embed_dim=self.embed_dim, n_heads=self.n_heads)


@dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig
    vision: VisionConfig
    member: str = "points-1.5"  # the family member it is (points.model.family): its presets, processor, roles
    image_token_id: int = 151655  # <|image_pad|>, whose runs the image features replace (every member's)

    def __post_init__(self):
        if not isinstance(self.member, str) or not self.member:
            raise ConfigError("model", "{member}: expected a member's name", member=self.member)
        if not isinstance(self.image_token_id, int) or isinstance(self.image_token_id, bool) or self.image_token_id < 0:
            raise ConfigError("model", "{image_token_id}: expected a token id (an integer >= 0)",
                              image_token_id=self.image_token_id)

    @property
    def merge_dim(self) -> int:  # projector input: one spatial-merge window of vision features
        return self.vision.embed_dim * self.vision.spatial_merge_size ** 2


def _validate(cfg, section: str) -> None:
    """Type and range checks, so that a bad value names its field instead of failing deep in a module."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        want = f.type if isinstance(f.type, str) else f.type.__name__
        if want.endswith(" | None"):  # optional: absent, or a value of its type
            if v is None:
                continue
            want = want.removesuffix(" | None")
        ok = {"int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
              "bool": isinstance(v, bool)}[want]
        if not ok:
            expected = {"int": "a positive integer", "float": "a positive number", "bool": "true or false"}[want]
            raise ConfigError(section, f"{{{f.name}}}: expected {expected}", **{f.name: v})
