"""Prefix caching (points.runtime.prefix) in `Pipeline.chat`: every reply equals the reply without the cache
(greedy, float32) in any order of calls, the reused length is what the key allows (images by identity, not by
their pad tokens), image features of a reused prefix are not recomputed, and the store keeps to its bound."""

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import points
from points.runtime.prefix import PrefixCache

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
NEW = 8


@pytest.fixture(scope="module")
def pipes(e2e_dir):
    return points.load(e2e_dir), points.load(e2e_dir, prefix_cache=False)


def _img(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))


def _user(*content):
    return {"role": "user", "content": list(content)}


def _text(t):
    return {"type": "text", "text": t}


def _same(cached, plain, messages):
    before = cached.prefix.reused_tokens
    got = cached.chat(messages, max_new_tokens=NEW)
    assert got == plain.chat(messages, max_new_tokens=NEW)
    return got, cached.prefix.reused_tokens - before


def test_off_switch(pipes):
    assert pipes[0].prefix is not None and pipes[1].prefix is None


def test_same_conversation_continued_and_shared_system_text(pipes):
    cached, plain = pipes
    cached.prefix.clear()
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = [system, _user({"type": "image", "image": str(PHOTO)}, _text("What is in this picture?"))]
    n_first = cached.encode(first).input_ids.shape[1]
    reply, reused = _same(cached, plain, first)
    assert reused == 0
    _, reused = _same(cached, plain, first)  # the same conversation again: all but the last prompt token
    assert reused == n_first - 1
    continued = first + [{"role": "assistant", "content": reply}, _user(_text("And the colours?"))]
    _, reused = _same(cached, plain, continued)
    assert reused >= n_first  # the prompt and (most of) the reply, as re-tokenized, come from the cache
    other = [system, _user(_text("Something else entirely."))]
    n_system = cached.encode([system, _user(_text(""))]).input_ids.shape[1] - 5  # up to <|im_start|>user\n
    _, reused = _same(cached, plain, other)
    assert n_system <= reused < n_first


def test_image_identity_not_pad_tokens(pipes, monkeypatch):
    """Two different images of the same size give the same pad run: the reuse stops where the image starts,
    the new image is encoded; the same image again is not encoded again."""
    cached, plain = pipes
    cached.prefix.clear()
    a = [_user(_text("Look: "), {"type": "image", "image": _img(1)}, _text("Describe it."))]
    b = [_user(_text("Look: "), {"type": "image", "image": _img(2)}, _text("Describe it."))]
    ids = cached.encode(a).input_ids[0].tolist()
    start = ids.index(cached.tokenizer.image_pad_id)
    assert ids == cached.encode(b).input_ids[0].tolist()  # identical ids
    encoded = []
    real = cached.model.image_features
    monkeypatch.setattr(cached.model, "image_features", lambda p, g, *k: encoded.append(len(g)) or real(p, g, *k))
    _same(cached, plain, a)
    _, reused = _same(cached, plain, b)
    assert reused == start and encoded == [1, 1]
    _, reused = _same(cached, plain, a + [{"role": "assistant", "content": "x"}, _user(_text("More?"))])
    assert reused > start + 1 and encoded == [1, 1]  # image a's K/V came from the cache: no third encoding


def test_bound_drops_oldest_first(pipes):
    cached, plain = pipes
    store = cached.prefix
    try:
        cached.prefix = PrefixCache(budget_tokens=60, max_entries=2)
        convs = [[_user(_text(f"Conversation {i}: " + "word " * 10))] for i in range(3)]
        for m in convs:
            _same(cached, plain, m)
            assert cached.prefix.tokens <= 60
        assert len(cached.prefix.entries) == 2
        keys = [e.key for e in cached.prefix.entries.values()]
        first = cached.encode(convs[0]).input_ids[0].tolist()
        assert all(k[:len(first)] != first for k in keys)  # the oldest went
        cached.prefix = PrefixCache(budget_tokens=10)  # an entry over the budget is not kept at all
        _same(cached, plain, convs[0])
        assert cached.prefix.tokens == 0
        element = cached.model.decoder.embed.weight.element_size()
        cfg = cached.model.decoder.cfg
        cached.prefix = PrefixCache(budget_tokens=1000)
        _same(cached, plain, convs[1])
        held = sum(e.k.nbytes + e.v.nbytes for e in cached.prefix.entries.values())
        assert held == cached.prefix.tokens * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * element
    finally:
        cached.prefix = store


def test_streamed_and_stopped_early_still_caches(pipes):
    cached, plain = pipes
    cached.prefix.clear()
    messages = [_user(_text("Tell me a story."))]
    stream = cached.chat(messages, stream=True, max_new_tokens=NEW)
    next(stream)
    stream.close()  # abandoned after the first piece: what was computed is kept
    assert len(cached.prefix.entries) == 1
    _same(cached, plain, messages)


def test_sampling_with_a_seed_is_unchanged(pipes):
    cached, plain = pipes
    cached.prefix.clear()
    messages = [_user(_text("Pick a word."))]
    gen = dict(max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=3)
    assert cached.chat(messages, **gen) == plain.chat(messages, **gen) == cached.chat(messages, **gen)


def test_prefix_key_rejects_inconsistent_grids():
    from points.runtime.prefix import prompt_key

    with pytest.raises(ValueError, match="image pad tokens do not match the grids"):
        prompt_key([1, 9, 9, 2], 9, torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]))
