"""The public entry point: `points.load(path)` -> `Pipeline` (model, tokenizer, image processor, engine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from points.errors import CheckpointError
from points.io.chat import build_prompt
from points.io.config import checkpoint_dir
from points.io.processor import ImageProcessor
from points.io.tokenizer import Tokenizer
from points.loading import build
from points.model.vlm import POINTSModel
from points.runtime.attention import use_triton
from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig, chat, chat_stream
from points.runtime.prefix import PrefixCache


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [1, L] int64
    pixel_values: torch.Tensor | None  # [N, 1176] float32
    grid_thw: torch.Tensor | None  # [n_images, 3] int64


class CardModel(POINTSModel):
    """`POINTSModel` with the model card's call, what `points.load` builds (its state is POINTSModel's)."""

    def chat(self, messages, tokenizer, image_processor, generation_config: dict | None = None) -> str:
        """The model card's call: `model.chat(messages, tokenizer, image_processor, generation_config)`.

        Takes the card's dict (`max_new_tokens`, `temperature`, `top_p`, `num_beams=1`); temperature 0 or
        absent means greedy, as the reference (which never sets do_sample) always decodes."""
        return chat(self, tokenizer, image_processor, [messages], GenerationConfig.from_card(generation_config))[0]


class Pipeline:
    """model (the math), tokenizer and processor (text and images in), engine (how the decoder is run:
    eager or compiled; `points.runtime.engine`)."""

    def __init__(self, model: POINTSModel, tokenizer: Tokenizer, processor: ImageProcessor,
                 engine: Engine | None = None, prefix_cache: bool | PrefixCache = True):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.engine = engine or Engine(model.decoder)
        # the K/V of recent conversations, reused by `chat` (points.runtime.prefix); None when turned off
        self.prefix = (prefix_cache if isinstance(prefix_cache, PrefixCache)
                       else PrefixCache() if prefix_cache else None)

    def encode(self, messages: list[dict]) -> Encoded:
        """The reference's prompt for `messages`, tokenized, with its images processed."""
        prompt = build_prompt(messages, self.processor)
        ids = torch.tensor([prompt.token_ids(self.tokenizer)], dtype=torch.long)
        return Encoded(ids, prompt.pixel_values, prompt.grid_thw)

    def chat(self, messages: list[dict], *, stream: bool = False, **gen) -> str | Iterator[str]:
        """The reply to one conversation; with stream=True an iterator of text pieces."""
        cfg = GenerationConfig.from_kwargs(**gen)
        if stream:
            return chat_stream(self.model, self.tokenizer, self.processor, messages, cfg, self.engine, self.prefix)
        return chat(self.model, self.tokenizer, self.processor, [messages], cfg, self.engine, self.prefix)[0]

    def chat_batch(self, conversations: list[list[dict]], **gen) -> list[str]:
        """One reply per conversation, run as one batch (rows of different lengths and image counts)."""
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("chat_batch: expected a non-empty list of conversations")
        return chat(self.model, self.tokenizer, self.processor, conversations, GenerationConfig.from_kwargs(**gen),
                    self.engine)


def resolve_device(device: str | torch.device) -> torch.device:
    """A device this machine has, as a torch.device (else CheckpointError naming it)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device {device!r} is not a valid torch device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CheckpointError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         progress: bool | None = None, attn: str = "auto", compile: bool = False, quantize: str | None = None,
         quantize_lm_head: bool | None = None, prefix_cache: bool = True) -> Pipeline:
    """A POINTS-1.5 checkpoint directory (released layout or ours) -> Pipeline, on `device` in `dtype`
    (None keeps the checkpoint's dtype).

    The weight files are memory-mapped: on the CPU, tensors that need no cast and no re-layout are used in
    place from the files, so those files must not change while the model is in use. `attn` (vision
    attention and decoder prefill): "sdpa" (PyTorch), "triton" (the Triton varlen kernels; CUDA, or Triton's
    CPU interpreter) or "auto" (on CUDA, per call, whichever measured faster for the shapes; SDPA elsewhere;
    see points.runtime.attention). `compile=True` runs the one-token decode step through
    torch.compile (CUDA graphs on CUDA).

    `quantize="int8"`: the decoder's projections become weight-only int8 (one scale per output channel;
    points.runtime.quantize), `quantize_lm_head=True` the output projection too; the vision encoder and
    projector stay in `dtype`. A checkpoint written by `points convert --quantize int8` loads quantized
    without these arguments (memory-mapped, nothing re-quantized).

    `prefix_cache=True` (default): `chat` keeps the K/V of recent conversations (an LRU bounded to 16384
    tokens, points.runtime.prefix) and a call that starts like an earlier one (the same conversation
    continued, a shared system text, the same images) prefills only what is new; `pipe.prefix.clear()`
    forgets it, `prefix_cache=False` turns it off. `chat_batch` does not use it."""
    device = resolve_device(device)
    path = checkpoint_dir(path)
    use_triton(attn, device)  # a forced backend that cannot run fails here, before any loading
    tokenizer = Tokenizer(path)
    processor = ImageProcessor.from_dir(path)
    model = build(path, lambda cfg: CardModel(cfg, tokenizer.image_pad_id), parts=("decoder", "vision", "projector"),
                  prefix="", dtype=dtype, device=device, progress=progress, quantize=quantize,
                  quantize_lm_head=quantize_lm_head)
    return Pipeline(model, tokenizer, processor, Engine(model.decoder, compile=compile, attn=attn),
                    prefix_cache=prefix_cache)
