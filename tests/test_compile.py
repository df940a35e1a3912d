"""The one-token decode step (the model's forward and the choice of the next token) traces into a single
graph (no graph breaks) with the static cache; the compiled engine gives the eager tokens and logits."""

import pytest
import torch

import points
from points.runtime.engine import Engine
from points.runtime.sampling import Picker
from points.tooling.measure import engine_decode, engine_generate


def test_decode_step_has_no_graph_breaks(official_dir):
    model = points.load_decoder(official_dir)
    cache = model.new_cache(2, max_len=32)
    with torch.no_grad():
        model(torch.randint(0, 1000, (2, 5)), meta=cache.reserve(5))
    meta = cache.reserve(1)
    pick = Picker(2, model.cfg.vocab_size, torch.device("cpu"), temperature=0.8, top_k=40, top_p=0.9, penalty=1.3)
    pick.draw()

    def step(tokens):
        return pick(model(tokens, meta=meta)[:, -1], tokens)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(torch.tensor([[1], [2]]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _generate(engine, prompt, steps, max_len, **rule):
    """Prefill, then `steps` tokens chosen inside the decode step (points.runtime.sampling), then one step
    that returns logits."""
    cache = engine.new_cache(1, max_len)
    pick = Picker(1, engine.decoder.cfg.vocab_size, torch.device("cpu"), **rule)
    out = [t.item() for t in engine_decode(engine, cache, engine.prefill(cache, tokens=prompt), pick, steps)]
    return out, engine.step(torch.tensor([[out[-1]]]), cache)


SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, penalty=1.3, seed=11)


@pytest.mark.parametrize("rule", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_compiled_generation_recompiles_once_per_key_block(official_dir, rule):
    """24 tokens chosen inside the step after a 240-token prompt: the cache is 512 slots (300 rounded up to
    a power of two) and the keys cross one 256-slot block boundary (16 steps in), so exactly 2 graphs for the
    choosing step, plus 1 for the logits-only step that ends `_generate`; same tokens and final logits."""
    from torch._dynamo.testing import CompileCounter

    prompt = torch.randint(0, 1000, (1, 240), generator=torch.Generator().manual_seed(7))
    expected = _generate(Engine(points.load_decoder(official_dir)), prompt, 24, 300, **rule)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = Engine(points.load_decoder(official_dir), compile=True, backend=counter)
    got = _generate(compiled, prompt, 24, 300, **rule)
    assert counter.frame_count == 3
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1])


def test_compiled_ragged_batches_one_graph_per_batch_size_and_key_block(official_dir):
    """Ragged batches of 1 to 5 rows on one compiled engine: the prompts end below slot 256 and the 12 new
    tokens cross it, so each batch size needs exactly 2 graphs (10 in all, over dynamo's default limit of 8);
    every row's tokens equal the eager engine's."""
    from torch._dynamo.testing import CompileCounter

    decoder = points.load_decoder(official_dir)
    eager = Engine(decoder)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = Engine(decoder, compile=True, backend=counter)
    g = torch.Generator().manual_seed(12)
    for batch in range(1, 6):
        lengths = torch.randint(230, 250, (batch,), generator=g)
        lengths[0] = 249
        prompts = torch.randint(0, 1000, (batch, 249), generator=g)
        runs = [[t.tolist() for t in engine_generate(e, Picker(batch, 1000, torch.device("cpu")), 12,
                                                     tokens=prompts, lengths=lengths)] for e in (eager, compiled)]
        assert runs[1] == runs[0], batch
    assert counter.frame_count == 10  # dynamo alone would stop at 8 and run the rest eagerly


def test_inductor_compiled_step_matches_eager(official_dir):
    prompt = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(8))
    expected = _generate(Engine(points.load_decoder(official_dir)), prompt, 4, 64, **SAMPLED)
    torch._dynamo.reset()
    got = _generate(Engine(points.load_decoder(official_dir), compile=True), prompt, 4, 64, **SAMPLED)
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_compiled_pipeline_chat_equals_eager(e2e_dir, pipe):
    """The whole chat loop (prefill, in-graph choice, the host reading each token one step late) on a compiled
    step gives the eager replies, greedy and sampled with a penalty, batched and ragged."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    loaded = points.load(e2e_dir)
    fast = points.Pipeline(loaded.model, loaded.tokenizer, loaded.processor,
                           Engine(loaded.model.decoder, compile=True, backend=counter))
    conversations = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Why is the sky blue?"}]]
    for gen in ({"max_new_tokens": 30}, {"max_new_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 4,
                                         "repetition_penalty": 1.2}):
        assert fast.chat_batch(conversations, **gen) == pipe.chat_batch(conversations, **gen)
        assert list(fast.chat(conversations[1], stream=True, **gen)) == list(pipe.chat(conversations[1], stream=True, **gen))
    assert 1 <= counter.frame_count <= 4  # greedy/sampled x batch 2/1, one cache size and one key block each
    # a row recording its log-probabilities (written in place by the graph): the eager step's, beside a plain row
    asked = [fast.submit(conversations[0], max_new_tokens=12, logprobs=2), fast.submit(conversations[1], max_new_tokens=12)]
    want = pipe.submit(conversations[0], max_new_tokens=12, logprobs=2)
    assert [r.text() for r in asked][0] == want.text()
    assert [t for t, _, _ in asked[0].logprobs] == [t for t, _, _ in want.logprobs] and asked[1].logprobs == []
    torch.testing.assert_close(torch.tensor([[lp, *(v for _, v in top)] for _, lp, top in asked[0].logprobs]),
                               torch.tensor([[lp, *(v for _, v in top)] for _, lp, top in want.logprobs]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_cache_write_touches_its_slots_not_the_whole_cache(rows):
    """A step's K/V write under inductor is an in-place scatter into the cache. Written into a view of one layer
    first, it was functionalised into a copy of that layer's whole cache (a loop over n_kv_heads * max_len *
    head_dim values) and back, every layer of every step: no loop of the generated code may run over max_len
    slots. One row from a fresh cache, and two rows of a three-row cache at their own lengths (`arrange`: the
    scheduler's view of its first rows)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from points.model.cache import KVCache

    cache = KVCache(3, 3 if rows > 1 else 1, 2, 8, 4096, dtype=torch.float32, device="cpu")
    view = cache.arrange([3, 5]) if rows > 1 else cache
    meta = view.reserve(1 if rows > 1 else 5)
    k, v = torch.randn(rows, meta.positions.shape[1], 2, 8), torch.randn(rows, meta.positions.shape[1], 2, 8)

    def step(k, v):
        view.store(1, meta, k, v)
        return view.keys(1, 16)[0].sum()

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step, backend="inductor", fullgraph=True), k, v)
    bounds = [int(b) for b in re.findall(r"x\d+<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
    assert bounds and max(bounds) < 4096, bounds
    for row, first in enumerate([3, 5] if rows > 1 else [0]):
        n = k.shape[1]
        torch.testing.assert_close(cache.k[1, row, :, first:first + n], k[row].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(cache.v[1, row, :, first:first + n], v[row].transpose(0, 1), rtol=0, atol=0)
    assert not cache.k[0].any() and not cache.k[2].any() and not cache.k[1, rows:].any()
