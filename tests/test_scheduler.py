"""The continuous-batching scheduler (points/runtime/scheduler.py, runner.py): whatever joins or leaves the
batch, every greedy float32 reply equals the conversation run alone; each row keeps its own settings; failures
stay in their request; prompts admitted together run in one packed forward and a prompt longer than the step's
budget is prefilled a chunk at a time between the running rows' tokens."""

from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

import points
from points.runtime.engine import Engine
from points.runtime.generation import GenerationConfig, prepare
from points.runtime.prefix import PrefixCache
from points.runtime.scheduler import MAX_PREFILL_TOKENS, QueueFull, Scheduler
from points.tooling import run, serve


def _conv(i: int, image=None, words: int = 0):
    content = [{"type": "text", "text": f"Tell me about number {i}. " + "More words here. " * (i % 5 + words)}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched") / "p.png"
    Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").resize((56, 84)).save(path)
    return path


@pytest.fixture(scope="module")
def alone(e2e_dir):
    """Each conversation on a scheduler of its own (max_batch 1, no prefix cache): the reference replies."""
    pipe = points.load(e2e_dir, prefix_cache=False, max_batch=1)
    return lambda messages, **gen: pipe.chat(messages, **gen)


def _scheduler(pipe, **kw):
    return Scheduler(pipe.model, pipe.tokenizer, pipe.engine, **kw)


def _submit(pipe, scheduler, messages, **gen):
    cfg = GenerationConfig(**gen)
    prompt, ids = prepare(pipe.tokenizer, pipe.processor, messages, cfg, pipe.model.decoder.cfg.max_seq_len)
    return scheduler.submit(prompt, ids, cfg)


def test_staggered_arrivals_and_departures_equal_each_alone(pipe, alone, photo):
    """Ten requests of different lengths, images and max_new_tokens arrive a few steps apart on 3 rows; rows
    leave at their own ends and are reused at once: every reply is the one it gets alone."""
    s = _scheduler(pipe, max_batch=3)
    convs = [(_conv(i, photo if i % 3 == 0 else None), 3 + 2 * (i % 4)) for i in range(10)]
    requests = []
    for i, (m, new) in enumerate(convs):
        requests.append(_submit(pipe, s, m, max_new_tokens=new))
        for _ in range(i % 3):  # a few steps before the next one arrives
            s.step()
    while s.step():
        pass
    for r, (m, new) in zip(requests, convs):
        assert r.done and r.reply == alone(m, max_new_tokens=new)
        assert r.completion_tokens <= new and r.finish_reason in ("stop", "length")
        assert len(r.token_ids) == r.completion_tokens and pipe.tokenizer.decode(r.token_ids) == r.reply
        assert (r.token_ids[-1] in s.stop_ids) == (r.finish_reason == "stop")


def test_cancelled_rows_leave_and_others_are_unchanged(pipe, alone):
    s = _scheduler(pipe, max_batch=2)
    keep = [_submit(pipe, s, _conv(i), max_new_tokens=9) for i in range(3)]
    gone = _submit(pipe, s, _conv(7), max_new_tokens=30)
    s.step()
    s.step()
    keep[0].cancel()  # mid-generation
    gone.cancel()  # still waiting
    while s.step():
        pass
    assert keep[0].finish_reason == "cancelled" and gone.finish_reason == "cancelled" and gone.reply == ""
    for r, i in zip(keep[1:], (1, 2)):
        assert r.reply == alone(_conv(i), max_new_tokens=9)


def test_prefix_hits_inside_a_busy_batch(pipe, alone, photo):
    """A second turn of a conversation reuses the first turn's K/V while other rows run: the same reply."""
    s = _scheduler(pipe, max_batch=3, prefix=PrefixCache())
    first = _conv(1, photo)
    r1 = _submit(pipe, s, first, max_new_tokens=6)
    other = _submit(pipe, s, _conv(2), max_new_tokens=12)
    while not r1.done:
        s.step()
    second = first + [{"role": "assistant", "content": r1.reply}, {"role": "user", "content": "And then?"}]
    hits = s.prefix.hits
    r2 = _submit(pipe, s, second, max_new_tokens=6)
    while s.step():
        pass
    assert s.prefix.hits == hits + 1 and s.prefix.reused_tokens > 0
    assert r2.reply == alone(second, max_new_tokens=6) and other.reply == alone(_conv(2), max_new_tokens=12)


def test_rows_keep_their_own_settings(pipe, alone):
    """Greedy, penalised, stop-string and seeded rows together: each equals its own alone (the seeded one
    too: its noise comes from its own generator)."""
    settings = [dict(max_new_tokens=8), dict(max_new_tokens=8, repetition_penalty=1.5),
                dict(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9, seed=3),
                dict(max_new_tokens=8, temperature=1.2, seed=11, min_p=0.02)]
    want = [alone(_conv(i), **g) for i, g in enumerate(settings)]
    s = _scheduler(pipe, max_batch=4)
    requests = [_submit(pipe, s, _conv(i), **g) for i, g in enumerate(settings)]
    while s.step():
        pass
    assert [r.reply for r in requests] == want
    text = want[0]
    if len(text) > 2:  # a stop string cuts the reply before it
        r = _submit(pipe, s, _conv(0), max_new_tokens=8, stop=[text[1:3]])
        while s.step():
            pass
        assert r.reply == text[:text.find(text[1:3])] and r.finish_reason == "stop"


def test_cache_grows_while_rows_run(pipe, alone):
    """A long request joining a batch whose cache is short: the cache grows, the running row's K/V carried."""
    s = _scheduler(pipe, max_batch=2)
    short = _submit(pipe, s, _conv(1), max_new_tokens=10)
    s.step()
    size = s.cache.max_len
    longer = _conv(4) + [{"role": "assistant", "content": "ok " * 300}, {"role": "user", "content": "again"}]
    big = _submit(pipe, s, longer, max_new_tokens=5)
    while s.step():
        pass
    assert s.cache.max_len > size
    assert short.reply == alone(_conv(1), max_new_tokens=10) and big.reply == alone(longer, max_new_tokens=5)


def test_a_failing_request_fails_alone(pipe, alone, monkeypatch):
    s = _scheduler(pipe, max_batch=2)
    ok = _submit(pipe, s, _conv(1), max_new_tokens=6)
    bad = _submit(pipe, s, _conv(2), max_new_tokens=6)
    real = s._begin

    def begin(i, request):
        if request is bad:
            raise ValueError("this request's image broke")
        return real(i, request)

    monkeypatch.setattr(s, "_begin", begin)
    while s.step():
        pass
    assert bad.finish_reason == "error" and "image broke" in str(bad.error)
    assert ok.reply == alone(_conv(1), max_new_tokens=6)
    with pytest.raises(ValueError, match="image broke"):
        bad.text()


def test_a_failing_step_ends_its_rows_and_the_scheduler_goes_on(pipe, alone, monkeypatch):
    s = _scheduler(pipe, max_batch=2)
    hit = [_submit(pipe, s, _conv(i), max_new_tokens=6) for i in range(2)]
    s.step()
    real = s.engine.step

    def boom(*a, **k):
        raise torch.OutOfMemoryError("no memory for the batch")

    monkeypatch.setattr(s.engine, "step", boom)
    with pytest.raises(torch.OutOfMemoryError):
        s.step()
    assert all(r.finish_reason == "error" and r.step_failed for r in hit)
    monkeypatch.setattr(s.engine, "step", real)
    later = _submit(pipe, s, _conv(3), max_new_tokens=6)
    while s.step():
        pass
    assert later.reply == alone(_conv(3), max_new_tokens=6)


def test_queue_bound_and_bad_settings(pipe):
    s = _scheduler(pipe, max_batch=1, max_queue=2)
    for i in range(2):
        _submit(pipe, s, _conv(i), max_new_tokens=2)
    with pytest.raises(QueueFull, match="max_queue 2"):
        _submit(pipe, s, _conv(3), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_batch = 0"):
        _scheduler(pipe, max_batch=0)


def test_worker_thread_serves_waiting_iterators(pipe, alone):
    """With the worker thread, requests only wait for their events; stop() ends it and cancels what runs."""
    s = _scheduler(pipe, max_batch=2)
    s.start()
    try:
        requests = [_submit(pipe, s, _conv(i), max_new_tokens=5) for i in range(3)]
        assert [r.text() for r in requests] == [alone(_conv(i), max_new_tokens=5) for i in range(3)]
        long = _submit(pipe, s, _conv(4), max_new_tokens=500)
    finally:
        s.stop()
    assert long.done and s._thread is None


def test_worker_thread_survives_a_failed_step(pipe, alone, monkeypatch, capsys):
    s = _scheduler(pipe, max_batch=2)
    real, calls = s.engine.step, []

    def fails_once(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("no memory for the batch")
        return real(*a, **k)

    monkeypatch.setattr(s.engine, "step", fails_once)
    s.start()
    try:
        hit = _submit(pipe, s, _conv(1), max_new_tokens=6)
        with pytest.raises(torch.OutOfMemoryError):
            hit.text()
        assert _submit(pipe, s, _conv(2), max_new_tokens=6).text() == alone(_conv(2), max_new_tokens=6)
    finally:
        s.stop()
    assert "a decode step failed (OutOfMemoryError" in capsys.readouterr().err


def test_cancels_from_another_thread_during_admission_never_take_a_decode_step(pipe, alone, monkeypatch):
    """A client that goes away while its request is being popped from the queue or admitted (the server's
    case: the first chunk is sent before the request has a row): it leaves in that same step, no forward
    runs for it, and `load()` counts it as busy or waiting at every moment until it has ended."""
    s = _scheduler(pipe, max_batch=2)
    early = _submit(pipe, s, _conv(1), max_new_tokens=30)  # cancelled after its pop, before its admission
    late = _submit(pipe, s, _conv(2), max_new_tokens=30)  # cancelled during its admission
    other = _submit(pipe, s, _conv(3), max_new_tokens=6)
    real, seen = s._begin, []

    def begin(i, request):
        seen.append((request, s.load()))
        if request is late:
            late.cancel()
        return real(i, request)

    class Queue(list):
        def pop(self, *a):
            r = list.pop(self, *a)
            if r is early:
                early.cancel()
            return r

    s.waiting = Queue(s.waiting)
    monkeypatch.setattr(s, "_begin", begin)
    decoded = []
    monkeypatch.setattr(s, "_run", lambda real_run=s._run: (decoded.append(
        [r.request for r in s.rows if r is not None]), real_run())[1])
    s.step()
    assert early.finish_reason == "cancelled" and early.completion_tokens == 0
    assert late.finish_reason == "cancelled" and late.completion_tokens == 0
    assert [r for r, _ in seen] == [late, other] and seen[0][1] == (1, 1)  # late prefilling, other waiting
    assert decoded == [[other]]
    while s.step():
        pass
    assert other.reply == alone(_conv(3), max_new_tokens=6) and s.load() == (0, 0)


def test_a_failing_prefix_cache_and_cancels_from_callbacks_end_no_other_request(pipe, alone, monkeypatch, capsys):
    """The prefix cache failing to keep a finished row (memory) ends that request normally; a callback that
    cancels another request, or its own, in the middle of a step leaves the rest of the batch running."""
    s = _scheduler(pipe, max_batch=3, prefix=PrefixCache())
    monkeypatch.setattr(s.prefix, "put", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("no room")))
    first = _submit(pipe, s, _conv(1), max_new_tokens=5)
    assert first.text() == alone(_conv(1), max_new_tokens=5) and first.finish_reason in ("stop", "length")
    assert "could not keep a finished request (OutOfMemoryError" in capsys.readouterr().err
    victim = _submit(pipe, s, _conv(2), max_new_tokens=40)
    cfg = GenerationConfig(max_new_tokens=40)
    prompt, ids = prepare(pipe.tokenizer, pipe.processor, _conv(3), cfg, pipe.model.decoder.cfg.max_seq_len)
    killer = s.submit(prompt, ids, cfg, on_event=lambda r, e: (victim.cancel(), r.cancel()))
    survivor = _submit(pipe, s, _conv(4), max_new_tokens=6)
    while s.step():
        pass
    assert victim.finish_reason == "cancelled" and killer.finish_reason == "cancelled"
    assert survivor.reply == alone(_conv(4), max_new_tokens=6)


def test_an_unstarted_stream_that_is_dropped_is_cancelled(pipe):
    s = pipe.scheduler
    stream = pipe.chat(_conv(5), stream=True, max_new_tokens=50)
    request = stream.request
    del stream
    assert request.finish_reason == "cancelled" and not s.waiting


def test_compiled_step_with_idle_rows_equals_eager(e2e_dir, alone):
    """The compiled step runs the busy rows rounded up to a power of two (1, 2, then 3 = max_batch rows here,
    a free row in between ignored): the replies of staggered requests equal the eager ones alone."""
    pipe = points.load(e2e_dir, prefix_cache=False, max_batch=3)
    pipe.engine = Engine(pipe.model.decoder, compile=True, backend="eager", notice=None)
    s = _scheduler(pipe, max_batch=3)
    requests = []
    for i in range(4):
        requests.append(_submit(pipe, s, _conv(i), max_new_tokens=4 + i))
        s.step()
    while s.step():
        pass
    assert [r.reply for r in requests] == [alone(_conv(i), max_new_tokens=4 + i) for i in range(4)]


# --------------------------------------------------------------------------- batched and chunked prefill

def _counting(s, monkeypatch):
    """The runner's packed forwards, as the segments (row, first position, tokens) of each."""
    calls, real = [], s.engine.packed

    def packed(cache, segments, embeds, want):
        calls.append(list(segments))
        return real(cache, segments, embeds, want)

    monkeypatch.setattr(s.engine, "packed", packed)
    return calls


def test_prompts_admitted_together_share_one_forward(pipe, alone, monkeypatch):
    s = _scheduler(pipe, max_batch=4, max_prefill_tokens=4096)
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
    s = _scheduler(pipe, max_batch=3, max_prefill_tokens=budget)
    calls = _counting(s, monkeypatch)
    running = [_submit(pipe, s, _conv(i), max_new_tokens=40) for i in (1, 2)]
    while not all(s.rows[i] is not None and s.rows[i].chosen for i in (0, 1)):
        s.step()
    long_conv = _conv(3, photo, words=10)
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
    s = _scheduler(pipe, max_batch=3, max_prefill_tokens=24, prefix=PrefixCache())
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
        _scheduler(pipe, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="max_prefill_tokens = 'a'"):
        points.load(e2e_dir, max_prefill_tokens="a")
    # the commands' flag writes the scheduler's default out (their --help imports no torch)
    assert run.parser().get_default("max_prefill_tokens") == MAX_PREFILL_TOKENS
    assert serve.parser().get_default("max_prefill_tokens") == MAX_PREFILL_TOKENS


def test_ignore_eos_runs_every_step(pipe):
    """With ignore_eos a stop token ends no reply (`points bench` times every step this way): the same tokens as
    a reply that does not meet one, all max_new_tokens of them; without it the reply ends there."""
    s = _scheduler(pipe, max_batch=2)
    plain = _submit(pipe, s, _conv(1), max_new_tokens=8)
    plain.text()
    s.stop_ids = {plain.token_ids[2]}  # (a token this reply meets, made a stop token)
    stopped = _submit(pipe, s, _conv(1), max_new_tokens=8)
    kept = _submit(pipe, s, _conv(1), max_new_tokens=8, ignore_eos=True)
    while s.step():
        pass
    first = plain.token_ids.index(plain.token_ids[2]) + 1
    assert stopped.finish_reason == "stop" and stopped.token_ids == plain.token_ids[:first]
    assert kept.finish_reason == "length" and kept.token_ids == plain.token_ids and kept.completion_tokens == 8
    with pytest.raises(ValueError, match="ignore_eos = 'yes'"):
        GenerationConfig(ignore_eos="yes")
