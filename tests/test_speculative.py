"""Speculative decoding (points/runtime/speculative.py, verified by the scheduler in one packed forward): greedy
output identical to plain decoding for every k, drafts right or wrong, inside a batch and with the prefix cache;
sampled output distributed as plain sampling (the acceptance rule, checked on a small-vocabulary model)."""

import pytest
import torch

import points
from points.runtime.generation import GenerationConfig, GenerationError, prepare
from points.runtime.prefix import PrefixCache
from points.runtime.sampling import Rule, filtered_probs
from points.runtime.scheduler import Scheduler
from points.runtime.speculative import NgramDrafter, drafter, verify

# prompts whose replies may copy them (the drafts come from the prompt and the reply so far)
TEXTS = ["Repeat after me: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat.",
         "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3",
         "Copy this table: | a | b |\n| 1 | 2 |\n| a | b |\n| 1 | 2 |",
         "Hello. Hello. Hello. Hello.",
         "Write the word again and again: tree tree tree tree",
         "def f(x): return x + 1\ndef g(x): return x + 1\ndef h(x):"]


def _conv(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def plain(e2e_dir):
    """Each prompt alone, no drafts: the tokens speculative decoding must reproduce."""
    pipe = points.load(e2e_dir, prefix_cache=False, max_batch=1, vision_cache_mb=0)
    s = pipe.scheduler

    def run(text, **gen):
        cfg = GenerationConfig(**gen)
        prompt, ids = prepare(pipe.tokenizer, pipe.processor, _conv(text), cfg, 4096)
        r = s.submit(prompt, ids, cfg)
        r.text()
        return r.token_ids
    return run


def _submit(pipe, s, text, **gen):
    cfg = GenerationConfig(**gen)
    prompt, ids = prepare(pipe.tokenizer, pipe.processor, _conv(text), cfg, 4096)
    return s.submit(prompt, ids, cfg)


class Oracle:
    """Proposes the true greedy continuation (from a plain run); `wrong`: every second draft is off by one."""

    def __init__(self, truth: dict, wrong: bool = False):
        self.truth, self.wrong = truth, wrong

    def start(self, prompt_ids):
        return _Known(self.truth[tuple(prompt_ids)], self.wrong)


class _Known:
    def __init__(self, tokens, wrong):
        self.tokens, self.wrong = tokens, wrong

    def propose(self, generated, k):
        out = list(self.tokens[len(generated):len(generated) + k])
        return [t + 1 if self.wrong and j % 2 else t for j, t in enumerate(out)]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_ngram_greedy_equals_plain(pipe, plain, k):
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=3, speculative=f"ngram:{k}")
    requests = [_submit(pipe, s, t, max_new_tokens=24) for t in TEXTS]
    while s.step():
        pass
    assert [r.token_ids for r in requests] == [plain(t, max_new_tokens=24) for t in TEXTS]
    assert sum(r.drafted_tokens for r in requests) > 0  # (the mechanism ran: drafts were verified)
    assert all(r.accepted_tokens <= r.drafted_tokens for r in requests)


@pytest.mark.parametrize("wrong", [False, True])
def test_oracle_drafts_right_or_half_wrong_give_the_same_tokens(pipe, plain, wrong):
    truth = {}
    for t in TEXTS[:3]:
        cfg = GenerationConfig(max_new_tokens=20)
        _, ids = prepare(pipe.tokenizer, pipe.processor, _conv(t), cfg, 4096)
        truth[tuple(ids)] = plain(t, max_new_tokens=20)
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=3, speculative=Oracle(truth, wrong))
    requests = [_submit(pipe, s, t, max_new_tokens=20) for t in TEXTS[:3]]
    while s.step():
        pass
    assert [r.token_ids for r in requests] == list(truth.values())
    drafted, accepted = sum(r.drafted_tokens for r in requests), sum(r.accepted_tokens for r in requests)
    if wrong:
        assert 0 < accepted < drafted
    else:  # every draft right: k + 1 tokens per forward
        assert accepted == drafted > 0


def test_rows_with_and_without_drafts_share_a_batch_with_the_prefix_cache(pipe, plain):
    """Drafting rows beside a penalised row, a row that turned drafts off and a row with log-probabilities
    (these three decode one token a step), then the same prompts again as prefix hits: all equal plain."""
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=4, speculative="ngram", prefix=PrefixCache())
    settings = [dict(max_new_tokens=16), dict(max_new_tokens=16, repetition_penalty=1.3),
                dict(max_new_tokens=16, speculative="off"), dict(max_new_tokens=16, logprobs=2)]
    for round_ in range(2):
        requests = [_submit(pipe, s, TEXTS[i], **g) for i, g in enumerate(settings)]
        while s.step():
            pass
        want = [plain(TEXTS[i], **{k: v for k, v in g.items() if k not in ("speculative", "logprobs")})
                for i, g in enumerate(settings)]
        assert [r.token_ids for r in requests] == want
        assert requests[0].drafted_tokens > 0 and all(r.drafted_tokens == 0 for r in requests[1:])
        assert len(requests[3].logprobs) == len([t for t in want[3] if t not in s.stop_ids])
        if round_:
            assert all(r.cached_tokens > 0 for r in requests)


def test_seeded_sampling_with_drafts_repeats(pipe):
    s = Scheduler(pipe.model, pipe.tokenizer, pipe.engine, max_batch=2, speculative="ngram")
    runs = []
    for _ in range(2):
        r = _submit(pipe, s, TEXTS[0], max_new_tokens=24, temperature=0.7, top_p=0.95, seed=5)
        r.text()
        runs.append(r.token_ids)
    assert runs[0] == runs[1]


def test_acceptance_rule_keeps_the_distribution_of_a_small_vocabulary_model():
    """A bigram model over 6 tokens (p(next | previous), sampled at temperature 0.8 with top-k 5): the first two
    tokens after a prompt, drawn 20,000 times with two fixed drafts verified by the rule (and the second drawn
    plainly when the first draft is rejected), follow the exact joint distribution (chi-square, 35 degrees of
    freedom, p > 0.001); a greedy rule keeps exactly the drafts argmax agrees with."""
    g = torch.Generator().manual_seed(0)
    V = 6
    table = torch.randn(V, V, generator=g) * 1.5  # logits of the next token given the previous one
    rule = Rule(temperature=0.8, top_k=5)
    probs = filtered_probs(table, rule.temperature, rule.top_k)
    last, drafts = 2, [4, 1]
    exact = probs[last][:, None] * probs  # P(t1, t2)
    logits = table[[last, *drafts]]  # what one verifying forward returns: after `last`, after d1, after d2
    counts = torch.zeros(V, V)
    n = 20000
    for _ in range(n):
        kept, nxt = verify(logits, drafts, rule, g)
        out = drafts[:kept] + [nxt]
        if len(out) < 2:
            out.append(int(torch.multinomial(probs[out[0]], 1, generator=g)))
        counts[out[0], out[1]] += 1
    expected = exact * n
    mask = expected > 0
    chi2 = float((((counts - expected) ** 2)[mask] / expected[mask]).sum())
    dof = int(mask.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert (counts[~mask] == 0).all() and p_value > 1e-3, (chi2, dof, p_value)
    greedy = Rule()
    best = table.argmax(-1).tolist()
    a, b = best[last], best[best[last]]
    assert verify(table[[last, a, b]], [a, b], greedy, None) == (2, best[b])
    wrong = (a + 1) % V
    assert verify(table[[last, wrong, 0]], [wrong, 0], greedy, None) == (0, a)


def test_ngram_proposals_and_bad_settings():
    d = NgramDrafter(k=3).start([5, 6, 7, 8, 5, 6])
    assert d.propose([], 3) == [7, 8, 5]  # "5 6" occurred before, followed by 7 8 5
    assert d.propose([7], 3) == [8, 5, 6]  # the longest suffix "5 6 7" matched
    assert d.propose([7, 9], 3) == []  # 9 never seen
    assert NgramDrafter(k=2).start([1, 2, 1]).propose([], 5) == [2, 1]  # at most k
    assert drafter("off") is None and drafter(None) is None and drafter("ngram:6").k == 6
    for bad in ("bigram", "ngram:0", "ngram:x", 3):
        with pytest.raises(ValueError, match="speculative"):
            drafter(bad)
    with pytest.raises(GenerationError, match="speculative = 'ngram:99'"):
        GenerationConfig(speculative="ngram:99")
