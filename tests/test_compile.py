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
