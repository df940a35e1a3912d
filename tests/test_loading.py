"""Building the model from a checkpoint (points/loading.py over io/checkpoint.py): dtypes and devices, what
is read, what is mapped in place and what is copied, the canonical state a user saves."""

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from safetensors.torch import load_file, save_file

import points
from points.tooling import reference

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def test_load_decoder_dtype_and_device(official_dir):
    model = points.load_decoder(official_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.parameters())  # an nn.Module as PyTorch makes one: it trains as it is
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_unsupported_dtype(official_dir):
    with pytest.raises(points.CheckpointError, match="dtype.*int8.*not supported"):
        points.load_state_dict(official_dir, dtype="int8")


def test_a_file_where_a_directory_is_expected(official_dir):
    for load in (points.load, points.load_decoder, points.read_config):
        with pytest.raises(points.CheckpointError, match=rf"^{official_dir / 'config.json'}: is a file, not a "
                                                          r"directory; expected a checkpoint directory"):
            load(official_dir / "config.json")


def test_lazy_headers_only_for_unrequested_parts(official_dir):
    """Loading the decoder alone reads no vision tensor data but still checks the vision tensors' shapes."""
    _, state = points.load_state_dict(official_dir, parts=("decoder",))
    assert state and all(k.startswith("decoder.") for k in state)


def test_cast_on_load_equals_a_plain_cast(official_dir):
    _, state = points.load_state_dict(official_dir, dtype=torch.float32)
    _, narrow = points.load_state_dict(official_dir, dtype=torch.bfloat16)
    for name, t in state.items():
        assert narrow[name].dtype == torch.bfloat16 and torch.equal(narrow[name], t.to(torch.bfloat16)), name


def test_state_dict_is_canonical_saves_and_loads_into_a_fresh_model(pipe, tmp_path):
    """Every parameter in PyTorch's usual layout (contiguous, Linear weights [out, in]); the state saves with
    safetensors and a freshly built POINTSModel given it computes the very same logits."""
    state = pipe.model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    assert state["decoder.layers.0.mlp.up_gate.weight"].shape == (2 * 592, 112)
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = points.POINTSModel(pipe.model.cfg).eval()
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": PHOTO}, {"type": "text", "text": "What?"}]}]
    enc = pipe.encode(messages)
    with torch.no_grad():
        torch.testing.assert_close(fresh(enc.input_ids, enc.pixel_values, enc.grid_thw),
                                   pipe.model(enc.input_ids, enc.pixel_values, enc.grid_thw), rtol=0, atol=0)


def _file_maps(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files in `directory`."""
    where = str(directory.resolve())
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(where + "/"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _mapped(t: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for lo, hi in maps)


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


@needs_proc_maps
def test_converted_layout_loads_without_copying_a_tensor(converted_dir):
    """Our layout in its stored dtype on the CPU: every parameter *is* the file's bytes (it lies inside a
    memory map of one of the checkpoint's files), none is a copy."""
    model = points.load_decoder(converted_dir)
    vision, projector = points.load_vision(converted_dir)
    maps = _file_maps(converted_dir)
    params = [*model.parameters(), *vision.parameters(), *projector.parameters()]
    assert maps and all(_mapped(p, maps) for p in params)


@needs_proc_maps
def test_released_layout_copies_only_what_it_re_lays(official_dir):
    """The released layout: the query rows and the interleaved K/V are re-laid once into our q/k/v, in fresh
    memory; every other tensor (the [up; gate] projection included) is used in place from the map. A dtype
    cast copies everything."""
    model = points.load_decoder(official_dir)
    maps = _file_maps(official_dir)
    for name, p in model.named_parameters():
        assert _mapped(p, maps) == (".attn.qkv." not in name), name
    cast = points.load_decoder(official_dir, dtype=torch.bfloat16)
    assert not any(_mapped(p, _file_maps(official_dir)) for p in cast.parameters())


def test_tied_qwen2_checkpoint_loads_and_saves(qwen2_dir, tmp_path):
    """A Qwen2-naming checkpoint whose config ties (no top-level tie_word_embeddings: true) and that stores no
    lm_head: the head is the embedding's Parameter itself (one tensor, as transformers ties it; it trains as one
    and is held once), and still after the CPU kernels' swap; the state saves as transformers saves a tied model
    (safetensors' save_model). The same files under a config that says untied are refused, naming the missing
    head (no silent tying)."""
    tensors = load_file(qwen2_dir / "model.safetensors")
    del tensors["llm.lm_head.weight"]
    config = json.loads((qwen2_dir / "config.json").read_text())
    untied = reference.save_checkpoint(tmp_path / "untied", config, tensors, shards=1)
    with pytest.raises(points.CheckpointError, match=r"missing tensor\(s\) llm.lm_head.weight"):
        points.load_decoder(untied)
    del config["tie_word_embeddings"]
    tied = reference.save_checkpoint(tmp_path / "tied", config, tensors, shards=1)
    model = points.load_decoder(tied)
    assert model.lm_head.weight is model.embed.weight and len(list(model.parameters())) == len(model.state_dict()) - 1
    assert torch.equal(model.embed.weight, tensors["llm.model.embed_tokens.weight"])
    from safetensors.torch import save_model

    save_model(model, str(tmp_path / "saved.safetensors"))


def test_a_tied_checkpoint_reads_its_head_from_the_embedding(qwen2_dir, ref_decoder, ref_vision, tmp_path):
    """POINTS-Reader's rule: a Qwen2 llm_config without a top-level tie_word_embeddings is tied, so a stored
    llm.lm_head (here deliberately different) is not read, as transformers' tie_weights discards it; without a
    stored head it loads the same."""
    import copy

    config = json.loads((qwen2_dir / "config.json").read_text())
    del config["tie_word_embeddings"]  # (the fixture says false; absent means true)
    tensors = reference.qwen2_tensors(ref_decoder) | reference.vision_tensors(*ref_vision)
    tied = copy.deepcopy(ref_decoder)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tokens = torch.randint(0, 1000, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tied(tokens).logits
    for name, stored in (("with-head", tensors), ("without-head", {k: v for k, v in tensors.items()
                                                                   if k != "llm.lm_head.weight"})):
        decoder = points.load_decoder(reference.save_checkpoint(tmp_path / name, config, stored, shards=1))
        assert decoder.cfg.tied and torch.equal(decoder.lm_head.weight, decoder.embed.weight)
        with torch.no_grad():
            torch.testing.assert_close(decoder(tokens), want)
