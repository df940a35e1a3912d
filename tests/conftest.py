"""Shared fixtures: the transformers reference models and checkpoints written from them."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(scope="session")
def ref_decoder():
    return reference.reference_decoder()


@pytest.fixture(scope="session")
def ref_vision():
    return reference.reference_vision()


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory, ref_decoder, ref_vision):
    """The tiny model in the released 7B layout (CustomLlama naming), three shards and an index."""
    tensors = reference.custom_llama_tensors(ref_decoder) | reference.vision_tensors(*ref_vision)
    return reference.write_checkpoint(tmp_path_factory.mktemp("official"), reference.hf_config(), tensors)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, ref_decoder, ref_vision):
    """The same weights in the Qwen2 naming of later POINTS releases, one model.safetensors."""
    llm = {k: v for k, v in reference.TINY_LLM.items() if k != "model_type"}
    config = reference.hf_config(llm=dict(
        model_type="qwen2", vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["ffn_hidden_size"], num_hidden_layers=llm["num_layers"],
        num_attention_heads=llm["num_attention_heads"], num_key_value_heads=llm["num_kv_heads"],
        rms_norm_eps=llm["layernorm_epsilon"], rope_theta=float(llm["rotary_emb_base"]),
        max_position_embeddings=llm["max_position_embeddings"], hidden_act="silu", tie_word_embeddings=False))
    tensors = reference.qwen2_tensors(ref_decoder) | reference.vision_tensors(*ref_vision)
    return reference.write_checkpoint(tmp_path_factory.mktemp("qwen2"), config, tensors, shards=1)


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, official_dir):
    """The official checkpoint converted into our layout by our own converter (small shards)."""
    import points

    return points.convert(official_dir, tmp_path_factory.mktemp("converted") / "out", max_shard_bytes=400_000)
