"""The one-token decode step traces into a single graph (no graph breaks) with the static cache."""

import torch

import points


def test_decode_step_has_no_graph_breaks(official_dir):
    model = points.load_decoder(official_dir)
    cache = model.new_cache(2, max_len=32)
    with torch.no_grad():
        model(torch.randint(0, 1000, (2, 5)), cache=cache)

    def step(tokens):
        return model(tokens, cache=cache)[:, -1]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(torch.tensor([[1], [2]]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _greedy(model, prompt, steps, max_len):
    cache = model.new_cache(1, max_len=max_len)
    with torch.no_grad():
        logits = model(prompt, cache=cache)[:, -1]
        out = []
        for _ in range(steps):
            nxt = logits.argmax(-1)
            out.append(nxt.item())
            logits = model.decode_step(nxt[:, None], cache)
    return out, logits


def test_compiled_decode_recompiles_once_per_key_block(official_dir):
    """200 generated tokens after a 100-token prompt cross one 256-slot block boundary: exactly 2 graphs."""
    from torch._dynamo.testing import CompileCounter

    prompt = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(7))
    eager = points.load_decoder(official_dir)
    expected = _greedy(eager, prompt, 200, 512)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = points.load_decoder(official_dir).compile(backend=counter)
    got = _greedy(compiled, prompt, 200, 512)
    assert counter.frame_count == 2
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1])


def test_inductor_compiled_step_matches_eager(official_dir):
    prompt = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(8))
    expected = _greedy(points.load_decoder(official_dir), prompt, 4, 64)
    torch._dynamo.reset()
    got = _greedy(points.load_decoder(official_dir).compile(), prompt, 4, 64)
    assert got[0] == expected[0]
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
