"""Batched and chunked prefill (points/runtime/scheduler.py, runner.py): prompts admitted together run in one
packed forward, a prompt longer than the step's budget is prefilled a chunk at a time between the running rows'
tokens, and every greedy float32 reply still equals the conversation alone."""

from pathlib import Path

import matplotlib
import pytest
from PIL import Image

import points
from points.runtime.generation import GenerationConfig, prepare
from points.runtime.prefix import PrefixCache
from points.runtime.scheduler import Scheduler


def _conv(i: int, image=None, words: int = 0):
    content = [{"type": "text", "text": f"Tell me about number {i}. " + "More words here. " * (i % 5 + words)}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunks") / "p.png"
    Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").resize((84, 112)).save(path)
    return path


@pytest.fixture(scope="module")
def alone(e2e_dir):
    pipe = points.load(e2e_dir, prefix_cache=False, max_batch=1, vision_cache_mb=0)
    return lambda messages, **gen: pipe.chat(messages, **gen)


def _submit(pipe, s, messages, **gen):
    cfg = GenerationConfig(**gen)
    prompt, ids = prepare(pipe.tokenizer, pipe.processor, messages, cfg, pipe.model.decoder.cfg.max_seq_len)
    return s.submit(prompt, ids, cfg)


def _counting(s, monkeypatch):
    """The runner's packed forwards, as the segments (row, first position, tokens) of each."""
    calls, real = [], s.engine.packed

    def packed(cache, segments, embeds, want):
        calls.append(list(segments))
        return real(cache, segments, embeds, want)

    monkeypatch.setattr(s.engine, "packed", packed)
    return calls


def test_prompts_admitted_together_share_one_forward(pipe, alone, monkeypatch):
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=4, max_prefill_tokens=4096)
    calls = _counting(s, monkeypatch)
    requests = [_submit(pipe, s, _conv(i), max_new_tokens=5) for i in range(3)]
    s.step()
    assert len(calls) == 1 and sorted(row for row, _, _ in calls[0]) == [0, 1, 2]
    assert [n for _, _, n in calls[0]] == [len(r.ids) for r in requests] and all(start == 0 for _, start, _ in calls[0])
    while s.step():
        pass
    assert [r.reply for r in requests] == [alone(_conv(i), max_new_tokens=5) for i in range(3)]


def test_a_long_image_prompt_joins_a_running_batch_in_chunks(pipe, alone, photo, monkeypatch):
    """A prompt (an image and text) over 5x the budget arrives while two rows generate: it is prefilled over several
    steps and each of those steps gives the running rows one token; every reply equals its own alone."""
    budget = 12
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=3, max_prefill_tokens=budget)
    calls = _counting(s, monkeypatch)
    running = [_submit(pipe, s, _conv(i), max_new_tokens=40) for i in (1, 2)]
    while not all(s.rows[i] is not None and s.rows[i].chosen for i in (0, 1)):
        s.step()
    long_conv = _conv(3, photo, words=6)
    late = _submit(pipe, s, long_conv, max_new_tokens=6)
    assert len(late.ids) > 5 * budget
    before = [len(s.rows[i].chosen) for i in (0, 1)]
    steps = 0
    while late.first_token_at is None:
        s.step()
        steps += 1
        assert [len(s.rows[i].chosen) for i in (0, 1)] == [b + steps for b in before]  # a token every step
    assert steps == -(-len(late.ids) // budget)
    chunks = [seg for call in calls[-steps:] for seg in call if seg[0] == 2]
    assert [n for _, _, n in chunks][:-1] == [budget] * (steps - 1) and sum(n for _, _, n in chunks) == len(late.ids)
    assert [start for _, start, _ in chunks] == [budget * k for k in range(steps)]
    while s.step():
        pass
    assert late.reply == alone(long_conv, max_new_tokens=6) and late.images_encoded == 1
    assert [r.reply for r in running] == [alone(_conv(i), max_new_tokens=40) for i in (1, 2)]


def test_staggered_chunks_cancels_and_prefix_hits(pipe, alone, photo):
    """Arrivals a step apart on a small budget, one cancelled between two of its chunks, a second turn that
    restores its first turn from the prefix cache and prefills the rest in chunks: the rest equal alone."""
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=3, max_prefill_tokens=24, prefix=PrefixCache())
    first = _conv(1, photo)
    r1 = _submit(pipe, s, first, max_new_tokens=5)
    gone = _submit(pipe, s, _conv(4, words=8), max_new_tokens=20)
    s.step()
    s.step()
    assert any(r is not None and r.request is gone and r.prefilling for r in s.rows)
    gone.cancel()
    others = [_submit(pipe, s, _conv(i), max_new_tokens=4 + i) for i in range(2)]
    while not r1.done:
        s.step()
    second = first + [{"role": "assistant", "content": r1.reply},
                      {"role": "user", "content": "And then? " + "Say more about it. " * 6}]
    hits = s.prefix.hits
    r2 = _submit(pipe, s, second, max_new_tokens=6)
    while s.step():
        pass
    assert gone.finish_reason == "cancelled" and gone.completion_tokens == 0
    assert s.prefix.hits > hits and r2.cached_tokens > 0 and len(r2.ids) - r2.cached_tokens > 24
    assert r1.reply == alone(first, max_new_tokens=5) and r2.reply == alone(second, max_new_tokens=6)
    assert [r.reply for r in others] == [alone(_conv(i), max_new_tokens=4 + i) for i in range(2)]


def test_budget_is_checked(pipe, e2e_dir):
    with pytest.raises(ValueError, match="max_prefill_tokens = 0"):
        Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="max_prefill_tokens = 'a'"):
        points.load(e2e_dir, max_prefill_tokens="a")
