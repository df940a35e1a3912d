"""The checkpoint mapping and the converter: strictness, round trip, atomic writes, clear errors."""

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import points
from points.io.checkpoint import to_hf_state_dict
from points.io.tensors import TensorFiles
from points.tooling import reference

ROOT = Path(__file__).resolve().parents[1]
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _all_tensors(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_round_trip_official_to_ours_to_official_is_bit_identical(official_dir):
    cfg, ours = points.load_state_dict(official_dir)
    back = to_hf_state_dict(ours, cfg)
    original = {k: v for k, v in _all_tensors(official_dir).items() if not k.startswith("vision_encoder.merger.")}
    assert back.keys() == original.keys()
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_round_trip_through_qwen2_naming(qwen2_dir):
    cfg, ours = points.load_state_dict(qwen2_dir)
    back = to_hf_state_dict(ours, cfg, naming="qwen2")
    original = {k: v for k, v in _all_tensors(qwen2_dir).items() if not k.startswith("vision_encoder.merger.")}
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_all_three_layouts_give_the_same_state(official_dir, qwen2_dir, converted_dir):
    _, a = points.load_state_dict(official_dir)
    _, b = points.load_state_dict(qwen2_dir)
    _, c = points.load_state_dict(converted_dir)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_converted_layout(converted_dir, official_dir):
    files = sorted(p.name for p in converted_dir.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files
    for s in shards:  # at most the limit, unless one tensor alone is larger (the 896 kB embedding)
        with safe_open(str(converted_dir / s), "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 400_000 or len(sizes) == 1
    index = json.loads((converted_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["format"] == "points" and config["dtype"] == "float32"
    assert config["decoder"]["norm_eps"] == 1e-5 and config["decoder"]["rope_theta"] == 1e6
    assert not any(k.startswith("vision_encoder.merger") for k in index["weight_map"])
    assert not list(converted_dir.parent.glob(".*partial*"))


def test_convert_to_bf16_and_tokenizer_carried(official_dir, tmp_path):
    (official_dir / "tokenizer.json").write_text("{}")
    try:
        out = points.convert(official_dir, tmp_path / "bf16", dtype="bfloat16")
    finally:
        (official_dir / "tokenizer.json").unlink()
    assert (out / "tokenizer.json").read_text() == "{}"
    cfg, state = points.load_state_dict(out)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    _, ref = points.load_state_dict(official_dir)
    assert all(torch.equal(state[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_convert_command_line(official_dir, tmp_path, monkeypatch, capsys):
    """weights_convert.py run as a script (its `__main__` block, here in this process: runpy), stderr not a
    terminal."""
    import runpy

    def script(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["weights_convert.py", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "weights_convert.py"), run_name="__main__")
        return e.value.code

    dst = tmp_path / "cli"
    assert script(official_dir, dst, "--dtype", "float16") == 0
    assert capsys.readouterr().err == ""  # not a terminal: no progress display
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
    assert script(official_dir, dst) == 2
    assert "already exists" in capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing(official_dir, tmp_path, monkeypatch):
    calls = []
    save = points.io.atomic.save_tensors

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(points.io.atomic, "save_tensors", failing_save)
    with pytest.raises(KeyboardInterrupt):
        points.convert(official_dir, tmp_path / "dst", max_shard_bytes=400_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither DST nor the temporary directory


def test_a_failed_shard_write_is_one_line_and_leaves_nothing(official_dir, tmp_path, monkeypatch, capsys):
    """The disk fills while the second shard is written (safetensors' own error, as it reports ENOSPC):
    `points convert` prints one line naming DST's file and the reason, exits 1, and leaves nothing."""
    import safetensors.torch
    from safetensors import SafetensorError

    from points.tooling import convert

    real, calls = safetensors.torch.save_file, []

    def full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert convert.main([str(official_dir), str(tmp_path / "dst"), "--max-shard-gb", "0.0004"]) == 1
    assert re.fullmatch(rf"error: {tmp_path / 'dst'}/model-00002-of-000\d\d.safetensors: cannot write \(No space left "
                        rf"on device\); nothing was left at {tmp_path / 'dst'}\n", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_a_full_disk(official_dir, small_disk, capsys):
    """A real full disk (a 256 KB tmpfs, the checkpoint is larger): one line, exit 1, the disk left empty."""
    from points.tooling import convert

    disk = small_disk(256)
    assert convert.main([str(official_dir), str(disk / "dst"), "--max-shard-gb", "0.0001"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {disk / 'dst'}/") and err.endswith(
        f": cannot write (No space left on device); nothing was left at {disk / 'dst'}\n") and err.count("\n") == 1
    assert list(disk.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode(official_dir, tmp_path, umask):
    """Shards (safetensors' writer leaves 0600) and every other file of convert, the random-checkpoint
    writer (demo) and the test reference writer get what the umask gives new files: 0644 under 022."""
    from points.tooling import synthetic

    old = os.umask(umask)
    try:
        written = [points.convert(official_dir, tmp_path / "converted"),
                   synthetic.write_checkpoint(tmp_path / "random", "tiny", tokenizer="bytes"),
                   reference.save_checkpoint(tmp_path / "ref", reference.checkpoint_config(),
                                             {"x": torch.zeros(3)}, shards=1)]
    finally:
        os.umask(old)
    for folder in written:
        files = [f for f in folder.iterdir()]
        assert any(f.suffix == ".safetensors" for f in files), folder
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, (f, oct(f.stat().st_mode))


def test_progress_display_counts_tensors_and_bytes(official_dir, tmp_path, capsys):
    points.convert(official_dir, tmp_path / "p", progress=True)
    err = capsys.readouterr().err
    config = points.read_config(official_dir)
    n = len(points.io.names.plan(config.model, config.naming))
    assert f"{n}/{n} tensors" in err and "GB" in err and "100%" in err


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def broken(official_dir, tmp_path):
    """A fresh, writable copy of the official checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(official_dir, dst)
    return dst


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _rewrite_shard(d: Path, shard: str, edit):
    path = d / shard
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _shard_of(d, name):
    return _index(d)["weight_map"][name]


def test_missing_shard(broken):
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(points.CheckpointError, match=r"model-00002-of-00003.safetensors: shard listed in .* is missing"):
        points.load_decoder(broken)


def test_truncated_safetensors(broken):
    path = broken / "model-00001-of-00003.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(points.CheckpointError, match=r"model-00001-of-00003.safetensors: not a readable safetensors file.*truncated"):
        points.load_decoder(broken)


def test_missing_tensor(broken):
    name = "llm.lm.layers.1.attention.key_value_dense.bias"
    shard = _shard_of(broken, name)
    _rewrite_shard(broken, shard, lambda t: t.pop(name))
    index = _index(broken)
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(points.CheckpointError, match=r"missing tensor\(s\) llm.lm.layers.1.attention.key_value_dense.bias.*shape \[64\]"):
        points.load_decoder(broken)


def test_tensor_listed_in_index_but_not_in_shard(broken):
    name = "llm.lm.final_layer_norm.weight"
    _rewrite_shard(broken, _shard_of(broken, name), lambda t: t.pop(name))
    with pytest.raises(points.CheckpointError, match=r"tensor llm.lm.final_layer_norm.weight is listed there"):
        points.load_decoder(broken)


def test_extra_tensor(broken):
    shard = _shard_of(broken, "llm.embed_out.weight")
    _rewrite_shard(broken, shard, lambda t: t.update({"llm.lm.layers.0.attention.dense.bias": torch.zeros(224)}))
    with pytest.raises(points.CheckpointError, match=r"unexpected tensor\(s\) llm.lm.layers.0.attention.dense.bias"):
        points.load_decoder(broken)


def test_dropped_tensors_are_accepted(official_dir):
    """The unused Qwen2-VL merger is in the fixture (as in the release) and is dropped, not loaded."""
    assert any(n.startswith("vision_encoder.merger.") for n in TensorFiles(official_dir).names)
    _, state = points.load_state_dict(official_dir)
    assert not any("merger" in k for k in state)


def test_wrong_shape(broken):
    name = "llm.lm.layers.0.mlp.dense_h_to_4h.weight"
    _rewrite_shard(broken, _shard_of(broken, name), lambda t: t.update({name: torch.zeros(2368, 200)}))
    with pytest.raises(points.CheckpointError, match=r"tensor llm.lm.layers.0.mlp.dense_h_to_4h.weight has shape \[2368, 200\], expected \[2368, 224\]"):
        points.load_decoder(broken)


def test_integer_tensor(broken):
    name = "llm.lm.final_layer_norm.weight"
    _rewrite_shard(broken, _shard_of(broken, name), lambda t: t.update({name: torch.zeros(224, dtype=torch.int32)}))
    with pytest.raises(points.CheckpointError, match=r"final_layer_norm.weight is not a floating tensor"):
        points.load_decoder(broken)


def test_config_with_missing_required_section(broken):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["llm_config"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(points.CheckpointError, match=r"config.json: missing required section 'llm_config'"):
        points.load_decoder(broken)


def test_converted_config_with_missing_required_field(converted_dir, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(converted_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["decoder"]["n_kv_heads"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(points.CheckpointError, match=r"config.json: decoder is missing required field\(s\) n_kv_heads"):
        points.load_decoder(dst)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(points.CheckpointError, match=r"config.json: not found"):
        points.load_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(reference.checkpoint_config()))
    with pytest.raises(points.CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        points.load_decoder(tmp_path)


def test_shape_error_for_config_mismatch(broken):
    """A config that disagrees with the weights is reported on the first tensor it disagrees with."""
    cfg = json.loads((broken / "config.json").read_text())
    cfg["llm_config"]["vocab_size"] = 1024
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(points.CheckpointError, match=r"llm.lm.embed_in.weight has shape \[1000, 224\], expected "
                                                      r"\[1024, 224\] from config.json$"):
        points.load_decoder(broken)


def test_shape_error_names_the_fields_the_file_left_out(broken):
    """vocab_size and ffn_hidden_size absent: the class defaults (102400, 10240) shaped the expected tensors,
    and the message says which fields the file left out, in its own names."""
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["llm_config"]["vocab_size"], cfg["llm_config"]["ffn_hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(points.CheckpointError, match=r"llm.lm.embed_in.weight has shape \[1000, 224\], expected "
                                                      r"\[102400, 224\] from config.json; config.json leaves out "
                                                      r"llm_config.vocab_size, llm_config.ffn_hidden_size, so the "
                                                      r"class defaults shaped what was expected$"):
        points.load_decoder(broken)


# --------------------------------------------------------------------------- canonical layout, memory maps



def test_index_with_a_bad_weight_map(broken):
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(points.CheckpointError, match=r"index.json: 'weight_map' must be an object mapping tensor"):
        points.load_decoder(broken)


def test_a_tied_state_whose_head_differs_is_refused_not_dropped():
    """Reader's head is its embedding (one released tensor): a state that holds them equal writes it once; one
    whose head differs is refused, naming both, where writing it would drop one in silence."""
    from points.io.config import from_hf_dict
    from points.tooling.synthetic import hf_config, sections

    cfg = from_hf_dict(hf_config(*sections("reader-tiny")[1:]))
    embed = torch.randn(cfg.decoder.vocab_size, cfg.decoder.hidden_size)
    out = to_hf_state_dict({"decoder.embed.weight": embed, "decoder.lm_head.weight": embed}, cfg)
    assert list(out) == ["llm.model.embed_tokens.weight"] and torch.equal(out["llm.model.embed_tokens.weight"], embed)
    with pytest.raises(points.CheckpointError, match="decoder.lm_head.weight differs from decoder.embed.weight, but "
                                                     "the model is tied"):
        to_hf_state_dict({"decoder.embed.weight": embed, "decoder.lm_head.weight": embed + 1}, cfg)
