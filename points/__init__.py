"""points: POINTS-1.5 (WePOINTS/POINTS-1-5-Qwen-2-5-7B-Chat) in plain PyTorch.

    points/model/     the math: config dataclasses, rope, attention and its metadata, the KV cache, decoder,
                      vision encoder, projector, POINTSModel
    points/io/        files: config.json, checkpoints (read, checked, the one name mapping, convert), image
                      processor, tokenizer, chat template, atomic writes, the stored int8 format
    points/runtime/   running it: which attention kernel, sampling, the engine, generation, int8 modules
    points/loading.py   the model built from a checkpoint (points.load, load_decoder, load_vision)
    points/pipeline.py  points.load -> Pipeline
    points/tooling/   the command line, benchmarks, random checkpoints, the transformers reference, demo
"""

from points.errors import CheckpointError
from points.io.checkpoint import convert, load_state_dict
from points.io.config import read_config
from points.io.processor import ImageProcessor, smart_resize
from points.io.tokenizer import Tokenizer
from points.loading import load_decoder, load_vision
from points.model.config import DecoderConfig, ModelConfig, VisionConfig
from points.model.decoder import Decoder
from points.model.projector import PatchMerger
from points.model.vision import VisionEncoder
from points.model.vlm import POINTSModel
from points.model.cache import KVCache
from points.pipeline import Pipeline, load
from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig

__all__ = ["CheckpointError", "Decoder", "DecoderConfig", "Engine", "GenerationConfig", "ImageProcessor", "KVCache",
           "ModelConfig", "POINTSModel", "PatchMerger", "Pipeline", "Tokenizer", "VisionConfig", "VisionEncoder",
           "convert", "load", "load_decoder", "load_state_dict", "load_vision", "read_config", "smart_resize"]
__version__ = "0.1.0"
