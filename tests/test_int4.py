"""Weight-only int4 (points.io.quantized, points.runtime.quantize.Int4Linear, points.kernels.cpu_int4): the CPU
kernel on every instruction set this CPU has against the float64 product of the dequantized weights and the
int8-rounded activations, and against the float activations; the layer's kernels against each other; the
compiled step against the eager one; an engine batch against its rows alone; LoRA on an int4 base (QLoRA).
The scheme's loading and converting share tests/test_quantize.py's, parametrized by scheme."""

import pytest
import torch

import points
from points.io.quantized import dequantize_int4, quantize_int4
from points.kernels import cpu_int4
from points.runtime import quantize as qz
from points.runtime.engine import Engine
from points.runtime.sampling import Picker
from points.tooling.measure import engine_generate

needs_kernel = pytest.mark.skipif(not cpu_int4.available(), reason=f"points.kernels.cpu_int4: {cpu_int4.reason()}")
ISAS = cpu_int4.isas() if cpu_int4.available() else ()


def _case(rows, n, k, group, symmetric, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    packed, scale, offset = quantize_int4(w, group, symmetric=symmetric)
    return x, packed, scale, offset, b, dequantize_int4(packed, scale, offset, k, torch.float64)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k,group,symmetric,bias", [
    (1, 37, 200, 32, False, True), (3, 64, 256, 64, True, False), (5, 17, 1000, 128, False, True),
    (4, 33, 77, 32, True, True), (1, 8, 7, 128, False, False), (9, 50, 640, 64, False, True),
    (2, 300, 384, 128, True, True), (6, 39, 192, 64, False, True), (2, 39, 192, 128, False, True)])
# (with AVX-512 up to 2 rows go with 4 weight rows a step, more with 2: 39 outputs leave 3, then 1)
def test_kernel_equals_the_float64_product_of_what_it_rounds(isa, dtype, rows, n, k, group, symmetric, bias):
    """y = round_once( quantize_activations(x) @ W^T + b ), W dequantized in float64: within float32 summation
    and one rounding to the output dtype. Odd sizes (7, 77 inputs: padding inside the last group; 37, 17, 39
    outputs: every remainder of the weight-row steps), both schemes, 1-9 rows (the four-row blocks and each
    remainder)."""
    x, packed, scale, offset, b, w64 = _case(rows, n, k, group, symmetric, dtype, bias)
    y = cpu_int4.int4_gemv(x, packed, scale, offset, b, group_size=group, which=isa)
    assert y.dtype == dtype and y.shape == (rows, n)
    xq = cpu_int4.quantize_activations(x, group)
    ref = xq @ w64.T + (0 if b is None else b.double())
    magnitude = xq.abs() @ w64.abs().T
    tol = torch.finfo(dtype).eps * ref.abs() + 1e-6 * magnitude + 1e-30
    assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max().item()


@needs_kernel
def test_kernel_error_against_the_float_activations_is_the_activation_rounding():
    """Against float x, the only other error is x's rounding: per group of 128 at most half of max|x| / 127,
    so |y - x @ W^T| <= sum over k of that half step * |W|."""
    x, packed, scale, offset, b, w64 = _case(3, 40, 256, 128, False, torch.float32, False, seed=5)
    y = cpu_int4.int4_gemv(x, packed, scale, offset, group_size=128)
    step = x.reshape(3, -1, 128).abs().amax(-1, keepdim=True).double() / 127 / 2
    bound = step.expand(3, 2, 128).reshape(3, 256) @ w64.abs().T
    err = (y.double() - x.double() @ w64.T).abs()
    assert (err <= bound * 1.0001 + 1e-5).all() and err.max() > 0


@needs_kernel
def test_kernel_checks_its_arguments():
    x, packed, scale, offset, b, _ = _case(2, 16, 128, 64, False, torch.float32, True)
    with pytest.raises(ValueError, match=r"int4_gemv: packed uint8 \[N, 64\] expected for 128 inputs in groups of 64"):
        cpu_int4.int4_gemv(x, packed[:, :32], scale, offset, group_size=64)
    with pytest.raises(ValueError, match="int4_gemv: group_size must be 32, 64 or 128, got 48"):
        cpu_int4.int4_gemv(x, packed, scale, offset, group_size=48)
    with pytest.raises(ValueError, match=r"int4_gemv: scale and offset \[16, 2\] expected"):
        cpu_int4.int4_gemv(x, packed, scale[:, :1], offset, group_size=64)
    with pytest.raises(ValueError, match=r"int4_gemv: bias \[16\] expected"):
        cpu_int4.int4_gemv(x, packed, scale, offset, b[:3], group_size=64)
    with pytest.raises(ValueError, match="int4_gemv: x and scale in float32, bfloat16 or float16"):
        cpu_int4.int4_gemv(x.double(), packed, scale, offset, group_size=64)
    with pytest.raises(ValueError, match="int4_gemv: which = 'sse'"):
        cpu_int4.int4_gemv(x, packed, scale, offset, group_size=64, which="sse")


@pytest.mark.parametrize("kernel", [pytest.param("gemv", marks=needs_kernel), "dequantize"])
@torch.no_grad()
def test_layer_kernels_against_the_dequantized_weight(kernel):
    """Int4Linear's products: "dequantize" is the float product of the dequantized weight (on the CPU a block
    of rows at a time: float32 summation), "gemv" that with the activations rounded to int8."""
    linear = torch.nn.Linear(96, 50)
    layer = qz.quantized_layer({"scheme": "int4", "lm_head": False, "group_size": 32, "symmetric": False}, linear,
                               kernel)
    x = torch.randn(2, 3, 96)
    y = layer(x)
    w = layer.dequantized()
    xs = x.double() if kernel == "dequantize" else cpu_int4.quantize_activations(x, 32)
    torch.testing.assert_close(y.double(), xs @ w.double().T + linear.bias.double(), rtol=1e-5, atol=1e-5)
    assert layer.state_dict().keys() == {"weight", "scale", "offset", "bias"}


@needs_kernel
@torch.no_grad()
def test_decode_kernel_adds_little_to_the_int4_error(official_dir):
    """On the parity model: the gemv kernel's logits (activations rounded to int8) against the dequantized
    product's (float activations) differ by a tenth of what int4 itself moves them from the float model."""
    ref = points.load_decoder(official_dir)
    q = points.load_decoder(official_dir, quantize="int4")
    tokens = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    fast = q(tokens)  # 12 rows: the kernel
    for parent, name in qz.quantized_linears(q):
        getattr(parent, name).kernel = "dequantize"
    slow = q(tokens)
    int4_err = (ref(tokens) - slow).abs().max()
    assert 0 < (fast - slow).abs().max() < 0.1 * int4_err


def test_compiled_int4_step_equals_eager(official_dir):
    decoder = points.load_decoder(official_dir, quantize="int4", quantize_group_size=32)
    prompt = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([9, 6])
    runs = []
    for engine in (Engine(decoder), Engine(decoder, compile=True)):
        torch._dynamo.reset()
        runs.append([t.tolist() for t in engine_generate(engine, Picker(2, 1000, torch.device("cpu")), 8,
                                                         tokens=prompt, lengths=lengths)])
    assert runs[1] == runs[0]


def test_scheduler_batch_equals_each_request_alone(e2e_dir):
    """The whole pipeline on int4 (scheduler, prefix cache, speculative drafts): a batch's greedy replies
    are each request's reply alone."""
    pipe = points.load(e2e_dir, quantize="int4", quantize_group_size=32)
    chats = [[{"role": "user", "content": text}] for text in ("Hello there", "Count to five", "Hello there again")]
    alone = [pipe.chat(c, max_new_tokens=8) for c in chats]
    assert pipe.chat_batch(chats, max_new_tokens=8) == alone
    assert pipe.chat(chats[0], max_new_tokens=8, speculative="ngram") == alone[0]


def test_lora_on_an_int4_base_trains_the_adapters_only(e2e_dir, tmp_path):
    """QLoRA: the base stays in its codes (frozen, untouched by a step), a fresh adapter changes nothing, the
    adapters get gradients and move, save -> load onto a fresh int4 base gives the same outputs, and the
    adapter loads onto the float base too; folding into the codes is refused."""
    from points.errors import CheckpointError
    from points.runtime.lora import (LoraConfig, adapter_state, add_lora, base_identity, load_adapter, merge_lora,
                                     save_adapter)

    pipe = points.load(e2e_dir, quantize="int4", quantize_group_size=32)
    model = pipe.model
    tokens = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.decoder(tokens)
    codes = model.decoder.layers[0].attn.qkv.weight.clone()
    add_lora(model, LoraConfig(rank=4, targets=("q", "v", "down")), seed=0)
    with torch.no_grad():
        assert torch.equal(model.decoder(tokens), before)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    for _ in range(2):
        loss = model.decoder(tokens).logsumexp(-1).mean()
        loss.backward()
        assert all(p.grad is not None for p in adapters)
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.decoder.layers[0].attn.qkv.base.weight, codes)
    with torch.no_grad():
        after = model.decoder(tokens)
    assert not torch.equal(after, before)
    config = (e2e_dir / "config.json").read_bytes()
    save_adapter(model, tmp_path / "adapter", base=base_identity(model, config))
    fresh = points.load(e2e_dir, quantize="int4", quantize_group_size=32).model
    load_adapter(fresh, tmp_path / "adapter", config)
    with torch.no_grad():
        assert torch.equal(fresh.decoder(tokens), after)
    # onto the float base it was quantized from (and another quantization of it): the tensors a quantization
    # leaves untouched are compared; one of those changed is refused
    saved = adapter_state(model)
    for other in (points.load(e2e_dir, adapter=tmp_path / "adapter"), points.load(e2e_dir, quantize="int8",
                                                                                   adapter=tmp_path / "adapter")):
        assert adapter_state(other.model).keys() == saved.keys()
        assert all(torch.equal(adapter_state(other.model)[k], v) for k, v in saved.items())
    changed = points.load(e2e_dir).model
    changed.decoder.norm.weight.data[0] += 1.0
    with pytest.raises(CheckpointError, match="its weights differ"):
        load_adapter(changed, tmp_path / "adapter", config)
    with pytest.raises(ValueError, match="merge_lora: decoder.layers.0.attn.qkv is quantized .int4.; folding"):
        merge_lora(model)


needs_triton = pytest.mark.skipif(not qz.HAS_TRITON, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernel_rounds_once_with_k_split(dtype):
    """points.kernels.triton_int4 (on CUDA when there is one, else in Triton's interpreter) against float64 of
    x and the weight dequantized to x's dtype: ragged tiles of outputs and inputs (77: padding inside the last
    group), K split 1 to 3 ways, 1 to 17 rows, both schemes, with and without a bias."""
    from points.kernels.triton_int4 import int4_mm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rows, n, k, group, symmetric, split, bias in ((1, 37, 200, 32, False, 1, True), (3, 64, 256, 64, True, 2, False),
                                                      (17, 20, 77, 32, False, 3, True)):
        x, packed, scale, offset, b, _ = _case(rows, n, k, group, symmetric, dtype, bias, seed=rows)
        w = dequantize_int4(packed, scale, offset, k, dtype).double()
        ref = x.double() @ w.T + (0 if b is None else b.double())
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        y = int4_mm(to(x), to(packed), to(scale), to(offset), to(b), group_size=group, block_n=16, block_k=32,
                    split_k=split).cpu()
        assert y.dtype == dtype and y.shape == (rows, n)
        tol = torch.finfo(dtype).eps * ref.abs() + 1e-5 * (x.double().abs() @ w.abs().T)
        assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max().item()


@needs_triton
def test_triton_kernel_compiles_as_one_op():
    from torch._dynamo.testing import CompileCounterWithBackend

    from points.kernels.triton_int4 import int4_mm

    x, packed, scale, offset, _, _ = _case(2, 16, 64, 32, False, torch.float32, False)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: int4_mm(x, packed, scale, offset, group_size=32) * 2, fullgraph=True,
                             backend=counter)
    torch.testing.assert_close(compiled(x), int4_mm(x, packed, scale, offset, group_size=32) * 2, rtol=0, atol=0)
    op = torch.ops.points.int4_mm
    assert counter.frame_count == 1 and any(n.target in (op, op.default) for gm in counter.graphs
                                            for n in gm.graph.nodes)


def test_auto_kernel_rule(monkeypatch):
    """CPU: the kernel up to INT4_GEMV_ROWS rows where it is built, then the blocks; CUDA: Triton up to
    TRITON_ROWS rows where it is installed, then the dequantized product."""
    monkeypatch.setattr(qz.cpu_int4, "available", lambda: True)
    assert [qz.int4_kernel("cpu", r) for r in (1, qz.INT4_GEMV_ROWS, qz.INT4_GEMV_ROWS + 1)] == [
        "gemv", "gemv", "dequantize"]
    monkeypatch.setattr(qz.cpu_int4, "available", lambda: False)
    assert qz.int4_kernel("cpu", 1) == "dequantize"
    monkeypatch.setattr(qz, "HAS_TRITON", True)
    assert [qz.int4_kernel("cuda", r) for r in (1, qz.TRITON_ROWS, qz.TRITON_ROWS + 1)] == [
        "triton", "triton", "dequantize"]
    monkeypatch.setattr(qz, "HAS_TRITON", False)
    assert qz.int4_kernel("cuda", 1) == "dequantize"


@pytest.mark.parametrize("kernel", ["auto", pytest.param("gemv", marks=needs_kernel)])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_few_rows_that_need_a_gradient_take_a_differentiable_product(scheme, kernel):
    """QLoRA trains adapters through frozen quantized products: a few rows (where "auto" would take a kernel
    without a backward, or the kernel is forced) still carry x's gradient, equal to the dequantized weight's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    q = ({"scheme": "int4", "lm_head": False, "group_size": 32, "symmetric": False} if scheme == "int4" else
         {"scheme": "int8", "lm_head": False})
    layer = qz.quantized_layer(q, linear, kernel)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.dequantized().float()
    x2 = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, linear.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_operator_survives_a_reload():
    """points::int4_gemv is defined once per process: reloading its modules (a notebook's autoreload) keeps it
    callable instead of failing to define it again or dropping it."""
    import gc
    import importlib

    from points.kernels import cpu_build

    x, packed, scale, offset, b, _ = _case(2, 16, 128, 64, False, torch.float32, True)
    want = cpu_int4.int4_gemv(x, packed, scale, offset, b, group_size=64)
    importlib.reload(cpu_int4)  # (its operator defined again)
    assert torch.equal(torch.ops.points.int4_gemv(x, packed, scale, offset, b, 64, cpu_int4.isa()), want)
    importlib.reload(cpu_build)  # (the library holding the definitions replaced)
    gc.collect()
    assert torch.equal(torch.ops.points.int4_gemv(x, packed, scale, offset, b, 64, cpu_int4.isa()), want)
