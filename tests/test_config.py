"""Config parsing: the released config.json (CustomLlama and Qwen2 namings) and our own layout."""

import json

import pytest

import points
from points.io.config import from_dict, from_hf_dict, to_dict
from points.tooling import reference


def test_released_7b_config():
    cfg = from_hf_dict(reference.checkpoint_config(reference.REAL_LLM, reference.REAL_VISION))
    d = cfg.decoder
    assert (d.vocab_size, d.hidden_size, d.n_layers, d.n_heads, d.n_kv_heads, d.ffn_size) == (152064, 3584, 28, 28, 4, 18944)
    assert d.head_dim == 128 and d.norm_eps == 1e-5 and d.rope_theta == 1e6 and d.max_seq_len == 16384
    assert (d.qkv_bias, d.out_bias, d.ffn_up_bias, d.ffn_down_bias) == (True, False, False, False)
    v = cfg.vision
    assert (v.depth, v.embed_dim, v.n_heads, v.head_dim, v.mlp_dim, v.patch_dim) == (32, 1280, 16, 80, 5120, 1176)
    assert cfg.merge_dim == 5120


def test_absent_fields_take_custom_llama_defaults():
    """A missing rotary_emb_base means theta 10000, a missing bias flag means True (CustomLlamaConfig)."""
    llm = {k: v for k, v in reference.REAL_LLM.items()
           if k not in ("rotary_emb_base", "out_proj_bias", "max_position_embeddings")}
    d = from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION)).decoder
    assert d.rope_theta == 10000.0 and d.out_bias is True and d.max_seq_len == 4096


def test_absent_vision_fields_take_qwen2vl_defaults():
    d = from_hf_dict(reference.checkpoint_config(reference.REAL_LLM, {"model_type": "qwen2_vl"})).vision
    assert (d.depth, d.embed_dim, d.n_heads, d.patch_size, d.spatial_merge_size) == (32, 1280, 16, 14, 2)


def test_num_layers_wins_over_num_hidden_layers():
    llm = dict(reference.REAL_LLM, num_layers=3, num_hidden_layers=28)
    assert from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION)).decoder.n_layers == 3


def test_rms_norm_boolean_overrides_norm_type():
    llm = dict(reference.REAL_LLM, norm_type="layer_norm", rms_norm=True)
    assert from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION)).decoder.norm_eps == 1e-5
    llm = dict(reference.REAL_LLM, rms_norm=False)
    with pytest.raises(points.CheckpointError, match="norm_type = 'layer_norm'"):
        from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION))


@pytest.mark.parametrize("field, value, message", [
    ("norm_type", "layer_norm", r"llm_config: norm_type = 'layer_norm' is not supported"),
    ("hidden_act", "gelu", r"llm_config: hidden_act = 'gelu' is not supported"),
    ("rotary_pct", 0.5, r"llm_config: rotary_pct = 0.5 is not supported"),
    ("num_kv_heads", 5, r"^config.json: llm_config.num_attention_heads = 28 is not a multiple of "
                        r"llm_config.num_kv_heads = 5$"),
    ("hidden_size", "3584", r"^config.json: llm_config.hidden_size = '3584': expected a positive integer$"),
    ("layernorm_epsilon", -1.0, r"^config.json: llm_config.layernorm_epsilon = -1.0: expected a positive number$"),
    ("qkv_proj_bias", "yes", r"^config.json: llm_config.qkv_proj_bias = 'yes': expected true or false$"),
    ("num_layers", None, r"^config.json: llm_config.num_layers = None: expected a positive integer$"),
])
def test_values_the_model_cannot_honour(field, value, message):
    llm = dict(reference.REAL_LLM, **{field: value})
    with pytest.raises(points.CheckpointError, match=message):
        from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION))


@pytest.mark.parametrize("section, drop, change, message", [
    ("llm_config", "num_attention_heads", {}, r"^config.json: llm_config.hidden_size = 3584 is not divisible by "
     r"llm_config.num_attention_heads = 20 \(absent from the file: the class default\)$"),
    ("vision_config", "num_heads", {}, None),  # the default (16) fits 1280: an absent field is fine then
    ("vision_config", "embed_dim", {"num_heads": 12}, r"^config.json: vision_config.embed_dim = 1280 \(absent from "
     r"the file: the class default\) is not divisible by vision_config.num_heads = 12$"),
])
def test_a_missing_field_is_named_in_the_files_words(section, drop, change, message):
    """A field the file leaves out takes the writing class's default; when that default cannot work, the
    message names the file's own field (num_attention_heads, not n_heads) and says it was absent."""
    cfg = reference.checkpoint_config(reference.REAL_LLM, reference.REAL_VISION)
    del cfg[section][drop]
    cfg[section].update(change)
    if message is None:
        assert from_hf_dict(cfg).vision.n_heads == 16
        return
    with pytest.raises(points.CheckpointError, match=message):
        from_hf_dict(cfg)


def test_absent_norm_type_names_the_default():
    llm = {k: v for k, v in reference.REAL_LLM.items() if k != "norm_type"}
    with pytest.raises(points.CheckpointError, match=r"'layer_norm' \(the class default, the field is absent\)"):
        from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION))


def test_other_model_types_are_refused():
    with pytest.raises(points.CheckpointError, match="model_type 'llava' is not a POINTS model"):
        from_hf_dict(dict(reference.checkpoint_config(), model_type="llava"))
    with pytest.raises(points.CheckpointError, match="llm_config.model_type = 'llama' is not supported"):
        from_hf_dict(reference.checkpoint_config(dict(reference.TINY_LLM, model_type="llama")))
    with pytest.raises(points.CheckpointError, match="vision_config: hidden_act = 'gelu'"):
        from_hf_dict(reference.checkpoint_config(vision=dict(reference.TINY_VISION, hidden_act="gelu")))


def test_qwen2_naming_config():
    llm = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
               rope_theta=1000000.0, max_position_embeddings=32768, hidden_act="silu")
    d = from_hf_dict(reference.checkpoint_config(llm, reference.REAL_VISION)).decoder
    assert (d.ffn_size, d.n_kv_heads, d.norm_eps, d.rope_theta) == (18944, 4, 1e-6, 1e6)
    v5 = {k: v for k, v in llm.items() if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert from_hf_dict(reference.checkpoint_config(v5, reference.REAL_VISION)).decoder.rope_theta == 5e5
    with pytest.raises(points.CheckpointError, match="use_sliding_window = True"):
        from_hf_dict(reference.checkpoint_config(dict(llm, use_sliding_window=True), reference.REAL_VISION))
    with pytest.raises(points.CheckpointError, match="rope_scaling"):
        from_hf_dict(reference.checkpoint_config(dict(llm, rope_scaling={"type": "yarn"}), reference.REAL_VISION))


def test_qwen3_config_of_gui_g():
    """POINTS-GUI-G-8B: a points_gui config whose llm_config is a Qwen3Config dump (family.md's shapes)."""
    llm = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False, max_position_embeddings=40960)
    d = from_hf_dict(reference.gui_config(llm, reference.REAL_VISION)).decoder
    assert (d.head_dim, d.qk_norm, d.qkv_bias, d.out_bias, d.n_kv_heads, d.ffn_size) == (128, True, False, False, 8,
                                                                                           12288)
    no_head_dim = {k: v for k, v in llm.items() if k != "head_dim"} | {"hidden_size": 2048}
    assert from_hf_dict(reference.gui_config(no_head_dim, reference.REAL_VISION)).decoder.head_dim == 128  # the default
    with pytest.raises(points.CheckpointError, match=r"^config.json: llm_config.head_dim = 127: must be even for "
                                                      r"rotary embeddings$"):
        from_hf_dict(reference.gui_config(dict(llm, head_dim=127), reference.REAL_VISION))
    with pytest.raises(points.CheckpointError, match=r"llm_config.attention_bias = 'no': expected true or false"):
        from_hf_dict(reference.gui_config(dict(llm, attention_bias="no"), reference.REAL_VISION))


@pytest.mark.parametrize("top", [None, False, True])
@pytest.mark.parametrize("llm_flag", [None, False, True])
@pytest.mark.parametrize("naming", ["qwen2", "qwen3", "custom_llama"])
def test_the_official_tying_rule(top, llm_flag, naming):
    """Reader's and GUI-G's loader ties lm_head to the embedding when the top-level tie_word_embeddings (absent:
    true) or the llm_config's is true; POINTS-1.5's (CustomLlama) never ties."""
    llm = {"custom_llama": reference.TINY_LLM, "qwen2": dict(reference.TINY_QWEN3, model_type="qwen2"),
           "qwen3": reference.TINY_QWEN3}[naming]
    llm = {k: v for k, v in llm.items() if k != "tie_word_embeddings"} | (
        {} if llm_flag is None else {"tie_word_embeddings": llm_flag})
    config = reference.checkpoint_config(llm, dict(reference.TINY_VISION, hidden_size=llm["hidden_size"]))
    config.pop("tie_word_embeddings", None)  # (GUI-G's release writes false: absent is a case of its own)
    if top is not None:
        config["tie_word_embeddings"] = top
    want = naming != "custom_llama" and (top is not False or llm_flag is True)
    assert from_hf_dict(config).decoder.tied is want


def test_a_converted_config_without_the_newer_fields_still_reads():
    """head_dim, qk_norm and tied came after format_version 2: a file written before them takes their defaults."""
    cfg = from_hf_dict(reference.checkpoint_config())
    d = to_dict(cfg)
    for field in ("head_dim", "qk_norm", "tied"):
        del d["decoder"][field]
    assert from_dict(d) == cfg
    del d["decoder"]["qkv_bias"]
    with pytest.raises(points.CheckpointError, match="decoder is missing required field"):
        from_dict(d)


def test_our_layout_round_trips_and_is_exact():
    cfg = from_hf_dict(reference.checkpoint_config())
    d = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(d) == cfg
    d["decoder"]["surprise"] = 1
    with pytest.raises(points.CheckpointError, match="decoder has unknown field"):
        from_dict(d)
    d = to_dict(cfg) | {"format_version": 99}
    with pytest.raises(points.CheckpointError, match="format_version 99 is not supported"):
        from_dict(d)
    with pytest.raises(points.CheckpointError, match=r"format_version 1 is not supported \(expected 2\); it was "
                                                      r"written by an earlier points .* convert the released"):
        from_dict(to_dict(cfg) | {"format_version": 1})


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(points.CheckpointError, match=r"config.json: not valid JSON"):
        points.read_config(tmp_path)
