"""Attention: the model's math (points/model/attention.py) and which kernel runs it (points/runtime/attention.py,
the measured rule behind attn="auto"). The Triton kernel itself: tests/test_kernels.py."""

import importlib.util

import pytest
import torch

import points
from points.runtime.attention import use_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def test_fresh_causal_path_equals_the_masked_path():
    """A prefill from position 0 takes SDPA's causal kernel (GQA, no mask); the masked, chunked path it
    replaces (still used for continuations and ragged caches) gives the same values, across 2 chunks."""
    from points.model.attention import QUERY_CHUNK, sdpa_causal

    g = torch.Generator().manual_seed(11)
    T = QUERY_CHUNK + 77
    q, k, v = torch.randn(2, 14, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    pos = torch.arange(T).expand(2, T)
    fast = sdpa_causal(q, k, v, pos, fresh=True)
    torch.testing.assert_close(fast, sdpa_causal(q, k, v, pos), rtol=1e-5, atol=1e-6)
    dense = torch.softmax((q.double() @ k.double().repeat_interleave(7, 1).transpose(-1, -2)) / 4
                          + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1), -1) @ v.double().repeat_interleave(7, 1)
    torch.testing.assert_close(fast.double(), dense, rtol=1e-5, atol=1e-6)


def test_dispatch_choices():
    dev = torch.device(DEVICE)
    assert use_triton("sdpa", dev) is False
    if HAVE_TRITON:  # on the CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1)
        assert use_triton("triton", dev) is True
    else:
        with pytest.raises(ValueError, match="attn = 'triton' but Triton is not installed"):
            use_triton("triton", dev)
    assert use_triton("auto", dev) is False and use_triton("auto", dev, faster=True) is (CUDA and HAVE_TRITON)
    with pytest.raises(ValueError, match="attn = 'flash': expected one of"):
        use_triton("flash", dev)


def test_auto_rule():
    """attn="auto" (the measured rule): Triton for short or many vision segments, SDPA for few long ones;
    SDPA for a prefill from an empty cache, Triton for a long one after cached tokens."""
    from points.runtime import attention as a

    assert a.auto_vision(1024, 1) and a.auto_vision(256, 64) and a.auto_vision(2048, 4) and a.auto_vision(300, 2)
    assert not a.auto_vision(2048, 3) and not a.auto_vision(4096, 16) and not a.auto_vision(16384, 1)
    assert a.auto_prefill(2048, fresh=False) and a.auto_prefill(1024, fresh=False)
    assert not a.auto_prefill(512, fresh=False) and not a.auto_prefill(8192, fresh=True)


def test_auto_choice_follows_the_rule(monkeypatch):
    """The vision choice asks the rule with its frames' own lengths (a spy records the question); the
    prefill choice with its new tokens and whether the cache was empty; one-token steps are always SDPA."""
    from points.runtime import attention as a

    asked = []
    monkeypatch.setattr(a, "auto_vision", lambda longest, segments: asked.append((longest, segments)) or False)
    assert a.vision_kernel("auto", torch.device(DEVICE), [0, 4, 21, 50]) == "sdpa"
    assert asked == [(29, 3)]
    monkeypatch.setattr(a, "auto_prefill", lambda n, fresh: asked.append((n, fresh)) or True)
    assert a.prefill_kernel("auto", torch.device(DEVICE), 7, False) == ("triton" if CUDA else "sdpa")
    assert asked[-1] == (7, False) and a.prefill_kernel("triton", torch.device(DEVICE), 1, False) == "sdpa"


def test_forced_triton_without_cuda_is_a_clear_error(e2e_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if CUDA or not HAVE_TRITON:
        pytest.skip("CUDA present" if CUDA else "Triton absent (the error is then that it is not installed)")
    with pytest.raises(ValueError, match="attn = 'triton' needs CUDA tensors, got cpu"):
        points.load(e2e_dir, attn="triton")
