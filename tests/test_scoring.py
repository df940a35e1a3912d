"""Scoring (points/runtime/scoring.py): log-probabilities of a given reply, against a hand-computed full
forward, against transformers' Qwen2ForCausalLM on the same ids, and against greedy generation's own choices."""

from pathlib import Path

import matplotlib
import pytest
import torch

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
TEXT = [{"role": "user", "content": "Tell me about rivers."}]
IMAGE = [{"role": "user", "content": [{"type": "image", "image": PHOTO}, {"type": "text", "text": "What is this?"}]}]


def _by_hand(pipe, messages, ids):
    """log_softmax of the whole sequence's float32 logits at the positions that predict `ids`."""
    enc = pipe.encode(messages)
    full = torch.cat([enc.input_ids, torch.tensor([ids])], dim=1)
    with torch.no_grad():
        logp = pipe.model(full, enc.pixel_values, enc.grid_thw)[0].log_softmax(-1)
    n = enc.input_ids.shape[1]
    return [logp[n - 1 + i, t].item() for i, t in enumerate(ids)]


@pytest.mark.parametrize("messages", [TEXT, IMAGE], ids=["text", "image"])
def test_score_equals_the_full_forward_by_hand(pipe, messages):
    s = pipe.score(messages, "A river of stone.")
    assert s.tokens == pipe.tokenizer.encode("A river of stone.") + [pipe.tokenizer.im_end_id]
    torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(_by_hand(pipe, messages, s.tokens)),
                               rtol=0, atol=1e-5)
    assert s.logprob == pytest.approx(sum(s.logprobs)) and s.perplexity == pytest.approx(
        torch.tensor(s.logprobs, dtype=torch.float64).mean().neg().exp().item())


def test_score_matches_transformers_log_softmax(pipe, e2e_reference):
    reference = e2e_reference[0]
    reply = pipe.tokenizer.encode("Water runs downhill, mostly.")
    s = pipe.score(TEXT, reply, end=False)
    context = pipe.encode(TEXT).input_ids[0].tolist()
    with torch.no_grad():
        logp = reference(torch.tensor([context + reply])).logits[0].float().log_softmax(-1)
    want = [logp[len(context) - 1 + i, t].item() for i, t in enumerate(reply)]
    print(f"\nscore vs transformers' log_softmax, fp32: max |error| "
          f"{(torch.tensor(s.logprobs) - torch.tensor(want)).abs().max().item():.2g} over {len(reply)} tokens")
    torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(want), rtol=0, atol=1e-4)


def test_score_of_a_greedy_reply_is_its_own_choice_probabilities(pipe):
    """Greedy generation step by step (the engine's prefill and steps, logits kept): the log-probability of
    each chosen token equals what score() gives for those ids."""
    engine, ids = pipe.engine, pipe.encode(TEXT).input_ids
    cache = engine.new_cache(1, ids.shape[1] + 12)
    logits, chosen, logps = engine.prefill(cache, tokens=ids), [], []
    for _ in range(10):
        lp = logits.log_softmax(-1)[0]
        t = int(lp.argmax())
        chosen.append(t)
        logps.append(lp[t].item())
        logits = engine.step(torch.tensor([[t]]), cache)
    s = pipe.score(TEXT, chosen, end=False)
    assert s.tokens == chosen
    torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(logps), rtol=0, atol=1e-5)


def test_score_batch_rows_equal_each_alone(pipe):
    pairs = [(TEXT, "Short."), (IMAGE, "A woman in uniform, a portrait of an officer."), (TEXT, [11, 12, 13]),
             (IMAGE, "")]
    batch = pipe.score_batch(pairs)
    for got, (m, r) in zip(batch, pairs):
        alone = pipe.score(m, r)
        assert got.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-4)
    assert batch[3].tokens == [pipe.tokenizer.im_end_id]  # an empty reply with end=True: the closing token only


def test_end_is_not_added_twice_and_bad_replies_are_named(pipe):
    end = pipe.tokenizer.im_end_id
    assert pipe.score(TEXT, [5, end]).tokens == [5, end]
    with pytest.raises(ValueError, match=r"^reply: token id -1 is outside the vocabulary"):
        pipe.score(TEXT, [-1])
    with pytest.raises(ValueError, match=r"^reply: expected a string or a list of token ids"):
        pipe.score(TEXT, 3.5)
    with pytest.raises(ValueError, match="nothing to score"):
        pipe.score(TEXT, "", end=False)
    with pytest.raises(ValueError, match=r"^pairs\[1\] reply: token id 1000000 is outside"):
        pipe.score_batch([(TEXT, "fine"), (TEXT, [1_000_000])])
    with pytest.raises(ValueError, match="score_batch: expected a non-empty list"):
        pipe.score_batch([])


@pytest.mark.parametrize("messages", [TEXT, IMAGE], ids=["text", "image"])
@pytest.mark.parametrize("gen", [dict(), dict(temperature=1.0, top_k=50, repetition_penalty=1.3, seed=2)],
                         ids=["greedy", "sampled"])
def test_a_replys_logprobs_are_its_score(pipe, messages, gen):
    """logprobs=n records each generated token's log-probability under the model's own distribution (before
    the penalty, temperature and filters: vLLM's default) and the n most likely: equal to `Pipeline.score` of
    the same ids within 1e-5, in a batch beside a row that asks for none; greedy chooses the most likely."""
    request = pipe.submit(messages, max_new_tokens=10, logprobs=3, **gen)
    other = pipe.submit(TEXT, max_new_tokens=6, **gen)
    request.text(), other.text()
    assert other.logprobs == []
    ids = [t for t, _, _ in request.logprobs]
    assert ids == [t for t in request.token_ids if t not in (pipe.tokenizer.im_end_id, pipe.tokenizer.eos_id)]
    score = pipe.score(messages, ids, end=False)
    torch.testing.assert_close(torch.tensor([lp for _, lp, _ in request.logprobs]), torch.tensor(score.logprobs),
                               rtol=0, atol=1e-5)
    for token, lp, top in request.logprobs:
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0][1] >= lp - 1e-6 and (token, lp) in top or lp <= top[-1][1] + 1e-6
        if not gen:
            assert top[0][0] == token
