"""Weight-only int8 (points.runtime.quantize): the quantizer's error bound, each product kernel against the
dequantized float64 product, the quantized decoder against the float one, convert -> load against
load-time quantization (mapped, nothing re-quantized), the compiled int8 step against the eager one, and
the errors a user meets."""

import json

import pytest
import torch

import points
from points.errors import CheckpointError
from points.io import quantized
from points.kernels import cpu_int8
from points.runtime import quantize as qz
from points.runtime.linears import quantize_decoder
from points.runtime.engine import Engine
from points.runtime.sampling import Picker
from points.tooling.measure import engine_generate
from test_loading import _file_maps, _mapped, needs_proc_maps

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
    q, s = quantized.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == dtype and q.abs().max() <= 127
    err = (w.float() - quantized.dequantize_int8(q, s)).abs()
    step = s.float()[:, None]
    slack = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7 * 127, torch.float16: 2 ** -10 * 127}[dtype]
    assert (err <= step * (0.5 + slack)).all(), (err / step).max()
    assert s[7] == 1 and (q[7] == 0).all()
    assert (err.max(1).values <= step[:, 0] / 2 * (1 + 2e-2)).float().mean() > 0.99  # nearly every row within 1/2


needs_gemv = pytest.mark.skipif(not cpu_int8.available(), reason=f"points.kernels.cpu_int8: {cpu_int8.reason()}")
needs_triton = pytest.mark.skipif(not qz.HAS_TRITON, reason="Triton is not installed")


@pytest.mark.parametrize("kernel", ["int8pack", "dequantize", pytest.param("gemv", marks=needs_gemv),
                                    pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("inner", [64, 77])
def test_each_kernel_matches_the_dequantized_product(kernel, dtype, rows, inner):
    """77 inputs: the C++ kernel's vector loop, its 8-wide tail and its scalar tail all run (the Triton
    kernel: in its CPU interpreter without CUDA, a masked last block of K)."""
    g = torch.Generator().manual_seed(1)
    q, s = quantized.quantize_int8((torch.randn(96, inner, generator=g) * 0.05).to(dtype))
    x, bias = torch.randn(2, rows, inner, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    ref = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
    if kernel == "int8pack" and inner % 8:
        with pytest.raises(ValueError, match="input size must be a multiple of 8, got 77"):
            qz.int8_linear(x, q, s, bias, kernel)
        return
    got = qz.int8_linear(x, q, s, bias, kernel)
    assert got.dtype == dtype and got.shape == (2, rows, 96)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def _rounded_once(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, atol: float) -> None:
    """float32: within float32 summation error of the float64 `ref`; bf16 / fp16: nearly every element equal to
    `ref` rounded once to the dtype (float32 sums move the result by far less than the rounding's half ulp)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=atol)
        return
    exact = (got == ref.to(dtype)).float().mean()
    assert exact > 0.97, exact
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=atol)


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_kernel_rounds_once(dtype):
    """The C++ kernel sums in float32 and rounds once: equal, bit for bit, to the float32 product of the
    dequantized weight rounded to the dtype, up to float32 summation order (checked on a layer shape that
    crosses its 32-wide loop, every row count of its 4-row blocks, a strided x and no bias)."""
    g = torch.Generator().manual_seed(2)
    q, s = quantized.quantize_int8((torch.randn(200, 300, generator=g) * 0.05).to(dtype))
    for rows in range(1, 10):
        x = torch.randn(rows, 600, generator=g).to(dtype)[:, ::2]
        ref = (x.double() @ (q.double() * s.double()[:, None]).T)
        got = cpu_int8.int8_gemv(x, q, s)
        assert got.dtype == dtype and got.shape == (rows, 200)
        _rounded_once(got, ref, dtype, atol=1e-6)


@pytest.mark.parametrize("kernel", [pytest.param("gemv", marks=needs_gemv), pytest.param("triton", marks=needs_triton)])
def test_int8_kernels_check_their_arguments(kernel):
    """The CPU and the Triton kernel share one contract (points.kernels.int8_args): each names itself."""
    if kernel == "gemv":
        fn, name = cpu_int8.int8_gemv, "int8_gemv"
    else:
        from points.kernels.triton_int8 import int8_mm as fn

        name = "int8_mm"
    q, s = quantized.quantize_int8(torch.randn(16, 32))
    with pytest.raises(ValueError, match=rf"{name}: weight int8 \[N, 32\] expected"):
        fn(torch.randn(1, 32), q.float(), s)
    with pytest.raises(ValueError, match=rf"{name}: scale and bias \[16\] expected"):
        fn(torch.randn(1, 32), q, s[:8])
    with pytest.raises(ValueError, match=f"{name}: x and scale in float32, bfloat16 or float16"):
        fn(torch.randn(1, 32).double(), q, s)


@needs_gemv
def test_gemv_kernel_copies_strided_inputs_and_compiles_as_one_op():
    q, s = quantized.quantize_int8(torch.randn(16, 32))
    # non-contiguous weight, scale and bias: copied to contiguous tensors that live through the call
    w_t = q.t().contiguous().t()
    s2, b2 = torch.randn(32).to(s.dtype)[::2], torch.randn(32)[::2]
    x = torch.randn(3, 32)
    ref = x.double() @ (w_t.double() * s2.double()[:, None]).T + b2.double()
    torch.testing.assert_close(cpu_int8.int8_gemv(x, w_t, s2, b2).double(), ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()  # (inductor with the op inside: test_compiled_int8_step_equals_eager)
    compiled = torch.compile(lambda x: cpu_int8.int8_gemv(x, q, s) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), cpu_int8.int8_gemv(x, q, s) * 2, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_rounds_once_with_k_split(dtype):
    """points.kernels.triton_int8 (on CUDA when there is one, else in Triton's interpreter) against float64:
    two tiles of output channels with a ragged last one, K ragged and split 1, 2 and 3 ways (the partial
    sums added in order by the second kernel), 1 to 17 rows (17: a second tile of rows), a strided x, with
    and without a bias: float32 sums and one rounding, as the CPU kernel."""
    from points.kernels.triton_int8 import int8_mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, s = quantized.quantize_int8((torch.randn(100, 300, generator=g) * 0.05).to(dtype))
    bias = torch.randn(100, generator=g).to(dtype)
    q, s, bias = q.to(device), s.to(device), bias.to(device)
    for rows, split, with_bias in ((1, 1, True), (3, 2, False), (17, 3, True)):
        x = torch.randn(rows, 600, generator=g).to(dtype).to(device)[:, ::2]
        ref = x.double() @ (q.double() * s.double()[:, None]).T + (bias.double() if with_bias else 0)
        got = int8_mm(x, q, s, bias if with_bias else None, block_k=64, split_k=split)
        assert got.dtype == dtype and got.shape == (rows, 100)
        _rounded_once(got, ref, dtype, atol=1e-5)


@needs_triton
def test_triton_kernel_compiles_as_one_op():
    from points.kernels.triton_int8 import int8_mm

    q, s = quantized.quantize_int8(torch.randn(16, 32))
    x = torch.randn(2, 3, 32)
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: int8_mm(x, q, s) * 2, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(x), int8_mm(x, q, s) * 2, rtol=0, atol=0)
    op = torch.ops.points.int8_mm
    assert counter.frame_count == 1 and any(n.target in (op, op.default) for gm in counter.graphs
                                            for n in gm.graph.nodes)  # one opaque call in the graph


def test_auto_kernel_rule_on_cuda_and_its_notice(monkeypatch):
    """CUDA: the Triton kernel up to TRITON_ROWS rows where Triton is installed, else the dequantize-multiply;
    int8 on CUDA warns once what it may cost; on the CPU it says nothing."""
    monkeypatch.setattr(qz, "HAS_TRITON", True)
    assert qz.choose_kernel("cuda", 1, torch.bfloat16, 3584) == "triton"
    assert qz.choose_kernel("cuda", qz.TRITON_ROWS, torch.float16, 3584) == "triton"
    assert qz.choose_kernel("cuda", qz.TRITON_ROWS + 1, torch.bfloat16, 3584) == "dequantize"
    monkeypatch.setattr(qz, "HAS_TRITON", False)
    assert qz.choose_kernel("cuda", 1, torch.bfloat16, 3584) == "dequantize"
    with pytest.warns(UserWarning, match="bfloat16 may decode faster"):
        qz.cuda_notice(torch.device("cuda", 0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qz.cuda_notice(torch.device("cpu"))


def test_auto_kernel_rule(monkeypatch):
    """CPU: the C++ kernel up to GEMV_ROWS rows where it is available; more rows in bf16 / fp16 (input sizes
    that are multiples of 8) the many-row kernel this machine measured faster, in float32 the dequantization;
    without the C++ kernel (POINTS_CPU_KERNELS=0, no compiler) int8pack or the dequantization for few rows."""
    x1, x100 = torch.zeros(1, 8), torch.zeros(100, 8)
    for measured in ("int8pack", "dequantize"):
        monkeypatch.setattr(qz, "_MANY_ROWS", {torch.bfloat16: measured})
        monkeypatch.setattr(cpu_int8, "available", lambda: True)
        assert qz._auto_kernel(x1) == "gemv" and qz._auto_kernel(x1.bfloat16()) == "gemv"
        assert qz._auto_kernel(x100) == "dequantize" and qz._auto_kernel(x100.bfloat16()) == measured
        monkeypatch.setattr(cpu_int8, "available", lambda: False)
        assert qz._auto_kernel(x1) == "dequantize" and qz._auto_kernel(x1.bfloat16()) == "int8pack"
        assert qz._auto_kernel(x100.bfloat16()) == measured
        assert qz._auto_kernel(torch.zeros(100, 77).bfloat16()) == "dequantize"  # int8pack needs a multiple of 8


def test_the_many_row_kernel_is_measured_once_per_dtype(monkeypatch):
    monkeypatch.setattr(qz, "_MANY_ROWS", {})
    calls = []
    real = qz.int8_linear
    monkeypatch.setattr(qz, "int8_linear", lambda *a: calls.append(a[-1]) or real(*a))
    chosen = qz.many_rows_kernel(torch.bfloat16)
    # a warm-up each, then the two alternated five times (a busy moment slows both alike)
    assert chosen in ("int8pack", "dequantize") and calls == ["int8pack", "dequantize"] * 6
    assert qz.many_rows_kernel(torch.bfloat16) == chosen and len(calls) == 12  # (kept: not measured again)


def test_cpu_kernel_can_be_turned_off(tmp_path):
    """POINTS_CPU_KERNELS=0: not available, with the reason, in a fresh process (the state is per process)."""
    import subprocess
    import sys

    code = ("from points.kernels import cpu_int8; print(cpu_int8.available(), cpu_int8.reason())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "POINTS_CPU_KERNELS": "0"}).stdout
    assert out.strip() == "False turned off by POINTS_CPU_KERNELS=0"


@needs_gemv
def test_cpu_kernel_is_built_once_into_the_cache(tmp_path):
    """A fresh cache directory: the first use builds the library there (no temporary file left), the next
    process finds it and builds nothing."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "POINTS_CACHE": str(tmp_path)}
    code = ("import time; from points.kernels import cpu_int8; t = time.time(); assert cpu_int8.available(), "
            "cpu_int8.reason(); print(time.time() - t)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].startswith("int8_gemv-") and built[0].endswith(".so"), built
    mtime = (tmp_path / "kernels" / built[0]).stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    assert (tmp_path / "kernels" / built[0]).stat().st_mtime_ns == mtime


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


SCHEMES = {"int8": {"quantize": "int8"}, "int4": {"quantize": "int4", "quantize_group_size": 32},
           "int4-symmetric": {"quantize": "int4", "quantize_symmetric": True}}


@pytest.mark.parametrize("scheme", SCHEMES)
@torch.no_grad()
def test_convert_then_load_equals_load_time_quantization(official_dir, tmp_path, scheme):
    asked = SCHEMES[scheme]
    out = points.convert(official_dir, tmp_path / "q", **asked)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == quantized.describe(asked["quantize"], False, asked.get("quantize_group_size"),
                                                        asked.get("quantize_symmetric"))
    loaded = points.load_decoder(out)
    quantized_ = points.load_decoder(official_dir, **asked)
    assert loaded.state_dict().keys() == quantized_.state_dict().keys()
    for name, t in quantized_.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(tokens), quantized_(tokens))
    # the same scheme asked again is what is stored: fine
    assert torch.equal(points.load_decoder(out, **asked)(tokens), quantized_(tokens))


@needs_proc_maps
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_checkpoint_is_mapped_not_copied(official_dir, tmp_path, scheme):
    """Loaded on the CPU in its stored dtype, every quantized weight, scale and offset is the file's bytes."""
    out = points.convert(official_dir, tmp_path / "q", quantize_lm_head=True, **SCHEMES[scheme])
    decoder = points.load_decoder(out)
    maps = _file_maps(out)
    assert maps and all(_mapped(p, maps) for p in decoder.parameters())
    codes = sum(p.nbytes for p in decoder.parameters() if p.dtype in (torch.int8, torch.uint8))
    assert codes > (0.5 if scheme == "int8" else 0.25) * sum(p.nbytes for p in decoder.parameters())


def test_quantized_weights_take_a_quarter_of_fp32_on_disk(official_dir, tmp_path):
    def weights(d):
        return sum(f.stat().st_size for f in d.glob("*.safetensors"))
    full = points.convert(official_dir, tmp_path / "f32", dtype="float32")
    q8 = points.convert(official_dir, tmp_path / "q8", dtype="float32", quantize="int8", quantize_lm_head=True)
    layers = sum(p.numel() for n, p in points.load_decoder(full).named_parameters() if ".layers." in n and "norm" not in n)
    # each quantized element drops from 4 bytes to 1 (scales add 4 bytes per output row)
    assert weights(full) - weights(q8) >= 0.99 * 3 * (layers + 1000 * 224)


@pytest.mark.parametrize("kernel", ["auto", pytest.param("triton", marks=needs_triton)])
def test_compiled_int8_step_equals_eager(official_dir, kernel):
    """auto: this CPU's kernel under inductor; triton: the Triton kernel forced (the one CUDA's auto takes;
    here in the interpreter), a custom op inside the compiled step (aot_eager: the plumbing, not inductor)."""
    decoder = points.load_decoder(official_dir, quantize="int8")
    for parent, name in qz.quantized_linears(decoder):
        getattr(parent, name).kernel = kernel
    prompt = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([9, 6])
    runs = []
    backend = "inductor" if kernel == "auto" else "aot_eager"
    for engine in (Engine(decoder), Engine(decoder, compile=True, backend=backend)):
        torch._dynamo.reset()
        steps = 12 if kernel == "auto" else 2  # (the interpreter runs each product in Python)
        runs.append([t.tolist() for t in engine_generate(engine, Picker(2, 1000, torch.device("cpu")), steps,
                                                         tokens=prompt, lengths=lengths)])
    assert runs[1] == runs[0]


def test_errors(official_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize = 'int3': unknown scheme; expected one of"):
        points.load_decoder(official_dir, quantize="int3")
    with pytest.raises(ValueError, match="quantize_lm_head needs quantize"):
        points.load_decoder(official_dir, quantize_lm_head=True)
    with pytest.raises(ValueError, match="quantize_group_size needs quantize"):
        points.load_decoder(official_dir, quantize_group_size=64)
    with pytest.raises(ValueError, match="group_size = 48: expected one of .32, 64, 128."):
        points.load_decoder(official_dir, quantize="int4", quantize_group_size=48)
    with pytest.raises(ValueError, match="'int8': one scale per output channel; group_size and symmetric are int4's"):
        points.load_decoder(official_dir, quantize="int8", quantize_symmetric=True)
    out = points.convert(official_dir, tmp_path / "q8", quantize="int8")
    with pytest.raises(CheckpointError, match="already quantized .int8.; convert from the float checkpoint"):
        points.convert(out, tmp_path / "again", quantize="int8")
    assert not (tmp_path / "again").exists()
    with pytest.raises(CheckpointError, match="stored with lm_head = False; quantize_lm_head=True would need"):
        points.load_decoder(out, quantize_lm_head=True)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder(points.load_decoder(out))
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
                                              "quantized, so it must be int8 .I8."):
        points.load_decoder(out)


def test_int4_errors(official_dir, tmp_path):
    """A stored int4 checkpoint: loaded as it is stored (another scheme, group size or symmetry refused, naming
    it), its config.json's quantization checked field by field, its codes' dtype checked from the header."""
    out = points.convert(official_dir, tmp_path / "q4", quantize="int4", quantize_group_size=64)
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "scheme": "int4", "lm_head": False, "group_size": 64, "symmetric": False}
    with pytest.raises(CheckpointError, match="stored quantized as 'int4', asked for 'int8'"):
        points.load_decoder(out, quantize="int8")
    with pytest.raises(CheckpointError, match="stored with group_size = 64; quantize_group_size=128 would need"):
        points.load_decoder(out, quantize="int4", quantize_group_size=128)
    with pytest.raises(CheckpointError, match="stored with symmetric = False; quantize_symmetric=True would need"):
        points.load_decoder(out, quantize_symmetric=True)
    assert points.load_decoder(out, quantize="int4", quantize_group_size=64).quantization["group_size"] == 64
    config = json.loads((out / "config.json").read_text())
    for bad in ({"scheme": "int4", "lm_head": False, "group_size": 48, "symmetric": False},
                {"scheme": "int4", "lm_head": False, "group_size": 64},
                {"scheme": "int4", "lm_head": False, "group_size": 64, "symmetric": "no"},
                {"scheme": "int8", "lm_head": False, "group_size": 64, "symmetric": False}):
        (out / "config.json").write_text(json.dumps(config | {"quantization": bad}))
        with pytest.raises(CheckpointError, match="quantization .* is not supported; expected"):
            points.load_decoder(out)
    (out / "config.json").write_text(json.dumps(config | {"quantization": config["quantization"] | {"symmetric": True}}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*attn.qkv.offset"):  # offsets, config says none
        points.load_decoder(out)
    (out / "config.json").write_text(json.dumps(config | {"quantization": config["quantization"] | {"group_size": 32}}))
    with pytest.raises(CheckpointError, match="attn.qkv.weight has shape .* expected"):  # packed for groups of 64
        points.load_decoder(out)
    from safetensors.torch import load_file, save_file

    (out / "config.json").write_text(json.dumps(config))
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["decoder.layers.0.attn.out.weight"] = tensors["decoder.layers.0.attn.out.weight"].to(torch.int8)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="attn.out.weight is I8; config.json says it is quantized, so it must "
                                              "be uint8 .U8."):
        points.load_decoder(out)


@pytest.mark.parametrize("member", ["points-1.5", "reader-tiny"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("lm_head", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@torch.no_grad()
def test_load_time_quantization_is_the_module_swap(official_dir, tmp_path, member, scheme, lm_head, dtype):
    """`quantize="int8"` quantizes each weight as it is read (the float weights are never whole): the same
    int8 rows, scales and float tensors as loading the float decoder and swapping its modules afterwards
    (`quantize_decoder`), for the released layout (a view of the map, or a cast when `dtype` differs) and a
    tied Reader whose quantized head is its embedding, which stays float and shared with nothing."""
    from points.tooling.synthetic import write_checkpoint

    d = official_dir if member == "points-1.5" else write_checkpoint(tmp_path / "reader", member,
                                                                    dtype=torch.float32, tokenizer="bytes")
    asked = SCHEMES[scheme]
    swapped = quantize_decoder(points.load_decoder(d, dtype=dtype), asked["quantize"], lm_head=lm_head,
                                  group_size=asked.get("quantize_group_size"), symmetric=asked.get("quantize_symmetric"))
    read = points.load_decoder(d, dtype=dtype, quantize_lm_head=lm_head, **asked)
    assert read.quantization == swapped.quantization and read.quantization["scheme"] == asked["quantize"]
    layer = qz.Int8Linear if scheme == "int8" else qz.Int4Linear
    assert isinstance(read.lm_head, layer) is lm_head and isinstance(read.layers[0].attn.qkv, layer)
    a, b = swapped.state_dict(), read.state_dict()
    assert a.keys() == b.keys()
    for name, t in a.items():
        assert t.dtype == b[name].dtype and torch.equal(t, b[name]), name
    if read.cfg.tied and not lm_head:
        assert read.lm_head.weight is read.embed.weight
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    assert torch.equal(read(tokens), swapped(tokens))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", [(7, 77), (3, 128), (4, 300)])
def test_int4_groups_round_to_nearest_within_half_a_step(group, symmetric, shape):
    """int4 (points.io.quantized, the format alone): in float64, every dequantized value is q * s (+ m) of the
    stored scale and offset and within half a step of the weight (float32 scales), rows of any length (the last
    group padded with its last value and cut again); a group of one value comes back exactly."""
    from points.io.quantized import dequantize_int4, quantize_int4

    g = torch.Generator().manual_seed(sum(shape) + group)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    w[0] = 0.25  # (a row of one value)
    packed, scale, offset = quantize_int4(w, group, symmetric=symmetric)
    groups = -(-shape[1] // group)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], groups * group // 2)
    assert scale.shape == (shape[0], groups) and (offset is None) == symmetric
    back = dequantize_int4(packed, scale, offset, shape[1], torch.float64)
    step = scale.double().repeat_interleave(group, dim=1)[:, :shape[1]]
    assert back.shape == shape and ((back - w.double()).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[0], w[0].double()) or symmetric  # (asymmetric: the offset is the value)
    assert (back[0] - 0.25).abs().max() <= step[0].max() / 2


def test_int4_packs_two_values_a_byte_low_nibble_first():
    from points.io.quantized import dequantize_int4, quantize_int4

    w = torch.arange(32, dtype=torch.float32)[None] * 15 / 31  # one group: offset 0, step 1, q = round(w)
    packed, scale, offset = quantize_int4(w, 32)
    q = torch.arange(32).mul(15 / 31).round().to(torch.uint8)
    assert (scale.item(), offset.item()) == (1.0, 0.0)
    assert packed[0].tolist() == (q[0::2] | (q[1::2] << 4)).tolist()
    assert torch.equal(dequantize_int4(packed, scale, offset, 32), q[None].float())
    symmetric = quantize_int4(torch.zeros(2, 64), 64, symmetric=True)
    assert symmetric[0].unique().tolist() == [0x88] and torch.equal(
        dequantize_int4(*symmetric, 64), torch.zeros(2, 64))  # (zero rows: q = 8, scale 1)
    with pytest.raises(ValueError, match=r"^group_size = 48: expected one of \(32, 64, 128\)$"):
        quantize_int4(w, 48)
