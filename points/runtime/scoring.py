"""Scoring: the log-probability of a given reply after a conversation, token by token, in float32.

    score = pipe.score(messages, "A cat on a mat.")      # .tokens, .logprobs, .logprob, .perplexity

The context is the prompt `chat(messages)` builds; the reply is a string (tokenized as the model would have
produced it: plain text, special-token strings read as characters) or a list of ids taken as they are;
`end=True` also scores the `<|im_end|>` that closes the turn (not added when the ids end with it). Several
(messages, reply) pairs run as one right-padded forward, their images packed into one vision call; only
the reply positions go through lm_head, and log_softmax runs on float32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from points.io.chat import build_prompt
from points.runtime.vision import padded_embeds


@dataclass(frozen=True)
class Score:
    tokens: list[int]  # the scored ids (the reply's, and <|im_end|> with end=True)
    logprobs: list[float]  # log p(token | everything before it), one per token, float32 arithmetic
    logprob: float  # their sum

    @property
    def perplexity(self) -> float:
        """exp(-mean log-probability)."""
        try:
            return math.exp(-self.logprob / len(self.tokens))
        except OverflowError:  # (a mean log-probability below -709)
            return math.inf


def reply_ids(tokenizer, reply, end: bool, vocab: int, name: str = "reply") -> list[int]:
    """The reply as the ids to score (see the module's docstring); ValueError naming `name` otherwise."""
    if isinstance(reply, str):
        ids = tokenizer.encode(reply)
    elif isinstance(reply, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in reply):
        ids = list(reply)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})")
    else:
        raise ValueError(f"{name}: expected a string or a list of token ids, got {type(reply).__name__}")
    if end and (not ids or ids[-1] != tokenizer.im_end_id):
        ids.append(tokenizer.im_end_id)
    if not ids:
        raise ValueError(f"{name}: nothing to score (an empty reply with end=False)")
    return ids


@torch.inference_mode()
def score_batch(model, tokenizer, processor, pairs: list, *, end: bool = True, attn: str = "auto",
                alone: bool = False) -> list[Score]:
    """(messages, reply) pairs -> one Score each, from one padded forward. A bad pair is named `pairs[i]` in
    the error (`alone=True`, for a single pair: by its field alone, "reply: ...")."""
    if not isinstance(pairs, list) or not pairs:
        raise ValueError("score_batch: expected a non-empty list of (messages, reply) pairs")
    rows, prompts = [], []
    limit = model.decoder.cfg.max_seq_len
    for i, pair in enumerate(pairs):
        where = "" if alone else f"pairs[{i}] "
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected (messages, reply)")
        prompt = build_prompt(pair[0], processor)
        context = prompt.token_ids(tokenizer)
        reply = reply_ids(tokenizer, pair[1], end, model.decoder.cfg.vocab_size, f"{where}reply")
        if len(context) + len(reply) > limit:
            raise ValueError(f"{where}messages + reply: {len(context)} prompt + {len(reply)} reply tokens exceed "
                             f"the context of {limit} tokens")
        rows.append((context, reply))
        prompts.append(prompt)
    device = model.decoder.embed.weight.device
    where = torch.zeros(len(rows), max(len(r) for _, r in rows), dtype=torch.long)  # the positions predicting the reply
    for b, (context, reply) in enumerate(rows):
        where[b, :len(reply)] = torch.arange(len(context) - 1, len(context) + len(reply) - 1)
    embeds = padded_embeds(model, [c + r for c, r in rows], prompts, tokenizer.eos_id, attn)
    logits = model.decoder(embeds=embeds, last=where.to(device))  # [B, K, V] float32
    out = []
    for b, (_, reply) in enumerate(rows):  # (row by row: a [B, K, V] log_softmax at once ran 4x slower on a CPU)
        logp = torch.log_softmax(logits[b, :len(reply)], dim=-1)
        values = logp.gather(1, torch.tensor(reply, device=device)[:, None])[:, 0].tolist()
        out.append(Score(list(reply), values, float(sum(values))))
    return out
