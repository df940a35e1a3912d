"""points: POINTS-1.5 (WePOINTS/POINTS-1-5-Qwen-2-5-7B-Chat) in plain PyTorch."""

from points.cache import KVCache
from points.checkpoint import convert, load_decoder, load_state_dict, load_vision
from points.config import DecoderConfig, ModelConfig, VisionConfig, read_config
from points.decoder import Decoder
from points.errors import CheckpointError
from points.generation import GenerationConfig
from points.model import POINTSModel
from points.pipeline import Pipeline, load
from points.processor import ImageProcessor, smart_resize
from points.tokenizer import Tokenizer
from points.projector import PatchMerger
from points.vision import VisionEncoder

__all__ = ["CheckpointError", "Decoder", "DecoderConfig", "GenerationConfig", "ImageProcessor", "KVCache", "ModelConfig",
           "POINTSModel", "PatchMerger", "Pipeline", "Tokenizer", "VisionConfig", "VisionEncoder", "convert", "load",
           "load_decoder", "load_state_dict", "load_vision", "read_config", "smart_resize"]
__version__ = "0.1.0"
