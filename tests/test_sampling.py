"""The next-token rule (points.sampling): filtering, the Gumbel-max draw's law, the penalty's bookkeeping."""

import math

import pytest
import torch

from points.runtime.sampling import Picker, filtered_probs, penalize

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])


def test_filtered_probs_top_k_and_top_p():
    full = LOGITS.softmax(-1)
    torch.testing.assert_close(filtered_probs(LOGITS, 1.0, 0, 1.0), full)
    top2 = filtered_probs(LOGITS, 1.0, 2, 1.0)
    torch.testing.assert_close(top2, torch.tensor([[math.e, 1.0, 0, 0, 0]]) / (math.e + 1.0))
    # top_p: the smallest most-likely prefix whose mass reaches top_p (here the first two: 0.52 + 0.19 >= 0.6)
    p = full[0].tolist()
    assert p[0] < 0.6 <= p[0] + p[1]
    kept = filtered_probs(LOGITS, 1.0, 0, 0.6)
    assert (kept[0, 2:] == 0).all() and (kept[0, :2] > 0).all()
    assert (filtered_probs(LOGITS, 1.0, 0, 0.01)[0] > 0).tolist() == [True, False, False, False, False]
    torch.testing.assert_close(filtered_probs(LOGITS, 0.5, 0, 1.0), (LOGITS / 0.5).softmax(-1))


@pytest.mark.parametrize("top_k, top_p, temperature, min_p", [(0, 1.0, 1.0, 0.0), (3, 1.0, 0.7, 0.0),
                                                               (0, 0.8, 1.3, 0.0), (0, 1.0, 1.0, 0.2)])
def test_gumbel_draw_follows_the_filtered_distribution(top_k, top_p, temperature, min_p):
    n = 40000
    pick = Picker(n, 5, torch.device("cpu"), temperature=temperature, top_k=top_k, top_p=top_p, seed=0, min_p=min_p)
    pick.draw()
    counts = torch.bincount(pick(LOGITS.expand(n, 5)), minlength=5).double()
    want = filtered_probs(LOGITS, temperature, top_k, top_p, min_p)[0].double()
    sigma = (n * want * (1 - want)).sqrt()
    assert (counts[want == 0] == 0).all()
    assert ((counts - n * want).abs() <= 5 * sigma + 1e-9).all(), (counts / n, want)


def test_seeded_draws_repeat_and_differ_by_seed():
    def draws(seed):
        pick = Picker(64, 5, torch.device("cpu"), temperature=1.0, seed=seed)
        pick.draw()
        return pick(LOGITS.expand(64, 5))
    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), draws(2))


def test_greedy_is_argmax_and_needs_no_noise():
    pick = Picker(1, 5, torch.device("cpu"))
    assert pick.noise is None and pick.seen is None and pick.generator is None
    pick.draw()
    assert pick(LOGITS).tolist() == [0]


def test_penalty_counts_fed_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.5]])
    assert penalize(logits, torch.tensor([[True, True, False]]), 2.0).tolist() == [[1.0, -4.0, 1.5]]
    pick = Picker(1, 3, torch.device("cpu"), penalty=2.0)
    assert pick(logits).tolist() == [0]  # nothing seen yet
    assert pick(logits, torch.tensor([[0]])).tolist() == [2]  # token 0 fed back: 2.0 -> 1.0 < 1.5
    assert pick.seen.tolist() == [[True, False, False]]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, 0, 1.0, 0.1), (0.7, 50, 0.9, 0.05),
                                                               (1.3, 0, 0.95, 0.3), (1.0, 0, 1.0, 1.0)])
def test_filters_are_transformers_warpers_in_their_order(temperature, top_k, top_p, min_p):
    """temperature, top-k, top-p, min-p: transformers' warpers in the order `generate` applies them, per row
    (one row of each rule in one call, as the scheduler's rows)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                         TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + [TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)])
    want = warpers(None, logits.clone()).softmax(-1)
    got = filtered_probs(logits, torch.full((3,), temperature), torch.full((3,), top_k), torch.full((3,), top_p),
                         torch.full((3,), min_p), k_max=top_k, p_any=top_p < 1, min_any=min_p > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert ((got > 0).sum(-1) < 1000).all()
