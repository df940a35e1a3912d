"""points: POINTS-1.5 (WePOINTS/POINTS-1-5-Qwen-2-5-7B-Chat) in plain PyTorch."""

from points.cache import KVCache
from points.checkpoint import convert, load_decoder, load_state_dict, load_vision
from points.config import DecoderConfig, ModelConfig, VisionConfig, read_config
from points.decoder import Decoder
from points.errors import CheckpointError
from points.projector import PatchMerger
from points.vision import VisionEncoder

__all__ = ["CheckpointError", "Decoder", "DecoderConfig", "KVCache", "ModelConfig", "PatchMerger", "VisionConfig",
           "VisionEncoder", "convert", "load_decoder", "load_state_dict", "load_vision", "read_config"]
__version__ = "0.1.0"
