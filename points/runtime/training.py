"""Training the model as it is, apart from its math: examples, packing, the loss, the optimizer's steps.

    examples = [encode_example(conv, tokenizer, processor, max_len) for conv in conversations]
    rows = pack(examples, batch_tokens=2048)                 # several conversations per row
    loss_sum, n = row_loss(model, rows[0])                   # summed next-token loss over the row's targets

- An example is one conversation rendered as the model reads it (points.io.chat.build_conversation): its ids
  and which of them are targets (each assistant turn's tokens and its closing <|im_end|>; the prompt, the
  system text and the image positions never are).
- `pack` puts examples one after another into rows of at most `batch_tokens` tokens, in the order given;
  a row is one sequence for the model with positions restarting at 0 for each example and attention kept
  inside each (`AttentionMeta.segments`: each example's causal SDPA on its own), the images of all its
  examples encoded in one packed vision forward.
- `row_loss` computes the logits only where a target follows (lm_head on those positions, not on the
  whole row) and returns the summed cross-entropy and the number of targets, so that a step of several rows
  (gradient accumulation, several processes) divides once by the step's total.
- `RowLoss`: the model with `row_loss` as its forward (the loss alone), the module torch.distributed's
  wrappers take (DDP, FSDP2's root), so that their hooks run around a row's whole forward.
- `Schedule`: linear warm-up, then cosine decay to zero; `checkpoint_blocks`: gradient checkpointing of each
  decoder and vision block (recomputed in the backward pass; the modules are not changed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from points.io.chat import build_conversation
from points.model.attention import AttentionMeta


@dataclass
class Example:
    id: str
    ids: torch.Tensor  # [L] int64
    targets: torch.Tensor  # [L] bool: ids[t] is learned (predicted from ids[:t])
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None


def encode_example(messages: list[dict], tokenizer, processor, max_len: int, id: str = "conversation") -> Example:
    """One conversation -> an Example; ValueError (naming `id`) when it has no target or is over max_len."""
    conv = build_conversation(messages, processor)
    ids, targets = conv.token_ids(tokenizer)
    if len(ids) > max_len:
        raise ValueError(f"{id}: {len(ids)} tokens, over the {max_len} a row holds (--batch-tokens / the context)")
    if not any(targets[1:]):
        raise ValueError(f"{id}: no target token (its assistant turns are empty)")
    return Example(id, torch.tensor(ids, dtype=torch.long), torch.tensor(targets), conv.pixel_values, conv.grid_thw)


@dataclass
class Row:
    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]: 0.. within each example
    bounds: tuple[int, ...]  # (0, end of example 1, ..., T)
    targets: torch.Tensor  # [T] bool; never the first token of an example
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None
    examples: tuple[str, ...]

    @property
    def n_targets(self) -> int:
        return int(self.targets.sum())

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def pack(examples: list[Example], batch_tokens: int) -> list[Row]:
    """Consecutive examples into rows of at most batch_tokens tokens each (an example is never split; one
    longer than batch_tokens is an error, checked by `encode_example`'s max_len)."""
    rows, group, used = [], [], 0
    for ex in examples:
        if len(ex.ids) > batch_tokens:
            raise ValueError(f"{ex.id}: {len(ex.ids)} tokens, over --batch-tokens {batch_tokens}")
        if group and used + len(ex.ids) > batch_tokens:
            rows.append(_row(group))
            group, used = [], 0
        group.append(ex)
        used += len(ex.ids)
    if group:
        rows.append(_row(group))
    return rows


def _row(group: list[Example]) -> Row:
    bounds = [0]
    for ex in group:
        bounds.append(bounds[-1] + len(ex.ids))
    targets = torch.cat([torch.cat((torch.zeros(1, dtype=torch.bool), ex.targets[1:])) for ex in group])
    pixels = [ex.pixel_values for ex in group if ex.pixel_values is not None]
    grids = [ex.grid_thw for ex in group if ex.grid_thw is not None]
    return Row(torch.cat([ex.ids for ex in group]), torch.cat([torch.arange(len(ex.ids)) for ex in group]),
               tuple(bounds), targets, torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None,
               tuple(ex.id for ex in group))


def row_loss(model, row: Row) -> tuple[torch.Tensor, int]:
    """(the summed next-token cross-entropy over the row's targets, float32; how many targets). The model is
    a POINTSModel (or a Decoder alone, for rows without images); the row is moved to its device."""
    decoder = getattr(model, "decoder", model)
    device = decoder.embed.weight.device
    ids = row.ids.to(device)[None]
    if row.pixel_values is not None:
        embeds = model.embed(ids, model.image_features(row.pixel_values.to(device), row.grid_thw))
    else:
        embeds = decoder.embed(ids)
    meta = AttentionMeta(row.positions.to(device)[None], row.n_tokens, fresh=True, segments=row.bounds)
    where = torch.nonzero(row.targets).squeeze(1)  # token t is predicted at position t - 1
    logits = decoder(embeds=embeds, meta=meta, last=(where - 1).to(device)[None])[0]  # [K, vocab] float32
    return F.cross_entropy(logits, ids[0, where.to(device)], reduction="sum"), len(where)


class RowLoss(nn.Module):
    """`row_loss(model, row)[0]` as a module's forward; `.model` is the model itself (its parameters are this
    module's, under the prefix "model.")."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, row: Row) -> torch.Tensor:
        return row_loss(self.model, row)[0]


class Schedule:
    """The learning-rate factor at optimizer step s (0-based): linear warm-up over `warmup` steps to 1, then a
    cosine from 1 to 0 at step `total`."""

    def __init__(self, total: int, warmup: int):
        self.total, self.warmup = max(total, 1), min(max(warmup, 0), max(total, 1))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - self.warmup, span) / span))


def checkpoint_blocks(model) -> int:
    """Gradient checkpointing for every decoder and vision block: each block's activations are recomputed in
    the backward pass instead of kept (an instance-level forward; the module's state and state_dict are
    unchanged). Returns how many blocks."""
    blocks = list(getattr(model, "decoder", model).layers) + list(getattr(getattr(model, "vision", None), "blocks", []))
    for block in blocks:
        plain = type(block).forward.__get__(block)
        block.forward = _checkpointed(plain)
    return len(blocks)


def _checkpointed(forward):
    def run(*args):
        if not torch.is_grad_enabled():
            return forward(*args)
        return checkpoint(forward, *args, use_reentrant=False)
    return run
