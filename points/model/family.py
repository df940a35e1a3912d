"""The POINTS family, as data: one `Member` entry per released model, and nothing here runs.

A member says how its config.json is recognised (the top-level `model_type` and the llm_config's), which
tensor naming and config vocabulary its files use (`naming`: a key of points.io.names.NAMINGS and of
points.io.config's readers), which image processor rules it was trained with, which roles its template
takes, its named presets (a prompt, a system turn, decoding defaults) and its sizes (gpt-fast's `from_name`:
the released shapes and small synthetic ones, spelled as the member's own config.json spells them).

    member_of("pointsv1.5_chat", "qwen2")   -> READER
    size("reader-tiny")                     -> (READER, {llm_config...}, {vision_config...})
    READER.presets["reader"].generation     -> {"max_new_tokens": 2048, "repetition_penalty": 1.05, ...}

Adding a member is one entry in MEMBERS (and its tests); a member whose decoder uses a naming not yet known
adds that naming's table to points.io.names as well. Facts and their sources: ../shared/spec/family.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from points.errors import CheckpointError


@dataclass(frozen=True)
class Preset:
    """A member's documented way of being asked: `prompt` is the user text a turn that carries only images
    gets, `system` the system turn a conversation without one gets, `generation` the decoding defaults (any
    setting the caller gives wins)."""

    name: str
    about: str
    prompt: str | None = None
    system: str | None = None
    generation: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Member:
    name: str  # how the project names it: `points.load(...).member`, /v1/models, --preset's owner
    title: str  # the release's own name
    model_type: str  # config.json's top-level model_type
    naming: str  # the llm_config's model_type: the tensor names and config vocabulary of the decoder
    architectures: tuple[str, ...]  # config.json's, as the release writes them
    processor: str  # "points": POINTS-1.5's Qwen2ImageProcessorForPOINTSV15; "qwen2vl": transformers' stock one
    ties: str  # "never" (POINTS-1.5's loader) or "official" (transformers 4.5x: the flags of family.md)
    roles: tuple[str, ...]  # the roles its official chat() takes (points takes system everywhere, an extension)
    presets: MappingProxyType  # name -> Preset
    sizes: MappingProxyType  # size name -> (llm_config, vision_config), the member's config.json spelling
    top_level: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # config.json keys besides
    # an image item's own max_pixels: "bounds" (the processor's bound for that image, as Qwen-VL users send it) or
    # "prefit" (POINTS-Reader's chat: an image over it shrunk first, then the processor's own bounds)
    item_max_pixels: str = "bounds"


def _frozen(d: dict) -> MappingProxyType:
    return MappingProxyType(dict(d))


# --------------------------------------------------------------------------- the shapes

# Qwen2VLVisionConfig as the releases write it (hidden_size: the decoder's, the merger's output)
VISION = dict(model_type="qwen2_vl", depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
              mlp_ratio=4, num_heads=16, in_chans=3, in_channels=3, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)
TINY_VISION = dict(VISION, depth=2, embed_dim=160, num_heads=2)

# POINTS-1.5's llm_config (CustomLlama names), the released values
CUSTOM_LLAMA_7B = dict(
    model_type="custom_llama", architectures=["CustomLlamaForCausalLM"], vocab_size=152064, hidden_size=3584,
    ffn_hidden_size=18944, hidden_act="swiglu", num_attention_heads=28, num_layers=28, num_hidden_layers=28,
    num_kv_heads=4, norm_type="rms_norm", layernorm_epsilon=1e-5, max_position_embeddings=16384,
    rotary_pct=1.0, rotary_emb_base=1000000, rotary_compress=1.0, qkv_proj_bias=True, out_proj_bias=False,
    mlp_fc1_bias=False, mlp_fc2_bias=False, bos_token_id=0, eos_token_id=[2, 3], initializer_range=0.02,
    tie_word_embeddings=True, do_sample=False, num_beams=1, max_length=20,
)

# Qwen2.5-3B-Instruct's Qwen2Config (POINTS-Reader's decoder)
QWEN25_3B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=2048,
    intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
    attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
)

# Qwen3-8B's Qwen3Config (POINTS-GUI-G's and VersaViT's decoder)
QWEN3_8B = dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    attention_bias=False, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
    max_window_layers=36, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645,
)


def _sizes(real: dict, tiny: dict, small: dict | None = None, real_name: str = "", vision: dict = VISION) -> dict:
    """The released size (its decoder width in the vision config), `tiny` (a few MB of layers, the real
    vocabulary) and, where given, `small` (a Qwen2.5-0.5B-shaped decoder with the real vision encoder)."""
    out = {real_name: (real, dict(vision, hidden_size=real["hidden_size"])),
           "tiny": (tiny, dict(TINY_VISION, hidden_size=tiny["hidden_size"]))}
    if small is not None:
        out["small"] = (small, dict(vision, hidden_size=small["hidden_size"]))
    return out


# --------------------------------------------------------------------------- the members

READER_PROMPT = ("Please extract all the text from the image with the following requirements:\n"
                 "1. Return tables in HTML format.\n"
                 "2. Return all other text in Markdown format.")
# GUI-G's system prompt. The words are the paper's (arXiv 2602.06391, Figure 3's system turn); the line breaks
# (a blank line after the first sentence, one at the end) are those of a third-party copy of the model card's
# example call (a FastAPI service around `model.chat`, found by its text in a public-code index). The official
# files (github.com/Tencent/POINTS-GUI, the card on huggingface.co/tencent/POINTS-GUI-G) could not be read
# here: check them against this string. Users decode greedily with 32-64 new tokens.
GUI_SYSTEM = ("You are a GUI agent. Based on the UI screenshot provided, please locate the exact position of the "
              "element that matches the instruction given by the user.\n"
              "\n"
              "Requirements for the output:\n"
              "- Return only the point (x, y) representing the center of the target element\n"
              "- Coordinates must be normalized to the range [0, 1]\n"
              "- Round each coordinate to three decimal places\n"
              "- Format the output as strictly (x, y) without any additional text\n")

POINTS15 = Member(
    name="points-1.5", title="POINTS-1.5-Qwen-2.5-7B-Chat", model_type="pointsv1.5_chat", naming="custom_llama",
    architectures=("POINTSV15ChatModel",), processor="points", ties="never", roles=("system", "user", "assistant"),
    presets=_frozen({}),
    sizes=_frozen(_sizes(
        CUSTOM_LLAMA_7B,
        dict(CUSTOM_LLAMA_7B, hidden_size=112, ffn_hidden_size=592, num_attention_heads=7, num_kv_heads=1,
             num_layers=2, num_hidden_layers=2),
        # Qwen2.5-0.5B: 24 layers of 896, 14 query / 2 KV heads, ffn 4864, its 151,936-token vocabulary
        dict(CUSTOM_LLAMA_7B, vocab_size=151936, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14,
             num_kv_heads=2, num_layers=24, num_hidden_layers=24, layernorm_epsilon=1e-6,
             max_position_embeddings=32768),
        real_name="7b")),
)

READER = Member(
    name="points-reader", title="POINTS-Reader", model_type="pointsv1.5_chat", naming="qwen2",
    architectures=("POINTSV15ChatModel",), processor="qwen2vl", ties="official", roles=("user", "assistant"),
    item_max_pixels="prefit",
    presets=_frozen({"reader": Preset(
        "reader", "POINTS-Reader's document prompt (tables as HTML, the rest as Markdown) and its README's decoding",
        prompt=READER_PROMPT,
        generation=_frozen(dict(max_new_tokens=2048, repetition_penalty=1.05, temperature=0.7, top_p=0.8,
                                top_k=20)))}),
    sizes=_frozen(_sizes(
        QWEN25_3B,
        dict(QWEN25_3B, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2),
        real_name="3b")),
)

GUI_G = Member(
    name="points-gui-g", title="POINTS-GUI-G-8B", model_type="points_gui", naming="qwen3",
    architectures=("POINTSGUIModel",), processor="qwen2vl", ties="official", roles=("system", "user", "assistant"),
    presets=_frozen({"gui": Preset(
        "gui", "POINTS-GUI-G's grounding system turn (a point as (x, y) in [0, 1]) and greedy decoding",
        system=GUI_SYSTEM, generation=_frozen(dict(max_new_tokens=64, temperature=0.0)))}),
    sizes=_frozen(_sizes(
        QWEN3_8B,
        dict(QWEN3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24),
        real_name="8b")),
    top_level=_frozen(dict(tie_word_embeddings=False)),  # (and hidden_size, the decoder's: see config_json)
)

VERSAVIT = Member(
    name="versavit", title="VersaViT-Qwen3-8B", model_type="pointsv1.5_chat", naming="qwen3",
    architectures=("POINTSV15ChatModel",), processor="qwen2vl", ties="official", roles=("system", "user", "assistant"),
    presets=_frozen({}),
    sizes=_frozen(_sizes(QWEN3_8B, GUI_G.sizes["tiny"][0], real_name="8b")),
    top_level=_frozen(dict(tie_word_embeddings=False)),
)

MEMBERS = (POINTS15, READER, GUI_G, VERSAVIT)
BY_NAME = MappingProxyType({m.name: m for m in MEMBERS})
# what --model / write_checkpoint accept for the members' sizes: "<short>-<size>", and POINTS-1.5's bare sizes
SHORT = MappingProxyType({"points": POINTS15, "reader": READER, "gui": GUI_G, "versavit": VERSAVIT})


def member_of(model_type: str | None, naming: str, where: str = "config.json") -> Member:
    """The member whose config.json has this top-level model_type and llm_config naming (model_type None: a
    config written without one, read as POINTS-1.5's class)."""
    model_type = POINTS15.model_type if model_type is None else model_type
    for m in MEMBERS:
        if m.model_type == model_type and m.naming == naming:
            return m
    known = sorted({m.model_type for m in MEMBERS})
    if model_type not in known:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a POINTS model; expected one of {known}")
    namings = [m.naming for m in MEMBERS if m.model_type == model_type]
    raise CheckpointError(f"{where}: model_type {model_type!r} with an llm_config of model_type {naming!r} is no "
                          f"known member; expected llm_config.model_type one of {namings}")


def member(name: str) -> Member:
    """A member by its name (`points-reader`) or short name (`reader`)."""
    found = BY_NAME.get(name) or SHORT.get(name)
    if found is None:
        raise KeyError(f"{name!r} is not a POINTS family member; expected one of {sorted(BY_NAME)} "
                       f"(or {sorted(SHORT)})")
    return found


def size_names() -> list[str]:
    """Every named size: POINTS-1.5's bare ("tiny", "small", "7b") and each member's "<short>-<size>"."""
    names = list(POINTS15.sizes)
    for short, m in SHORT.items():
        names += [f"{short}-{s}" for s in m.sizes] if m is not POINTS15 else []
    return names


def size(name: str) -> tuple[Member, dict, dict]:
    """(member, llm_config, vision_config) of a named size: "tiny" (POINTS-1.5's; "points-tiny" too), "reader-3b",
    "gui-tiny", ..."""
    short, _, which = name.rpartition("-")
    m = SHORT.get(short or "points")
    if m is None or which not in m.sizes:
        raise KeyError(f"{name!r} is not a known size; expected one of {size_names()}")
    llm, vision = m.sizes[which]
    return m, dict(llm), dict(vision)


def config_json(m: Member, llm: dict, vision: dict, dtype: str = "float32") -> dict:
    """The config.json the member's release writes for these shapes."""
    out = {"architectures": list(m.architectures), "model_type": m.model_type}
    out |= dict(m.top_level)
    if m.model_type == "points_gui":
        out["hidden_size"] = llm["hidden_size"]
    return out | {"llm_config": dict(llm), "vision_config": dict(vision), "torch_dtype": dtype}
