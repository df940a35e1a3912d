"""The transformers reference, built in one place for the parity tests, `points bench` and tools/.

transformers is a test-only dependency: nothing on the runtime path (load, chat, convert, demo) imports this
module. Two ways to build the reference:

- `reference_decoder` / `reference_vision`: transformers' own modules with every parameter re-drawn (biases
  non-zero, norm weights away from one), so that any mapping mistake (a swapped K/V, [up; gate] read as
  [gate; up], a dropped bias) changes the logits; `custom_llama_tensors` writes them out in the released
  checkpoint layout by code written independently of `points.io.checkpoint`, and
  `save_checkpoint` puts them on disk for our loader to read.
- `transformers_decoder` / `transformers_vision`: transformers' modules holding *our* tensors (no copy), to
  time both implementations on the very same weights; `peft_lora`: peft's LoRA on the first, set to our
  adapters.

The transformers configs of a decoder and a vision encoder are written once, from our config dataclasses
(`qwen2_config` / `qwen3_config`, the class a member's decoder needs: `causal_lm`; `vision_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger, Qwen2VisionTransformerPretrainedModel

from points.io.atomic import save_tensors, write_shards
from points.tooling.synthetic import random_value
from points.io.checkpoint import to_hf_state_dict
from points.io.config import from_hf_dict
from points.model.config import DecoderConfig, ModelConfig, VisionConfig
from points.model.family import CUSTOM_LLAMA_7B as REAL_LLM, GUI_G, VISION as REAL_VISION
from points.tooling.synthetic import hf_config

# Tiny shapes derived from the real ones: the same 7:1 query/KV head grouping, ffn/hidden ~ 5.3,
# RMSNorm eps 1e-5 and theta 1e6 from the release; 2 layers, a 1000-token vocabulary.
TINY_LLM = dict(REAL_LLM, vocab_size=1000, hidden_size=224, ffn_hidden_size=1184, num_attention_heads=14,
                num_layers=2, num_hidden_layers=2, num_kv_heads=2)
# vision: the release's head_dim 80 (two heads), 2 blocks
TINY_VISION = dict(REAL_VISION, depth=2, embed_dim=160, hidden_size=224, num_heads=2)


def checkpoint_config(llm: dict = TINY_LLM, vision: dict = TINY_VISION) -> dict:
    """The released checkpoint's config.json for these llm_config / vision_config sections."""
    return hf_config(llm, vision)


def model_config(llm: dict = TINY_LLM, vision: dict = TINY_VISION) -> ModelConfig:
    """Our config for that config.json."""
    return from_hf_dict(checkpoint_config(llm, vision))


# --------------------------------------------------------------------------- transformers configs

def qwen2_config(d: DecoderConfig, **kw) -> Qwen2Config:
    """transformers' Qwen2Config for our decoder: the checkpoint's eps and theta (not Qwen2.5's defaults), its
    head tied as the checkpoint says (POINTS-1.5 never: `embed_out` is stored apart; POINTS-Reader: tied)."""
    return Qwen2Config(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.ffn_size,
                       num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads,
                       num_key_value_heads=d.n_kv_heads, rms_norm_eps=d.norm_eps,
                       max_position_embeddings=d.max_seq_len, tie_word_embeddings=d.tied,
                       rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta}, **kw)


def qwen3_config(d: DecoderConfig, **kw) -> Qwen3Config:
    """transformers' Qwen3Config for our decoder (POINTS-GUI-G's: head_dim given apart, q/k norms, no bias)."""
    return Qwen3Config(vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.ffn_size,
                       num_hidden_layers=d.n_layers, num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads,
                       head_dim=d.head_dim, rms_norm_eps=d.norm_eps, max_position_embeddings=d.max_seq_len,
                       attention_bias=d.qkv_bias, tie_word_embeddings=d.tied,
                       rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta}, **kw)


def causal_lm(d: DecoderConfig, **kw) -> Qwen2ForCausalLM | Qwen3ForCausalLM:
    """The transformers class that runs this decoder, on the meta device (no memory): Qwen3ForCausalLM for a
    decoder with q/k norms (POINTS-GUI-G, VersaViT), Qwen2ForCausalLM otherwise (POINTS-1.5, POINTS-Reader).
    A difference in tensors (a bias, a head_dim) fails `transformers_decoder`'s strict load; the rotary's
    position scale, which no tensor shows, is refused here."""
    if d.rope_scale != 1:
        raise ValueError(f"rope_scale {d.rope_scale}: transformers' Qwen2 / Qwen3 rotary has no position scale")
    cls, cfg = (Qwen3ForCausalLM, qwen3_config(d, **kw)) if d.qk_norm else (Qwen2ForCausalLM, qwen2_config(d, **kw))
    with torch.device("meta"):
        return cls(cfg)


def vision_config(v: VisionConfig, hidden_size: int) -> Qwen2VLVisionConfig:
    """transformers' Qwen2VLVisionConfig for our encoder; hidden_size is its merger's (POINTS' projector's)
    output, the decoder's width."""
    return Qwen2VLVisionConfig(depth=v.depth, embed_dim=v.embed_dim, hidden_size=hidden_size, num_heads=v.n_heads,
                               mlp_ratio=v.mlp_dim // v.embed_dim, patch_size=v.patch_size,
                               temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                               in_channels=v.in_channels, hidden_act="quick_gelu")


# --------------------------------------------------------------------------- re-drawn reference modules

def _redraw(module: torch.nn.Module, seed: int) -> None:
    """The project's random-init rule (synthetic.random_value), wider: weights 0.05, biases 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, device="cpu").to(p.device)
            p.copy_(random_value(name, noise, weight_std=0.05, bias_std=0.1))


def reference_decoder(llm: dict = TINY_LLM, seed: int = 0) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM (eager attention) with the shapes of this llm_config, re-drawn."""
    model = Qwen2ForCausalLM(qwen2_config(model_config(llm).decoder, attn_implementation="eager")).eval()
    _redraw(model, seed)
    return model


# Qwen3-8B's proportions made tiny: head_dim apart from hidden / heads (32, not 160 / 4 = 40), 4 query and 2 KV
# heads, no bias, eps 1e-6, theta 1e6; a 1000-token vocabulary, 2 layers
TINY_QWEN3 = dict(model_type="qwen3", vocab_size=1000, hidden_size=160, intermediate_size=480, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu", rms_norm_eps=1e-6,
                  rope_theta=1000000.0, attention_bias=False, max_position_embeddings=4096, tie_word_embeddings=False)


def reference_qwen3_decoder(llm: dict = TINY_QWEN3, seed: int = 0) -> Qwen3ForCausalLM:
    """transformers' Qwen3ForCausalLM (eager attention) with the shapes of this llm_config, re-drawn (its q/k
    norm weights away from one, so that a norm read from the wrong tensor shows)."""
    decoder = model_config(llm, dict(TINY_VISION, hidden_size=llm["hidden_size"])).decoder
    model = Qwen3ForCausalLM(qwen3_config(decoder, attn_implementation="eager")).eval()
    _redraw(model, seed)
    return model


def gui_config(llm: dict = TINY_QWEN3, vision: dict = TINY_VISION) -> dict:
    """POINTS-GUI-G's config.json (a POINTSGUIConfig dump, SGLang's spelling) for these sections."""
    return hf_config(llm, dict(vision, hidden_size=llm["hidden_size"]), member=GUI_G)


def reference_vision(vision: dict = TINY_VISION, seed: int = 1):
    """The Qwen2-VL vision tower (whose own merger POINTS never runs) and POINTS' separate projector."""
    encoder = Qwen2VisionTransformerPretrainedModel(
        vision_config(model_config(vision=vision).vision, vision["hidden_size"])).eval()
    projector = PatchMerger(dim=vision["hidden_size"], context_dim=vision["embed_dim"]).eval()
    _redraw(encoder, seed)
    _redraw(projector, seed + 1)
    return encoder, projector


def custom_llama_tensors(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """Qwen2 weights in CustomLlama naming and packing (K/V interleaved per KV head, [up; gate]), written out longhand."""
    sd = model.state_dict()
    n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    hd = model.config.hidden_size // model.config.num_attention_heads
    out = {"llm.lm.embed_in.weight": sd["model.embed_tokens.weight"],
           "llm.lm.final_layer_norm.weight": sd["model.norm.weight"],
           "llm.embed_out.weight": sd["lm_head.weight"]}
    for i in range(n_layers):
        p, o = f"model.layers.{i}.", f"llm.lm.layers.{i}."
        out[o + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[o + f"attention.query_dense.{kind}"] = sd[p + f"self_attn.q_proj.{kind}"]
            k, v = sd[p + f"self_attn.k_proj.{kind}"], sd[p + f"self_attn.v_proj.{kind}"]
            rows = []
            for g in range(n_kv):  # [K_0; V_0; K_1; V_1; ...]
                rows += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
            out[o + f"attention.key_value_dense.{kind}"] = torch.cat(rows)
        out[o + "attention.dense.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[o + "mlp.dense_h_to_4h.weight"] = torch.cat([sd[p + "mlp.up_proj.weight"], sd[p + "mlp.gate_proj.weight"]])
        out[o + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def qwen2_tensors(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """The Qwen2 naming of later POINTS releases: `llm.` + transformers' own names."""
    return {f"llm.{k}": v for k, v in model.state_dict().items()}


def vision_tensors(encoder, projector) -> dict[str, torch.Tensor]:
    out = {f"vision_encoder.{k}": v for k, v in encoder.state_dict().items()}
    out.update({f"vision_projector.{k}": v for k, v in projector.state_dict().items()})
    return out


def save_checkpoint(directory: Path, config: dict, tensors: dict[str, torch.Tensor], *, shards: int = 3,
                    dtype: torch.dtype | None = None) -> Path:
    """A checkpoint directory: config.json plus `shards` safetensors files and their index (or one
    model.safetensors when shards == 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in tensors.items()}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    names = sorted(tensors)
    if shards == 1:
        save_tensors(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    weight_map = write_shards(({k: tensors[k] for k in names[s::shards]} for s in range(shards)), directory, shards,
                              {"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def splice_reference(decoder, encoder, projector, input_ids, pixel_values, grid_thw, image_id: int = 151655):
    """POINTS' generate(): embed, then overwrite the j-th maximal run of <|image_pad|> with projector rows
    [S_j, S_j+1), S the running sum of h * w / 4, written out as runs."""
    embeds = decoder.model.embed_tokens(input_ids)
    if pixel_values is None:
        return embeds
    features = projector(encoder(pixel_values, grid_thw).last_hidden_state)
    counts = (grid_thw[:, 1] * grid_thw[:, 2] // 4).tolist()
    row = input_ids[0].tolist()
    runs, i = [], 0
    while i < len(row):
        if row[i] == image_id:
            j = i
            while j < len(row) and row[j] == image_id:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert [b - a for a, b in runs] == counts
    embeds = embeds.clone()
    start = 0
    for (a, b), n in zip(runs, counts):
        embeds[0, a:b] = features[start:start + n]
        start += n
    return embeds


@torch.no_grad()
def greedy_reference(decoder, embeds, steps: int, stop_ids: tuple[int, ...]) -> list[int]:
    """transformers' own KV-cache loop, greedy, stopping at a stop id (not included)."""
    out = decoder(inputs_embeds=embeds, use_cache=True)
    tokens = []
    for _ in range(steps):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        tokens.append(nxt)
        out = decoder(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


# --------------------------------------------------------------------------- transformers on our tensors

def transformers_decoder(decoder) -> Qwen2ForCausalLM | Qwen3ForCausalLM:
    """transformers' model of our decoder's member (`causal_lm`: Qwen3ForCausalLM with its q/k norms, or
    Qwen2ForCausalLM, tied where the checkpoint ties) holding our decoder's very tensors (views, no copy; our
    qkv and up_gate rows split into its q/k/v and up/gate projections). A tied head is transformers' own tie:
    lm_head *is* the embedding there, so ours must hold the embedding's numbers (as `points.load` makes it)."""
    d, embed = decoder.cfg, decoder.embed.weight
    llm = causal_lm(d, dtype=embed.dtype)
    if d.tied:  # (to_hf_state_dict writes a tied head once, as the embedding: the released files' way)
        head = decoder.lm_head.weight
        if head is not embed and not (head.dtype == embed.dtype and torch.equal(head, embed)):
            raise ValueError("transformers_decoder: the decoder is tied (its checkpoint's head is the embedding), "
                             "but its lm_head does not hold the embedding's numbers")
    state = to_hf_state_dict({f"decoder.{k}": t for k, t in decoder.state_dict().items()},
                             ModelConfig(d, _ANY_VISION), naming="qwen3" if d.qk_norm else "qwen2")
    missing, unexpected = llm.load_state_dict({k.removeprefix("llm."): t for k, t in state.items()}, strict=False,
                                              assign=True)
    if unexpected or missing != (["lm_head.weight"] if d.tied else []):
        raise ValueError(f"transformers_decoder: {type(llm).__name__} missing {missing}, unexpected {unexpected}")
    if d.tied:
        llm.tie_weights()  # lm_head.weight = model.embed_tokens.weight, as from_pretrained ties it
    with torch.device(embed.device):  # its rotary table is a non-persistent buffer: build it
        llm.model.rotary_emb = type(llm.model.rotary_emb)(llm.config)
    return llm.eval()


_PEFT_NAMES = (("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("mlp.up_gate", ("mlp.up_proj", "mlp.gate_proj")), ("attn.out", ("self_attn.o_proj",)),
               ("mlp.down", ("mlp.down_proj",)))


def peft_lora(llm: Qwen2ForCausalLM, decoder, rank: int, alpha: float):
    """transformers + peft's LoRA (needs peft) on `llm`, transformers' Qwen2ForCausalLM on our decoder's tensors
    (`transformers_decoder`, built before our adapters were added), on all seven projections, its adapters set
    to our decoder's (LoRA on q, k, v, out, up, gate and down, the same rank and alpha). Returns peft's model
    and the pairs (our adapter tensor, its rows, peft's tensor) that hold the same numbers: our fused A of a
    projection stacks each part's A_p, our B each part's rows of B."""
    from peft import LoraConfig as PeftConfig, get_peft_model

    from points.runtime.lora import lora_layers

    llm.requires_grad_(False)
    modules = sorted({name.split(".")[1] for _, names in _PEFT_NAMES for name in names})
    model = get_peft_model(llm, PeftConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                           target_modules=modules))
    ours, pairs = lora_layers(decoder), []
    for i in range(decoder.cfg.n_layers):
        block = model.base_model.model.model.layers[i]
        for fused, names in _PEFT_NAMES:
            layer = ours[f"layers.{i}.{fused}"]
            if len(layer.parts) != len(names) or layer.rank != rank:
                raise ValueError(f"peft_lora: layers.{i}.{fused} has {len(layer.parts)} adapted part(s) of rank "
                                 f"{layer.rank}; expected {len(names)} of rank {rank} (all seven projections)")
            row = 0
            for p, name in enumerate(names):
                mod, (a, b) = block.get_submodule(name), layer.parts[p]
                pairs.append((layer.lora_a, slice(p * rank, (p + 1) * rank), mod.lora_A["default"].weight))
                pairs.append((layer.lora_b, slice(row, row + b - a), mod.lora_B["default"].weight))
                row += b - a
    with torch.no_grad():
        for mine, rows, theirs in pairs:
            theirs.copy_(mine[rows])
    return model, pairs


def padded_batch(examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`training.Example`s (text only) as a padding collator makes a batch for transformers: the ids
    right-padded to the longest, the attention mask, the labels (-100 off the targets; transformers shifts
    them, as our targets are the tokens predicted from the position before)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100)
    for r, e in enumerate(examples):
        n = len(e.ids)
        ids[r, :n], mask[r, :n] = e.ids, 1
        labels[r, :n][e.targets] = e.ids[e.targets]
    return ids, mask, labels

def transformers_vision(model) -> Qwen2VisionTransformerPretrainedModel:
    """transformers' Qwen2-VL vision tower holding the tensors of our POINTSModel's encoder. The tower always
    runs its own PatchMerger (`pooler_output`), which is the class of POINTS' projector: it takes the
    projector's tensors, so `pooler_output` is the image features."""
    cfg = vision_config(model.cfg.vision, model.cfg.decoder.hidden_size)
    ours = {k: t for k, t in model.state_dict().items() if k.startswith(("vision.", "projector."))}
    state = to_hf_state_dict(ours, model.cfg)  # (the vision tensors are named alike in every member)
    with torch.device("meta"):
        tower = Qwen2VisionTransformerPretrainedModel(cfg)
    take = lambda prefix: {k.removeprefix(prefix): t for k, t in state.items() if k.startswith(prefix)}  # noqa: E731
    tower.load_state_dict(take("vision_encoder.") | {f"merger.{k}": t for k, t in take("vision_projector.").items()},
                          strict=True, assign=True)
    with torch.device(model.vision.patch_embed.weight.device):  # a non-persistent buffer: build it
        tower.rotary_pos_emb = type(tower.rotary_pos_emb)(cfg)
    return tower.eval()


_ANY_VISION = model_config().vision  # the half of a ModelConfig that a decoder-only `to_hf_state_dict` never reads
