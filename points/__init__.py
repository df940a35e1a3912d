"""points: POINTS-1.5 (WePOINTS/POINTS-1-5-Qwen-2-5-7B-Chat) in plain PyTorch.

    points/model/     the math: config dataclasses, rope, attention and its metadata, the KV cache, decoder,
                      vision encoder, projector, POINTSModel
    points/io/        files: config.json, checkpoints (read, checked, the one name mapping, convert), image
                      processor, tokenizer, chat template, atomic writes, the stored int8 / int4 formats
    points/runtime/   running it: which attention kernel, sampling, the engine, generation, the linear plan
                      (int8 / int4 layers, CPU kernels)
    points/loading.py   the model built from a checkpoint (points.load, load_decoder, load_vision)
    points/pipeline.py  points.load -> Pipeline
    points/tooling/   the command line, benchmarks, random checkpoints, the transformers reference, demo

The names below, and every module of the package (`points.runtime.layout`), are imported on first use, so
that `import points` costs nothing until one is used and the command line answers `--help` without torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "points.errors", "convert": "points.io.checkpoint", "load_state_dict": "points.io.checkpoint",
    "read_config": "points.io.config", "ImageProcessor": "points.io.processor", "smart_resize": "points.io.processor",
    "Tokenizer": "points.io.tokenizer", "load_decoder": "points.loading", "load_vision": "points.loading",
    "DecoderConfig": "points.model.config", "ModelConfig": "points.model.config", "VisionConfig": "points.model.config",
    "Decoder": "points.model.decoder", "PatchMerger": "points.model.projector", "VisionEncoder": "points.model.vision",
    "POINTSModel": "points.model.vlm", "KVCache": "points.model.cache", "Pipeline": "points.pipeline",
    "load": "points.pipeline", "Engine": "points.runtime.engine", "GenerationConfig": "points.runtime.generation",
}
__all__ = sorted(_EXPORTS)


def submodules(package: str):
    """A package's module `__getattr__` (PEP 562): `package.name` imports the submodule `name` on first use,
    as if the user had imported it; any other missing name is an AttributeError, as usual."""

    def __getattr__(name: str):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    return _submodule(name)


_submodule = submodules(__name__)
