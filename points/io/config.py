"""config.json: every member's released vocabulary and this project's own, read once into `CheckpointConfig`.

Two on-disk vocabularies are read:
- a released config.json (POINTS-1.5, POINTS-Reader, POINTS-GUI-G, VersaViT): the top-level `model_type` and
  the `llm_config`'s name the member (points.model.family); `llm_config` is in WeChat's CustomLlama field names
  (`ffn_hidden_size`, `num_kv_heads`, `layernorm_epsilon`, `rotary_emb_base`, ...: POINTS-1.5) or in
  transformers' Qwen2 / Qwen3 names (`intermediate_size`, `num_key_value_heads`, `rms_norm_eps`, `head_dim`:
  the later members); `vision_config` in transformers' `Qwen2VLVisionConfig` names. Absent fields take the
  defaults of the class that wrote them, exactly as the reference code would; the member's tying rule decides
  whether lm_head is the embedding.
- the project's own layout (written by `points convert`): `{"format": "points", "member": ..., "decoder":
  {...}, "vision": {...}}` with every field spelled out; nothing is defaulted there (but fields added since).

Anything this implementation cannot honour (a LayerNorm decoder, another activation, partial rotary,
sliding windows, RoPE scaling, an unknown member) raises `CheckpointError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from points.errors import CheckpointError
from points.io.quantized import INT4_GROUPS, describe
from points.model.config import ConfigError, DecoderConfig, ModelConfig, VisionConfig
from points.model.family import POINTS15, Member, member, member_of

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the dtypes a checkpoint is run in (checkpoint.DTYPES: torch's)

FORMAT = "points"
FORMAT_VERSION = 2  # 2: the MLP's fused projection is `mlp.up_gate`, rows [up; gate] (1: gate_up, [gate; up])


# --------------------------------------------------------------------------- our own layout

def to_dict(cfg: ModelConfig) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "member": cfg.member,
            "image_token_id": cfg.image_token_id,
            "decoder": dataclasses.asdict(cfg.decoder), "vision": dataclasses.asdict(cfg.vision)}


def from_dict(d: dict, where: str = "config") -> ModelConfig:
    """The project's own layout: every field present, nothing defaulted (but the fields added since version 2
    with a default of their own, e.g. the decoder's head_dim and qk_norm, which a file written before them
    leaves out)."""
    found = d.get("format_version")
    if found != FORMAT_VERSION:
        hint = ("; it was written by an earlier points whose MLP rows were [gate; up]: convert the released "
                "checkpoint again") if found == 1 else ""
        raise CheckpointError(f"{where}: format_version {found!r} is not supported (expected {FORMAT_VERSION}){hint}")
    unknown = sorted(d.keys() - {"format", "format_version", "member", "image_token_id", "decoder", "vision", "dtype",
                                 "quantization"})
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = d.get("member", POINTS15.name)  # (absent: written before the family, by a POINTS-1.5-only points)
    try:
        member(name)
    except (KeyError, TypeError):
        raise CheckpointError(f"{where}: member {name!r} is not a POINTS family member") from None
    decoder, vision = _exact(DecoderConfig, d, "decoder", where), _exact(VisionConfig, d, "vision", where)
    try:
        return ModelConfig(decoder, vision, name, d.get("image_token_id", ModelConfig.image_token_id))
    except ConfigError as e:
        raise CheckpointError(e.render(where=where)) from None


def _exact(kind, d: dict, key: str, where: str):
    section = d.get(key)
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: missing section {key!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    required = {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING}
    missing = sorted(required - section.keys())
    if missing:
        raise CheckpointError(f"{where}: {key} is missing required field(s) {', '.join(missing)}")
    unknown = sorted(section.keys() - names)
    if unknown:
        raise CheckpointError(f"{where}: {key} has unknown field(s) {', '.join(unknown)}")
    try:
        return kind(**section)
    except ConfigError as e:
        raise CheckpointError(e.render({n: f"{key}.{n} = {{value}}" for n in names}, where)) from None


# what the modules' fields are called in each vocabulary of the released config.json (the same name if absent)
CUSTOM_LLAMA_NAMES = dict(n_layers="num_layers", n_heads="num_attention_heads", n_kv_heads="num_kv_heads",
                          ffn_size="ffn_hidden_size", norm_eps="layernorm_epsilon", rope_theta="rotary_emb_base",
                          rope_scale="rotary_compress", max_seq_len="max_position_embeddings",
                          qkv_bias="qkv_proj_bias", out_bias="out_proj_bias", ffn_up_bias="mlp_fc1_bias",
                          ffn_down_bias="mlp_fc2_bias")
QWEN2_NAMES = dict(n_layers="num_hidden_layers", n_heads="num_attention_heads", n_kv_heads="num_key_value_heads",
                   ffn_size="intermediate_size", norm_eps="rms_norm_eps", max_seq_len="max_position_embeddings")
QWEN3_NAMES = QWEN2_NAMES | dict(qkv_bias="attention_bias", out_bias="attention_bias")
VISION_NAMES = dict(n_heads="num_heads")


def file_names(kind, names: dict[str, str], key: str, section: dict) -> dict[str, str]:
    """Each field of `kind` as config.json spells it (`llm_config.num_layers = {value}`), marked when the file
    leaves it out (the writing class's default was used)."""
    out = {}
    for f in dataclasses.fields(kind):
        theirs = names.get(f.name, f.name)
        note = "" if theirs in section else " (absent from the file: the class default)"
        out[f.name] = f"{key}.{theirs} = {{value}}{note}"
    return out


def _built(kind, names: dict[str, str], key: str, section: dict, where: str, **values):
    try:
        return kind(**values)
    except ConfigError as e:
        raise CheckpointError(e.render(file_names(kind, names, key, section), where)) from None


# --------------------------------------------------------------------------- the released config.json

# CustomLlamaConfig class defaults (configuration_llama.py of the release): used for absent fields only.
CUSTOM_LLAMA_DEFAULTS = dict(
    vocab_size=102400, hidden_size=2560, num_layers=32, num_attention_heads=20, num_kv_heads=4,
    ffn_hidden_size=10240, hidden_act="swiglu", rotary_pct=1.0, rotary_emb_base=10000,
    rotary_compress=1.0, max_position_embeddings=4096, layernorm_epsilon=1e-5, norm_type="layer_norm",
    qkv_proj_bias=True, out_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True,
)

# transformers Qwen2Config class defaults (4.x field names), for llm_configs written in Qwen2 naming.
QWEN2_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False, rope_scaling=None,
)

# transformers Qwen3Config class defaults (4.x field names), for Qwen3 llm_configs (POINTS-GUI-G).
QWEN3_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
    use_sliding_window=False, rope_scaling=None,
)

# transformers Qwen2VLVisionConfig class defaults.
QWEN2VL_VISION_DEFAULTS = dict(
    depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_act="quick_gelu", in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
)

def _require(field: str, value: Any, allowed: tuple, where: str, absent: bool) -> None:
    if value not in allowed:
        note = " (the class default, the field is absent)" if absent else ""
        raise CheckpointError(f"{where}: {field} = {value!r}{note} is not supported; expected one of {allowed}")


def _custom_llama(llm: dict, where: str, file: str) -> DecoderConfig:
    get = lambda k: llm.get(k, CUSTOM_LLAMA_DEFAULTS[k])  # noqa: E731
    norm_type = get("norm_type")
    if "rms_norm" in llm and llm["rms_norm"] is not None:  # boolean override of the config class
        norm_type = "rms_norm" if llm["rms_norm"] else "layer_norm"
    _require("norm_type", norm_type, ("rms_norm",), where, "norm_type" not in llm and "rms_norm" not in llm)
    _require("hidden_act", get("hidden_act"), ("swiglu",), where, "hidden_act" not in llm)
    _require("rotary_pct", float(get("rotary_pct")), (1.0,), where, "rotary_pct" not in llm)
    # the config class builds its layers from num_layers and overwrites num_hidden_layers with it
    n_layers = llm.get("num_layers", llm.get("num_hidden_layers", CUSTOM_LLAMA_DEFAULTS["num_layers"]))
    names = CUSTOM_LLAMA_NAMES | ({"n_layers": "num_hidden_layers"} if "num_layers" not in llm and
                                  "num_hidden_layers" in llm else {})
    return _built(
        DecoderConfig, names, "llm_config", llm, file,
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), n_layers=n_layers,
        n_heads=get("num_attention_heads"), n_kv_heads=get("num_kv_heads"), ffn_size=get("ffn_hidden_size"),
        norm_eps=get("layernorm_epsilon"), rope_theta=float(get("rotary_emb_base")),
        rope_scale=float(get("rotary_compress")), max_seq_len=get("max_position_embeddings"),
        qkv_bias=get("qkv_proj_bias"), out_bias=get("out_proj_bias"),
        ffn_up_bias=get("mlp_fc1_bias"), ffn_down_bias=get("mlp_fc2_bias"))


def _qwen(llm: dict, where: str, file: str, qwen3: bool, tied: bool) -> DecoderConfig:
    """A Qwen2 or Qwen3 llm_config (transformers' names): Qwen3 adds head_dim and q/k norms, drops the q/k/v
    bias (attention_bias). `tied`: the official loader's tying rule, applied by the caller."""
    defaults = QWEN3_DEFAULTS if qwen3 else QWEN2_DEFAULTS
    get = lambda k: llm.get(k, defaults[k])  # noqa: E731
    _require("hidden_act", get("hidden_act"), ("silu",), where, "hidden_act" not in llm)
    _require("use_sliding_window", get("use_sliding_window"), (False,), where, False)
    theta = get("rope_theta")
    rope = llm.get("rope_parameters") or {}  # transformers 5 spelling
    theta = rope.get("rope_theta", theta)
    _require("rope_type", rope.get("rope_type", "default"), ("default",), where, False)
    _require("rope_scaling", get("rope_scaling"), (None,), where, False)
    heads = get("num_attention_heads")
    qwen3_fields = dict(qkv_bias=get("attention_bias"), out_bias=get("attention_bias"), head_dim=get("head_dim"),
                        qk_norm=True) if qwen3 else dict(qkv_bias=True, out_bias=False)
    return _built(
        DecoderConfig, QWEN3_NAMES if qwen3 else QWEN2_NAMES, "llm_config", llm, file,
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), n_layers=get("num_hidden_layers"),
        n_heads=heads, n_kv_heads=get("num_key_value_heads") or heads, ffn_size=get("intermediate_size"),
        norm_eps=get("rms_norm_eps"), rope_theta=float(theta), rope_scale=1.0,
        max_seq_len=get("max_position_embeddings"), ffn_up_bias=False, ffn_down_bias=False, tied=tied,
        **qwen3_fields)


def _vision(vc: dict, where: str, file: str) -> VisionConfig:
    get = lambda k: vc.get(k, QWEN2VL_VISION_DEFAULTS[k])  # noqa: E731
    _require("hidden_act", get("hidden_act"), ("quick_gelu",), where, "hidden_act" not in vc)
    names = VISION_NAMES | ({"in_channels": "in_chans"} if "in_chans" in vc and "in_channels" not in vc else {})
    return _built(
        VisionConfig, names, "vision_config", vc, file,
        depth=get("depth"), embed_dim=get("embed_dim"), n_heads=get("num_heads"),
        mlp_ratio=float(get("mlp_ratio")), patch_size=get("patch_size"),
        temporal_patch_size=get("temporal_patch_size"), spatial_merge_size=get("spatial_merge_size"),
        in_channels=vc.get("in_channels", vc.get("in_chans", QWEN2VL_VISION_DEFAULTS["in_channels"])))


NAMINGS = ("custom_llama", "qwen2", "qwen3")  # the llm_config vocabularies read (each member's `naming`)


def llm_naming(llm: dict, where: str = "config.json") -> str:
    """The llm_config's vocabulary: its model_type, or for a file without one (early dumps), qwen2 when it
    spells intermediate_size and custom_llama otherwise."""
    mt = llm.get("model_type")
    if mt is None:
        return "qwen2" if "intermediate_size" in llm else "custom_llama"
    if mt not in NAMINGS:
        raise CheckpointError(f"{where}: llm_config.model_type = {mt!r} is not supported; expected one of "
                              f"{list(NAMINGS)}")
    return mt


def tied(m: Member, d: dict) -> bool:
    """The member's official tying rule: POINTS-1.5's loader never ties; Reader's and GUI-G's (transformers
    4.5x) tie when the top-level tie_word_embeddings (absent = true) or the llm_config's (absent = false) is
    true."""
    if m.ties == "never":
        return False
    return d.get("tie_word_embeddings", True) is True or d["llm_config"].get("tie_word_embeddings", False) is True


def _decoder(d: dict, naming: str, m: Member, where: str) -> DecoderConfig:
    llm, at = d["llm_config"], f"{where}: llm_config"
    if naming == "custom_llama":
        return _custom_llama(llm, at, where)
    return _qwen(llm, at, where, qwen3=naming == "qwen3", tied=tied(m, d))


def from_hf_dict(d: dict, where: str = "config.json") -> ModelConfig:
    """A released config.json of any member (a POINTSV15ChatConfig / POINTSGUIConfig dump)."""
    for key in ("llm_config", "vision_config"):
        if not isinstance(d.get(key), dict):
            raise CheckpointError(f"{where}: missing required section {key!r} (a POINTS config has both "
                                  "llm_config and vision_config)")
    naming = llm_naming(d["llm_config"], where)
    m = member_of(d.get("model_type"), naming, where)
    return ModelConfig(decoder=_decoder(d, naming, m, where),
                       vision=_vision(d["vision_config"], f"{where}: vision_config", where), member=m.name)


# config.json's fields that shape tensors, per llm_config vocabulary (named when the file leaves one out)
SHAPE_FIELDS = {
    "custom_llama": ("vocab_size", "hidden_size", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
                     "qkv_proj_bias", "out_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias"),
    "qwen2": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size"),
    "qwen3": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "head_dim", "attention_bias"),
}
VISION_SHAPE_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "patch_size", "temporal_patch_size",
                       "spatial_merge_size")


def _absent_shape_fields(d: dict, naming: str) -> tuple[str, ...]:
    llm, vc = d["llm_config"], d["vision_config"]
    fields = list(SHAPE_FIELDS[naming])
    if naming == "custom_llama" and "num_hidden_layers" not in llm:
        fields.append("num_layers")  # (either one gives the layer count)
    out = [f"llm_config.{k}" for k in fields if k not in llm]
    out += [f"vision_config.{k}" for k in VISION_SHAPE_FIELDS if k not in vc]
    if "in_channels" not in vc and "in_chans" not in vc:
        out.append("vision_config.in_channels")
    return tuple(out)


def _quantization(d: dict, path: Path) -> dict | None:
    """Our layout's stored quantization (points.io.quantized.describe's dict), checked; None for float weights."""
    q = d.get("quantization")
    if q is None:
        return None
    fields = {"int8": {"scheme", "lm_head"}, "int4": {"scheme", "lm_head", "group_size", "symmetric"}}
    try:
        if (not isinstance(q, dict) or set(q) != fields.get(q.get("scheme"))
                or not all(isinstance(q[k], bool) for k in ("lm_head", "symmetric") if k in q)):
            raise ValueError("its fields")
        return describe(q["scheme"], q["lm_head"], q.get("group_size"), q.get("symmetric"))
    except ValueError:
        raise CheckpointError(f"{path}: quantization {q!r} is not supported; expected {{\"scheme\": \"int8\", "
                              "\"lm_head\": true or false}, or {\"scheme\": \"int4\", \"lm_head\": true or false, "
                              f"\"group_size\": one of {list(INT4_GROUPS)}, \"symmetric\": true or false}}") from None


def checkpoint_dir(directory: str | Path) -> Path:
    """`directory` as a Path, once it is known to be a directory (else CheckpointError saying what it is)."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"{directory}: {what}; expected a checkpoint directory (config.json, tokenizer.json "
                              "and the safetensors weights)")
    return directory


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint directory's config.json, read once: what every reader of the directory needs of it."""

    directory: Path
    model: ModelConfig
    naming: str  # the tensor names of the files: 'points' (ours) or the member's (points.io.names.NAMINGS)
    quantization: dict | None = None  # our layout's stored weight quantization ({"scheme", "lm_head"}); None: floats
    absent: tuple[str, ...] = ()  # shape fields a released config.json leaves out (their class defaults were used)
    image_token_stated: bool = True  # config.json names the image token id (ours does; releases leave it to the tokenizer)

    def with_tokenizer(self, image_pad_id: int, tokenizer_path: Path) -> CheckpointConfig:
        """The config whose image token id is the tokenizer's <|image_pad|> where config.json states none (the
        releases: the official code finds the token by its string); where it states one, the two must agree."""
        if not self.image_token_stated:
            return dataclasses.replace(self, model=dataclasses.replace(self.model, image_token_id=image_pad_id),
                                       image_token_stated=True)
        if image_pad_id != self.model.image_token_id:
            raise CheckpointError(f"{tokenizer_path}: <|image_pad|> is id {image_pad_id}, but "
                                  f"{self.directory / 'config.json'} says the image token id is "
                                  f"{self.model.image_token_id}")
        return self

    @property
    def member(self) -> Member:
        return member(self.model.member)


def read_config(directory: str | Path) -> CheckpointConfig:
    """Read `config.json` of a checkpoint directory (our layout, or any member's released one), once."""
    directory = checkpoint_dir(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a POINTS checkpoint directory holds config.json")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    if d.get("format") == FORMAT:
        return CheckpointConfig(directory, from_dict(d, str(path)), "points", _quantization(d, path),
                                image_token_stated="image_token_id" in d)
    try:
        cfg = from_hf_dict(d, str(path))
    except TypeError as e:  # a field of the wrong JSON type reaching arithmetic
        raise CheckpointError(f"{path}: {e}") from None
    naming = llm_naming(d["llm_config"])
    stated = d.get("image_token_id")
    if stated is not None:
        try:
            cfg = dataclasses.replace(cfg, image_token_id=stated)
        except ConfigError as e:
            raise CheckpointError(e.render(where=str(path))) from None
    return CheckpointConfig(directory, cfg, naming, None, _absent_shape_fields(d, naming), stated is not None)
