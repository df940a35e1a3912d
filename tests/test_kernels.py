"""The Triton varlen flash-attention kernel against a float64 reference.

On a machine without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest
before anything imports Triton; small shapes); with CUDA it is compiled and run on the GPU (full shapes)."""

import math

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")

import points  # noqa: E402
from points.kernels.flash_varlen import flash_attn_varlen  # noqa: E402
from points.model.attention import AttentionMeta, Packing, varlen_attention  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}


def reference(q, k, v, lens_q, lens_k, causal):
    """float64, one segment at a time, K/V repeated per query head group."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    g = q.shape[1] // k.shape[1]
    a = c = 0
    for nq, nk in zip(lens_q, lens_k):
        qq = q[a:a + nq].double().cpu().transpose(0, 1)
        kk, vv = (t[c:c + nk].double().cpu().repeat_interleave(g, 1).transpose(0, 1) for t in (k, v))
        s = qq @ kk.transpose(1, 2) / math.sqrt(q.shape[2])
        if causal:
            s = s.masked_fill(torch.arange(nk)[None, :] > torch.arange(nq)[:, None] + nk - nq, float("-inf"))
        out[a:a + nq] = (s.softmax(-1) @ vv).transpose(0, 1)
        a, c = a + nq, c + nk
    return out


def _run(lens_q, lens_k, hq, hkv, d, causal, dtype, seed, **blocks):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to(DEVICE, dtype)
    cu = lambda lens: torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)  # noqa: E731
    out = torch.full_like(q, float("nan"))  # poisoned: an element the kernel does not write fails
    flash_attn_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), causal=causal, out=out, **blocks)
    err = (out.double().cpu() - reference(q, k, v, lens_q, lens_k, causal)).abs().max().item()
    assert not out.isnan().any()
    assert err <= TOL[dtype], err


SMALL = dict(block_m=16, block_n=16)  # interpreter: small blocks keep it fast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_vision_shapes_non_causal_head_dim_80(dtype, seed):
    lens = [1, 17, 80] + ([1000] if CUDA else [])
    _run(lens, lens, 16 if CUDA else 2, 16 if CUDA else 2, 80, False, dtype, seed, **({} if CUDA else SMALL))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decoder_prefill_causal_gqa_head_dim_128(dtype):
    lens = [1, 17, 80] + ([1000] if CUDA else [33])
    _run(lens, lens, 28 if CUDA else 7, 4 if CUDA else 1, 128, True, dtype, 2, **({} if CUDA else SMALL))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_causal_with_past_keys(dtype):
    """Cached prefill: more keys than queries, causal aligned at the end."""
    _run([3, 1, 20], [40, 9, 20], 14, 2, 128, True, dtype, 3, **SMALL)


@pytest.mark.parametrize("d, split", [(72, True), (100, True), (8, True), (80, False), (48, True)])
def test_head_dims_covered_by_masked_pieces(d, split):
    """A second piece wider than what is left (72 = 64 + 8 of 16; 100 = 64 + 36 of 64), one piece wider than
    the whole head (8 of 16), the padded single piece (80 of 128), and an exact split (48 = 32 + 16)."""
    for causal in (False, True):
        _run([5, 40], [5, 40], 4, 2, d, causal, torch.float16, 7, split=split, **SMALL)


@pytest.mark.parametrize("pack", [True, False])
def test_gqa_heads_packed_or_not(pack):
    """7 query heads per KV head, causal, cached (more keys than queries) and not: packing the group's heads
    into one tile (rows i // 7, heads i % 7) gives the reference either way, at tile edges too."""
    _run([3, 17, 40], [3, 30, 40], 14, 2, 128, True, torch.float16, 10, pack_gqa=pack, **SMALL)
    _run([9, 33], [9, 33], 7, 1, 80, False, torch.float16, 11, pack_gqa=pack, **SMALL)


def test_head_pieces():
    from points.kernels.flash_varlen import head_pieces

    assert head_pieces(80) == (64, 16) and head_pieces(128) == (128, 0) and head_pieces(100) == (64, 64)
    assert head_pieces(8) == (16, 0) and head_pieces(80, split=False) == (128, 0) and head_pieces(48) == (32, 16)


@pytest.mark.skipif(not CUDA, reason="the autotuned tiles are chosen on a GPU (the interpreter uses fixed ones)")
def test_autotuned_tiles_on_the_gpu():
    """No blocks given: the autotuner's choice, on a vision and a causal GQA shape."""
    _run([300, 1024], [300, 1024], 16, 16, 80, False, torch.bfloat16, 8)
    _run([700, 2048], [700, 2048], 28, 4, 128, True, torch.bfloat16, 9)


def test_long_segment_in_the_interpreter():
    """One segment of 1000 tokens (few heads, so the interpreter stays quick)."""
    _run([1000], [1000], 1, 1, 80, False, torch.float16, 4, block_m=64, block_n=64)


def test_varlen_kernels_agree():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(50, 2, 80, generator=g).to(DEVICE, torch.float16) for _ in range(3))
    bounds = [0, 4, 21, 50]
    torch.testing.assert_close(varlen_attention(q, k, v, Packing.of(bounds, q.device, "triton")),
                               varlen_attention(q, k, v, Packing.of(bounds, q.device, "sdpa")), rtol=2e-3, atol=2e-3)


def test_vision_encoder_on_the_triton_path(official_dir):
    vision, _ = points.load_vision(official_dir, dtype=torch.float16, device=DEVICE)
    grid = torch.tensor([[1, 4, 6], [2, 2, 2], [1, 2, 8]])
    pixels = torch.randn(48, 1176, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    torch.testing.assert_close(vision(pixels, grid, "triton"), vision(pixels, grid), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
def test_decoder_prefill_on_the_triton_path(official_dir, dtype):
    """No cache, a ragged cached prefill, a second cached chunk, then steps: Triton prefill == SDPA prefill."""
    model = points.load_decoder(official_dir, dtype=dtype, device=DEVICE)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 1000, (2, 21), generator=g).to(DEVICE)
    torch.testing.assert_close(model(tokens, meta=AttentionMeta.no_cache(2, 21, tokens.device, "triton")),
                               model(tokens), **tol)
    caches = {kernel: model.new_cache(2, max_len=48) for kernel in ("sdpa", "triton")}
    n_new = torch.tensor([21, 8], device=DEVICE)
    outs = [model(tokens, meta=c.reserve(21, n_new, kernel=kernel), last=n_new - 1) for kernel, c in caches.items()]
    torch.testing.assert_close(outs[1], outs[0], **tol)
    more = torch.randint(0, 1000, (2, 5), generator=g).to(DEVICE)
    outs = [model(more, meta=c.reserve(5, kernel=kernel)) for kernel, c in caches.items()]
    torch.testing.assert_close(outs[1], outs[0], **tol)
    step = torch.tensor([[3], [4]], device=DEVICE)
    outs = [model(step, meta=c.reserve(1, kernel=kernel)) for kernel, c in caches.items()]
    torch.testing.assert_close(outs[1], outs[0], **tol)


