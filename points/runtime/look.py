"""A look inside one forward: hidden states after every layer, attention probabilities of chosen layers.

    seen = pipe.look(messages, reply="A cat.", layers=[20, 27], heads=[0, 3], vision_layers=[31])
    seen.hidden[i]             # [L, hidden] float32: the decoder's input (i = 0), then after layer i - 1
    seen.normed                # [L, hidden]: after the final norm (what lm_head reads)
    seen.attentions[27]        # [heads, L, L] float32: row q, column k = p(query q attends to key k)
    seen.vision_hidden[i]      # [N, embed]: the patch embeddings (i = 0), then after vision block i - 1
    seen.vision_attentions[31] # one [heads, n, n] per frame of every image (patches in the processor's order)
    seen.images                # per image: its (t, h, w) grid and the span [start, end) of its tokens in L

One forward over the prompt `chat(messages)` builds (and `reply`, a string or ids, after it), no cache.
Hidden states come from forward hooks on the layers (the modules are untouched); attention probabilities
from the eager path of points.model.attention, taken only by the layers asked for (every other layer
runs its usual kernel). What transformers returns: `output_hidden_states` of Qwen2 is hidden[0..n-1] then
normed (it leaves out the last layer's raw output, which `hidden[n]` is here); its eager `output_attentions`
is `attentions` with every head. Memory: the hidden states are (layers + 1) x L x hidden floats, each
recorded attention layer heads x L x L.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from points.io.chat import build_prompt
from points.model.attention import AttentionMeta


@dataclass
class Look:
    tokens: list[int]  # the whole sequence's ids (prompt, then the reply's)
    reply_start: int  # index in `tokens` of the reply's first token (len(tokens) without a reply)
    images: list[dict]  # per image: {"grid": (t, h, w), "start": i, "end": j} (its <|image_pad|> run)
    hidden: list[torch.Tensor] = field(default_factory=list)
    normed: torch.Tensor | None = None
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_hidden: list[torch.Tensor] = field(default_factory=list)
    vision_attentions: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class Record:
    """An AttentionRecord (points.model.attention) keeping the probabilities of chosen layers and heads."""

    def __init__(self, layers, heads, vision_layers, vision_heads, look: Look):
        self.layers, self.heads = set(layers), heads
        self.vision_layers, self.vision_heads = set(vision_layers), vision_heads
        self.look = look

    def wants(self, part: str, layer: int) -> bool:
        return layer in (self.layers if part == "decoder" else self.vision_layers)

    def keep(self, part: str, layer: int, probs: torch.Tensor, frame: int = 0) -> None:
        if part == "decoder":
            heads = self.heads
            self.look.attentions[layer] = (probs[0] if heads is None else probs[0, heads]).float().cpu()
        else:
            heads = self.vision_heads
            self.look.vision_attentions.setdefault(layer, []).append(
                (probs if heads is None else probs[heads]).float().cpu())


def indices(value, n: int, name: str) -> list[int]:
    """`value` ("all", None or a list of ints, negative from the end) -> sorted indices in [0, n)."""
    if value is None:
        return []
    if value == "all":
        return list(range(n))
    if not isinstance(value, (list, tuple, range)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in value):
        raise ValueError(f"{name}: expected a list of indices, \"all\" or None, got {value!r}")
    out = []
    for i in value:
        if not -n <= i < n:
            raise ValueError(f"{name}: index {i} is out of range (there are {n})")
        out.append(i % n)
    return sorted(set(out))


@torch.inference_mode()
def look(model, tokenizer, processor, messages, reply=None, *, layers="all", heads=None, vision_layers=None,
         vision_heads=None, hidden: bool = True) -> Look:
    """One recorded forward (see the module's docstring). layers / vision_layers: which layers' attention
    to record ("all", a list, or None for none); heads / vision_heads: which heads (None: all)."""
    from points.runtime.scoring import reply_ids

    dcfg, vcfg = model.decoder.cfg, model.vision.cfg
    layers = indices(layers, dcfg.n_layers, "layers")
    vision_layers = indices(vision_layers, vcfg.depth, "vision_layers")
    heads = None if heads is None else indices(heads, dcfg.n_heads, "heads")
    vision_heads = None if vision_heads is None else indices(vision_heads, vcfg.n_heads, "vision_heads")
    prompt = build_prompt(messages, processor)
    ids = prompt.token_ids(tokenizer)
    start = len(ids)
    if reply is not None:
        ids = ids + reply_ids(tokenizer, reply, False, dcfg.vocab_size)
    if len(ids) > dcfg.max_seq_len:
        raise ValueError(f"messages + reply: {len(ids)} tokens exceed the context of {dcfg.max_seq_len} tokens")
    pads = [i for i, t in enumerate(ids) if t == model.image_token_id]
    images, at = [], 0
    for t, h, w in (prompt.grid_thw.tolist() if prompt.grid_thw is not None else []):
        n = t * h * w // vcfg.spatial_merge_size ** 2
        images.append({"grid": (t, h, w), "start": pads[at], "end": pads[at] + n})
        at += n
    seen = Look(ids, start, images)
    record = Record(layers, heads, vision_layers, vision_heads, seen)
    device = model.decoder.embed.weight.device
    hooks, last = [], []
    if hidden:
        def keep(store):
            return lambda module, args, out: store.append(out[0].float().cpu() if out.dim() == 3 else out.float().cpu())

        hooks.append(model.decoder.layers[0].register_forward_pre_hook(
            lambda module, args: seen.hidden.append(args[0][0].float().cpu())))
        hooks += [layer.register_forward_hook(keep(seen.hidden)) for layer in model.decoder.layers]
        hooks.append(model.decoder.layers[-1].register_forward_hook(lambda module, args, out: last.append(out)))
        hooks.append(model.vision.patch_embed.register_forward_hook(keep(seen.vision_hidden)))
        hooks += [block.register_forward_hook(keep(seen.vision_hidden)) for block in model.vision.blocks]
    try:
        features = None
        if prompt.pixel_values is not None:
            from points.model.vision import check_inputs

            pixels = prompt.pixel_values.to(device)
            grid = check_inputs(pixels, prompt.grid_thw, vcfg, model.vision.patch_embed.weight)
            rope, packing = model.vision.layout(grid, device)
            packing = dataclasses.replace(packing, record=record)
            features = model.projector(model.vision.encode(pixels, rope, packing))
        input_ids = torch.tensor([ids], device=device)
        meta = dataclasses.replace(AttentionMeta.no_cache(1, len(ids), device), record=record)
        model.decoder(embeds=model.embed(input_ids, features), meta=meta, last=torch.tensor([len(ids) - 1],
                                                                                          device=device))
    finally:
        for h in hooks:
            h.remove()
    if last:  # (the norm of every row, as lm_head would read it; the forward itself normed the last row only)
        seen.normed = model.decoder.norm(last[0])[0].float().cpu()
    return seen
