"""`points soup`: the weighted mean of checkpoints, tensor by tensor from their maps, rounded once; every
input checked first (a mismatch names the file and the tensor, nothing is written); the output in the
inputs' layout, loadable."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import points
from points.io.atomic import stream_tensors
from points.io.tensors import INDEX, TensorFiles
from points.tooling import soup
from points.tooling.synthetic import SHAPES, write_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three tiny checkpoints (bf16, released layout, several shards), different draws."""
    d = tmp_path_factory.mktemp("soup-in")
    return [write_checkpoint(d / f"ft{i}", "tiny", seed=i, tokenizer="bytes", max_shard_bytes=8 << 20)
            for i in range(3)]


def _tensors(path):
    files = TensorFiles(path)
    return {n: files.get(n).clone() for n in files.names}


def _mean(inputs, weights, dtype=None):
    """sum(w_i * x_i) / sum(w_i) in float64 (exact for these weights and bf16 inputs), rounded once."""
    sums = None
    for path, w in zip(inputs, weights):
        t = _tensors(path)
        terms = {n: v.double() * w for n, v in t.items()}
        sums = terms if sums is None else {n: sums[n] + terms[n] for n in t}
        kinds = {n: v.dtype for n, v in t.items()}
    return {n: (v / sum(weights)).to(dtype or kinds[n]) for n, v in sums.items()}


def test_the_soup_is_the_float64_mean_rounded_once_in_the_first_inputs_layout(inputs, tmp_path, monkeypatch):
    # blocks of 100 rows of the decoder's width (float64): every tensor of over 100 rows (the vocabulary's, each
    # layer's projections, the vision encoder's) in several blocks, the last one short: the block seams are
    # exercised too (at 4096 bytes the vocabulary's two tensors alone made 76,000 blocks of 4 rows)
    monkeypatch.setattr(soup, "BLOCK_BYTES", 8 * 112 * 100)
    out = tmp_path / "soup"
    assert soup.main([*map(str, inputs), "--output", str(out), "--weights", "1", "2", "1"]) == 0
    got, want = _tensors(out), _mean(inputs, [1, 2, 1])
    assert got.keys() == want.keys() and len(got) > 20
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n
    first = inputs[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())
    assert len(list(out.glob("*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (first / name).read_bytes()
    assert json.loads((out / INDEX).read_text())["weight_map"] == json.loads((first / INDEX).read_text())["weight_map"]
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    pipe = points.load(out)
    assert isinstance(pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3), str)
    assert not list(tmp_path.glob(".*"))  # no partial sibling left


def test_dtype_and_equal_weights_and_a_converted_layout(inputs, tmp_path):
    out = tmp_path / "soup32"
    soup.soup(inputs, out, dtype="float32")
    got, want = _tensors(out), _mean(inputs, [1, 1, 1], torch.float32)
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], want[n]) for n in want)
    same = tmp_path / "same"  # a soup of one checkpoint with itself is that checkpoint, bit for bit
    soup.soup([inputs[0]] * 3, same, weights=[0.3, 0.3, 0.4])
    assert all(torch.equal(x, _tensors(inputs[0])[n]) for n, x in _tensors(same).items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert points.load(out).model.decoder.embed.weight.dtype == torch.float32
    ours = [points.convert(p, tmp_path / f"ours{i}") for i, p in enumerate(inputs)]
    soup.soup(ours, tmp_path / "soup-ours", dtype="bfloat16")
    a, b = points.load(tmp_path / "soup-ours"), points.load(tmp_path / "soup32", dtype="bfloat16")
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), n  # our layout's soup = the released layout's, converted


def _rewrite(src, dst, change):
    """A copy of checkpoint `src` whose tensors pass through change(name, tensor) (None drops one)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX).read_text())
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(src / file), "pt") as f:
            tensors = {n: change(n, f.get_tensor(n)) for n in f.keys()}
        save_file({n: t for n, t in tensors.items() if t is not None}, str(dst / file), metadata={"format": "pt"})
        index["weight_map"] = {n: v for n, v in index["weight_map"].items() if tensors.get(n) is not None or v != file}
    (dst / INDEX).write_text(json.dumps(index))
    return dst


NORM = "llm.lm.final_layer_norm.weight"


@pytest.mark.parametrize("change, message", [
    (lambda n, t: None if n == NORM else t, f"has no tensor {NORM}"),
    (lambda n, t: t.float() if n == NORM else t, f"tensor {NORM} is F32, "),
    (lambda n, t: t.to(torch.int8) if n == NORM else t, f"tensor {NORM} is I8"),
    (lambda n, t: torch.cat([t, t[:1]]) if n == NORM else t, f"tensor {NORM} has shape [113], "),
])
def test_a_mismatch_names_the_file_and_tensor_and_writes_nothing(inputs, tmp_path, capsys, change, message):
    odd = _rewrite(inputs[1], tmp_path / "odd", change)
    out = tmp_path / "soup"
    assert soup.main([str(inputs[0]), str(odd), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and str(odd) in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_config_and_argument_errors(inputs, tmp_path, capsys):
    other = tmp_path / "wide"
    llm, vision = SHAPES["tiny"]
    write_checkpoint(other, (dict(llm, ffn_hidden_size=600), vision), tokenizer="bytes")
    out = tmp_path / "soup"
    cases = [
        ([str(inputs[0]), str(other)], "the decoder's ffn_size (as points reads it) is 600, " + str(inputs[0])
         + "'s 592 (config.json differs at llm_config.ffn_hidden_size)"),
        ([str(inputs[0]), str(inputs[1]), "--weights", "1"], "--weights: 1 given for 2 inputs"),
        ([str(inputs[0]), str(inputs[1]), "--weights", "1", "-1"], "expected numbers >= 0 with a positive sum"),
        ([str(inputs[0]), str(tmp_path / "none")], "none: does not exist; expected a checkpoint directory"),
        ([str(inputs[0]), str(inputs[0]), "--output", str(inputs[0])], "already exists"),
    ]
    for argv, message in cases:
        if "--output" not in argv:
            argv = [*argv, "--output", str(out)]
        assert soup.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit):
        soup.main([str(inputs[0]), "--output", str(out)])
    assert "a soup needs two checkpoints or more" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]


def test_single_file_inputs_a_scalar_and_the_index_size(inputs, tmp_path):
    """Inputs as one model.safetensors each (no index), holding a 0-d tensor too: the output is one file of
    the same names; an index's total_size (with "metadata": null in the input) is the output's bytes."""
    from safetensors.torch import save_file

    singles = []
    for i, src in enumerate(inputs[:2]):
        d = tmp_path / f"single{i}"
        d.mkdir()
        for f in src.iterdir():
            if not f.name.endswith(".safetensors") and f.name != INDEX:
                (d / f.name).write_bytes(f.read_bytes())
        save_file({**_tensors(src), "scale": torch.tensor(float(i + 1))}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        singles.append(d)
    out = soup.soup(singles, tmp_path / "soup", weights=[1, 3])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in singles[0].iterdir())
    got = _tensors(out)
    assert got["scale"].shape == () and got["scale"].item() == 1.75
    want = _mean(singles, [1, 3])
    assert all(torch.equal(got[n], want[n]) for n in want)
    index = json.loads((inputs[0] / INDEX).read_text())
    index["metadata"] = None
    (inputs[0] / INDEX).write_text(json.dumps(index))
    try:
        sharded = soup.soup(inputs[:2], tmp_path / "sharded", dtype="float32")
    finally:
        index["metadata"] = {}
        (inputs[0] / INDEX).write_text(json.dumps(index))
    size = json.loads((sharded / INDEX).read_text())["metadata"]["total_size"]
    assert size == sum(t.nbytes for t in _tensors(sharded).values()) and size == 2 * sum(
        t.nbytes for t in _tensors(inputs[0]).values())


def test_an_interrupted_soup_leaves_nothing(inputs, tmp_path, monkeypatch):
    calls = []

    def fail_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return stream_tensors(*a, **kw)

    monkeypatch.setattr(soup, "stream_tensors", fail_second)
    with pytest.raises(KeyboardInterrupt):
        soup.soup(inputs, tmp_path / "soup")
    assert list(tmp_path.iterdir()) == []


def test_stream_tensors_writes_what_safetensors_reads(tmp_path):
    tensors = {"a": torch.randn(5, 3).to(torch.bfloat16), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "q": torch.randint(-128, 127, (3, 7), dtype=torch.int8)}
    path = tmp_path / "x.safetensors"
    pieces = [tensors["a"][:2], tensors["a"][2:], tensors["scalar"], tensors["q"]]
    stream_tensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], pieces, {"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(tensors)
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t), n
    assert oct(os.stat(path).st_mode & 0o777) != "0o600"
    with pytest.raises(ValueError, match="bytes given"):
        stream_tensors(tmp_path / "y.safetensors", [("a", torch.float32, (4,))], [torch.zeros(3)])
