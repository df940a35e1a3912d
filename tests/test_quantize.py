"""Weight-only int8 (points.runtime.quantize): the quantizer's error bound, each product kernel against the
dequantized float64 product, the quantized decoder against the float one, convert -> load against
load-time quantization (mapped, nothing re-quantized), the compiled int8 step against the eager one, and
the errors a user meets."""

import json

import pytest
import torch

import points
from points.errors import CheckpointError
from points.runtime import quantize as qz
from points.runtime.engine import Engine
from points.runtime.sampling import Picker
from test_checkpoint import _file_maps, _mapped, needs_proc_maps

# Measured on this parity model (official_dir's decoder, fp32): the largest logit error of the int8 decoder
# over 20 draws of 3 x 40 random tokens was 0.108 without lm_head and 0.113 with it (logits up to 3.8); the
# bounds are 1.5x that.
LOGIT_BOUND = {False: 0.16, True: 0.17}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_half_a_step(dtype):
    """|W - W8 * scale| <= scale / 2 per element (the rounding), up to the scale's own rounding to its dtype
    (bf16: 2^-8 relative, which can push the largest element one step past 127 before clamping)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * torch.rand(300, 1, generator=g)).to(dtype)
    w[7] = 0  # a zero row: scale 1, all zeros
    q, s = qz.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == dtype and q.abs().max() <= 127
    err = (w.float() - qz.dequantize_int8(q, s)).abs()
    step = s.float()[:, None]
    slack = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7 * 127, torch.float16: 2 ** -10 * 127}[dtype]
    assert (err <= step * (0.5 + slack)).all(), (err / step).max()
    assert s[7] == 1 and (q[7] == 0).all()
    assert (err.max(1).values <= step[:, 0] / 2 * (1 + 2e-2)).float().mean() > 0.99  # nearly every row within 1/2


@pytest.mark.parametrize("kernel", ["int8pack", "dequantize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_each_kernel_matches_the_dequantized_product(kernel, dtype, rows, monkeypatch):
    monkeypatch.setattr(qz, "KERNEL", kernel)
    g = torch.Generator().manual_seed(1)
    q, s = qz.quantize_int8((torch.randn(96, 64, generator=g) * 0.05).to(dtype))
    x, bias = torch.randn(2, rows, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    ref = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
    got = qz.int8_linear(x, q, s, bias)
    assert got.dtype == dtype and got.shape == (2, rows, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("lm_head", [False, True])
@torch.no_grad()
def test_quantized_decoder_within_the_measured_bound(official_dir, lm_head):
    ref = points.load_decoder(official_dir)
    q = points.load_decoder(official_dir, quantize="int8", quantize_lm_head=lm_head)
    assert isinstance(q.layers[1].mlp.down, qz.Int8Linear) and isinstance(q.lm_head, qz.Int8Linear) is lm_head
    assert not isinstance(q.embed, qz.Int8Linear)
    tokens = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(2))
    a, b = ref(tokens), q(tokens)
    assert b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert 0 < err <= LOGIT_BOUND[lm_head], err


@torch.no_grad()
def test_convert_then_load_equals_load_time_quantization(official_dir, tmp_path):
    out = points.convert(official_dir, tmp_path / "q8", quantize="int8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"scheme": "int8", "lm_head": False}
    loaded = points.load_decoder(out)
    quantized = points.load_decoder(official_dir, quantize="int8")
    assert loaded.state_dict().keys() == quantized.state_dict().keys()
    for name, t in quantized.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(tokens), quantized(tokens))
    # the same scheme asked again is what is stored: fine
    assert torch.equal(points.load_decoder(out, quantize="int8")(tokens), quantized(tokens))


@needs_proc_maps
def test_quantized_checkpoint_is_mapped_not_copied(official_dir, tmp_path):
    """Loaded on the CPU in its stored dtype, every int8 weight and scale is the file's bytes."""
    out = points.convert(official_dir, tmp_path / "q8", quantize="int8", quantize_lm_head=True)
    decoder = points.load_decoder(out)
    maps = _file_maps(out)
    assert maps and all(_mapped(p, maps) for p in decoder.parameters())
    int8 = sum(p.nbytes for p in decoder.parameters() if p.dtype == torch.int8)
    assert int8 > 0.5 * sum(p.nbytes for p in decoder.parameters())


def test_quantized_weights_take_a_quarter_of_fp32_on_disk(official_dir, tmp_path):
    def weights(d):
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))
    full = points.convert(official_dir, tmp_path / "f32", dtype="float32")
    q8 = points.convert(official_dir, tmp_path / "q8", dtype="float32", quantize="int8", quantize_lm_head=True)
    layers = sum(p.numel() for n, p in points.load_decoder(full).named_parameters() if ".layers." in n and "norm" not in n)
    # each quantized element drops from 4 bytes to 1 (scales add 4 bytes per output row)
    assert weights(full) - weights(q8) >= 0.99 * 3 * (layers + 1000 * 224)


def test_compiled_int8_step_equals_eager(official_dir):
    decoder = points.load_decoder(official_dir, quantize="int8")
    prompt = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([9, 6])
    runs = []
    for engine in (Engine(decoder), Engine(decoder, compile=True)):
        torch._dynamo.reset()
        runs.append([t.tolist() for t in engine.generate(Picker(2, 1000, torch.device("cpu")), 12, tokens=prompt,
                                                         lengths=lengths)])
    assert runs[1] == runs[0]


def test_errors(official_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize = 'int4': unknown scheme; expected one of"):
        points.load_decoder(official_dir, quantize="int4")
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize"):
        points.load_decoder(official_dir, quantize_lm_head=True)
    out = points.convert(official_dir, tmp_path / "q8", quantize="int8")
    with pytest.raises(CheckpointError, match="already quantized .int8.; convert from the float checkpoint"):
        points.convert(out, tmp_path / "again", quantize="int8")
    assert not (tmp_path / "again").exists()
    with pytest.raises(CheckpointError, match="lm_head is stored unquantized"):
        points.load_decoder(out, quantize_lm_head=True)
    with pytest.raises(ValueError, match="already quantized"):
        qz.quantize_decoder(points.load_decoder(out))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"quantization": {"scheme": "int3", "lm_head": False}}))
    with pytest.raises(CheckpointError, match="quantization .* is not supported"):
        points.load_decoder(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization"}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*scale"):  # int8 weights, config says float
        points.load_decoder(out)
    full = points.convert(official_dir, tmp_path / "f", dtype="float32")
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps(config | {"quantization": {"scheme": "int8", "lm_head": False}}))
    with pytest.raises(CheckpointError, match="missing tensor.*attn.qkv.scale"):  # float weights, no scales
        points.load_decoder(full)
    from safetensors.torch import load_file, save_file

    (out / "config.json").write_text(json.dumps(config | {"quantization": {"scheme": "int8", "lm_head": False}}))
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["decoder.layers.0.attn.out.weight"] = tensors["decoder.layers.0.attn.out.weight"].float()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="decoder.layers.0.attn.out.weight is F32; config.json says it is "
                                              "quantized, so it must be int8"):
        points.load_decoder(out)
