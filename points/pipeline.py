"""The public entry point: `points.load(path)` -> `Pipeline` (model, tokenizer, image processor, engine)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from points.errors import CheckpointError
from points.io.chat import ImageError, Point, build_prompt, preset_of, read_point, with_preset
from points.io.config import checkpoint_dir, read_config
from points.io.processor import ImageProcessor, open_image
from points.io.tokenizer import Tokenizer
from points.loading import build
from points.model.family import Member, Preset, member
from points.model.vlm import POINTSModel
from points.runtime.attention import use_triton
from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig, fitted, prepare
from points.runtime.look import Look, look
from points.runtime.prefix import PrefixCache
from points.runtime.scheduler import MAX_PREFILL_TOKENS, Scheduler, check_prefill_budget
from points.runtime.scoring import Score, score_batch
from points.runtime.speculative import drafter
from points.runtime.vision import FeatureCache


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
        cfg = GenerationConfig.from_card(generation_config)
        prompt, ids = prepare(tokenizer, image_processor, messages, cfg, self.decoder.cfg.max_seq_len)
        return Scheduler(self, tokenizer, max_batch=1).submit(prompt, ids, cfg).text()


class Pipeline:
    """model (the math), tokenizer and processor (text and images in), engine (how the decoder is run:
    eager or compiled; `points.runtime.engine`), scheduler (every request's steps, batched continuously;
    `points.runtime.scheduler`)."""

    def __init__(self, model: POINTSModel, tokenizer: Tokenizer, processor: ImageProcessor,
                 engine: Engine | None = None, prefix_cache: bool | PrefixCache = True, max_batch: int = 8,
                 vision_cache: bool | FeatureCache = True, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 speculative=None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        prefix = prefix_cache if isinstance(prefix_cache, PrefixCache) else PrefixCache() if prefix_cache else None
        features = (vision_cache if isinstance(vision_cache, FeatureCache) else FeatureCache() if vision_cache
                    else None)
        self.scheduler = Scheduler(model, tokenizer, engine or Engine(model.decoder), max_batch=max_batch,
                                   prefix=prefix, vision_cache=features, max_prefill_tokens=max_prefill_tokens,
                                   speculative=speculative)

    @property
    def engine(self) -> Engine:
        """How the decoder runs (eager or compiled); the scheduler's."""
        return self.scheduler.engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self.scheduler.use_engine(engine)

    @property
    def vision_cache(self) -> FeatureCache | None:
        """Image features by content (points.runtime.vision.FeatureCache; `clear()` after changing the vision
        weights in place)."""
        return self.scheduler.vision_cache

    @property
    def prefix(self) -> PrefixCache | None:
        """The K/V of recent requests, reused by every later one (points.runtime.prefix); None when off."""
        return self.scheduler.prefix

    @prefix.setter
    def prefix(self, cache: PrefixCache | None) -> None:
        self.scheduler.prefix = cache

    @property
    def member(self) -> Member:
        """The family member the loaded checkpoint is (points.model.family: its presets, roles, processor)."""
        return member(self.model.cfg.member)

    def preset(self, name: str) -> Preset:
        """This model's preset `name` (points.io.chat.PresetError, naming the presets it has, otherwise)."""
        return preset_of(self.member, name)

    def encode(self, messages: list[dict]) -> Encoded:
        """The reference's prompt for `messages`, tokenized, with its images processed."""
        prompt = build_prompt(messages, self.processor)
        ids = torch.tensor([prompt.token_ids(self.tokenizer)], dtype=torch.long)
        return Encoded(ids, prompt.pixel_values, prompt.grid_thw)

    def submit(self, messages: list[dict], name: str = "conversation", *, preset: str | None = None,
               on_event=None, share_prompt: bool = False, **gen):
        """A conversation queued on the scheduler -> its `Request` (iterate it for the text pieces; `cancel()`).
        The prompt is built and checked here: a bad message or image raises now, naming `name`. on_event:
        called with (request, piece or the end) from the thread that runs the steps. max_new_tokens not given:
        as many as the context leaves, up to 1024 (or the preset's). share_prompt: the prompt goes into the
        prefix cache as soon as it is prefilled, for more requests of the same prompt (several choices).

        `preset`: one of this model's presets (`pipe.member.presets`; another is a PresetError naming them):
        its system turn goes first when the conversation has none, its prompt becomes the text of a user turn
        that carries only images (points.io.chat.with_preset), and its decoding settings are the defaults that
        the keywords given here override."""
        fit = "max_new_tokens" not in gen  # (the caller's: a preset's is a default, fitted like 1024)
        if preset is not None:
            chosen = self.preset(preset)
            messages, gen = with_preset(messages, chosen), dict(chosen.generation) | gen
        cfg, limit = GenerationConfig.from_kwargs(**gen), self.model.decoder.cfg.max_seq_len
        # (fitted, max_new_tokens is at least 1: the room checked for the prompt is that one token's)
        prompt, ids = prepare(self.tokenizer, self.processor, messages, replace(cfg, max_new_tokens=1) if fit else cfg,
                              limit, name)
        if fit:
            cfg = fitted(cfg, len(ids), limit)
        return self.scheduler.submit(prompt, ids, cfg, on_event, share_prompt=share_prompt)

    def chat(self, messages: list[dict], *, stream: bool = False, preset: str | None = None,
             **gen) -> str | Iterator[str]:
        """The reply to one conversation; with stream=True an iterator of text pieces. `preset`: see `submit`
        (`pipe.chat([{"role": "user", "content": [{"type": "image", "image": "page.png"}]}], preset="reader")`
        asks POINTS-Reader its document question, with its decoding settings)."""
        if not isinstance(stream, bool):
            raise TypeError(f"stream: expected True or False, got {type(stream).__name__} {stream!r:.40}")
        request = self.submit(messages, preset=preset, **gen)
        return request.stream() if stream else request.text()

    def chat_batch(self, conversations: list[list[dict]], *, preset: str | None = None, **gen) -> list[str]:
        """One reply per conversation, all queued at once and run together (at most max_batch rows at a time;
        each reply equals, greedy, that conversation's `chat`); `preset` applies to each (see `submit`)."""
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("chat_batch: expected a non-empty list of conversations")
        requests = []
        try:
            for i, messages in enumerate(conversations):
                requests.append(self.submit(messages, f"conversation {i}", preset=preset, **gen))
            return [r.text() for r in requests]
        finally:
            for r in requests:
                if not r.done:
                    r.cancel()

    def locate(self, image, instruction: str, **gen) -> Point:
        """Where in `image` (a path, bytes or PIL image) the element `instruction` names is, asked as POINTS-GUI-G
        is asked: its "gui" preset (its published system prompt, greedy, at most 64 new tokens unless `gen`
        says otherwise) on one user turn [image, instruction]. The reply "(x, y)" is read by
        points.io.chat.parse_point (fractions in [0, 1], or thousandths in 0-1000) and returned as a `Point`:
        x, y in pixels of the image as given (before the processor's resize), nx, ny the fractions, and the
        reply. A reply with no such point raises points.io.chat.PointError (a ValueError holding `.reply`);
        a model without the "gui" preset (any member but POINTS-GUI-G) raises a ValueError."""
        if "gui" not in self.member.presets:
            raise ValueError(f"locate: {self.member.name} is not a grounding model (it has no \"gui\" preset; "
                             "POINTS-GUI-G has)")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"locate: instruction: expected a non-empty string, got {instruction!r:.40}")
        try:
            picture = open_image(image)  # (once: its size here, its pixels for the processor)
        except ValueError as e:
            raise ImageError("locate: image", str(e)) from None
        messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": instruction}]}]
        return read_point(self.submit(messages, "locate", preset="gui", **gen).text(), picture.size)

    def score(self, messages: list[dict], reply, end: bool = True) -> Score:
        """The log-probability of `reply` (a string, or a list of ids) after `messages`, token by token
        (points.runtime.scoring); end=True also scores the closing <|im_end|>."""
        return score_batch(self.model, self.tokenizer, self.processor, [(messages, reply)], end=end,
                           attn=self.engine.attn, alone=True)[0]

    def score_batch(self, pairs: list, end: bool = True) -> list[Score]:
        """One Score per (messages, reply) pair, from one padded forward."""
        return score_batch(self.model, self.tokenizer, self.processor, pairs, end=end, attn=self.engine.attn)

    def look(self, messages: list[dict], reply=None, **record) -> Look:
        """One forward with its hidden states and chosen attention probabilities recorded
        (points.runtime.look: layers=, heads=, vision_layers=, vision_heads=, hidden=)."""
        with self.scheduler.paused():  # (its hooks sit on the shared modules: no step may run meanwhile)
            return look(self.model, self.tokenizer, self.processor, messages, reply, **record)


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
         quantize_lm_head: bool | None = None, quantize_group_size: int | None = None,
         quantize_symmetric: bool | None = None, prefix_cache: bool = True, max_batch: int = 8,
         adapter: str | Path | None = None, vision_cache_mb: float = 256,
         max_prefill_tokens: int = MAX_PREFILL_TOKENS, speculative: str | None = None) -> Pipeline:
    """A POINTS-1.5 checkpoint directory (released layout or ours) -> Pipeline, on `device` in `dtype`
    (None keeps the checkpoint's dtype).

    The weight files are memory-mapped: on the CPU, tensors that need no cast and no re-layout are used in
    place from the files, so those files must not change while the model is in use. `attn` (vision
    attention and decoder prefill): "sdpa" (PyTorch), "triton" (the Triton varlen kernels; CUDA, or Triton's
    CPU interpreter) or "auto" (on CUDA, per call, whichever measured faster for the shapes; SDPA elsewhere;
    see points.runtime.attention). `compile=True` runs the one-token decode step through
    torch.compile (CUDA graphs on CUDA).

    `quantize="int8"`: the decoder's projections become weight-only int8 (one scale per output channel;
    points.runtime.quantize); `quantize="int4"`: weight-only int4 in groups of `quantize_group_size` inputs
    (32, 64 or 128, default 128) with a scale and an offset per group (`quantize_symmetric=True`: a scale
    only); `quantize_lm_head=True` the output projection too. The vision encoder and projector stay in
    `dtype`. Quantized while read: the float weights are never held whole. A checkpoint written by `points
    convert --quantize ...` loads quantized without these arguments (memory-mapped, nothing re-quantized).

    `prefix_cache=True` (default): every request leaves its K/V in a cache of recent ones (an LRU bounded
    to 16384 tokens, points.runtime.prefix) and a request that starts like an earlier one (the same
    conversation continued, a shared system text, the same images) prefills only what is new;
    `pipe.prefix.clear()` forgets it, `prefix_cache=False` turns it off. `vision_cache_mb` (default 256; 0 turns
    it off): image features kept by the image's content and pixels (points.runtime.vision.FeatureCache), so an
    image asked about again, in any conversation, skips the vision encoder. `max_batch`: rows the scheduler
    decodes at once (requests beyond it wait for a free row). `max_prefill_tokens` (default 512): prompt tokens
    one scheduler step prefills, prompts admitted together in one forward; a longer prompt is prefilled in
    chunks between the running rows' tokens (points.runtime.scheduler). `speculative="ngram"` (or "ngram:K"):
    every request's default (`pipe.chat(..., speculative=)` overrides it, "off" too) drafts K tokens (4)
    from n-gram matches in its prompt and its output, verified in one forward (points.runtime.speculative):
    greedy output is the same, sampled output has the same distribution.

    `adapter`: a LoRA adapter directory (`points finetune`'s output) applied on top (points.runtime.lora: the
    base weights stay as loaded, each adapted projection adds its low-rank update); it is checked against this
    checkpoint (config.json and the weights' fingerprint it recorded) and refused, naming what differs, when it
    was trained on another one: its adapters train, the base is frozen (peft's rule). Without one every float
    parameter trains as in any nn.Module (`pipe.model.train()`, then autograd); generation, scoring and `look`
    run under inference_mode, and a direct `pipe.model(...)` for inference belongs under `torch.no_grad()`."""
    drafter(speculative)  # (a bad value fails before any loading)
    check_prefill_budget(max_prefill_tokens)
    if not (isinstance(vision_cache_mb, (int, float)) and not isinstance(vision_cache_mb, bool)
            and 0 <= vision_cache_mb < 1 << 30):
        raise ValueError(f"vision_cache_mb = {vision_cache_mb!r}: expected a number of MiB >= 0 (0: no cache)")
    device = resolve_device(device)
    path = checkpoint_dir(path)
    use_triton(attn, device)  # a forced backend that cannot run fails here, before any loading
    config = read_config(path)  # (once: every step below takes it)
    tokenizer = Tokenizer(path)
    config = config.with_tokenizer(tokenizer.image_pad_id, path / "tokenizer.json")
    processor = ImageProcessor.from_dir(path, rules=config.member.processor,  # the member's own resize rules
                                        item_max_pixels=config.member.item_max_pixels)
    model = build(config, CardModel, parts=("decoder", "vision", "projector"),
                  prefix="", dtype=dtype, device=device, progress=progress, quantize=quantize,
                  quantize_lm_head=quantize_lm_head, quantize_group_size=quantize_group_size,
                  quantize_symmetric=quantize_symmetric)
    if adapter is not None:
        from points.runtime.lora import load_adapter

        load_adapter(model, adapter, (path / "config.json").read_bytes())  # base frozen, adapters trainable
    vision = FeatureCache(int(vision_cache_mb * (1 << 20))) if vision_cache_mb > 0 else False
    return Pipeline(model, tokenizer, processor, Engine(model.decoder, compile=compile, attn=attn),
                    prefix_cache=prefix_cache, max_batch=max_batch, vision_cache=vision,
                    max_prefill_tokens=max_prefill_tokens, speculative=speculative)
