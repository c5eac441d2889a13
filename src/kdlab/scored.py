"""One forward pass that returns the model's outputs only at the positions that predict answer tokens.

Batches are left-padded (`training.TrainCollator` collates them with `padding_side="left"`), so every row's
answer tokens sit at the end and a single `logits_to_keep` slice covers them: the vocabulary projection runs
on a few positions instead of the whole prompt. The student, the live teacher and the teacher-cache builder
all gather their outputs here, so row *i* of every signal refers to the same token of the same example
(row-major over the batch).

A packed batch (`pack`, `training.packing`) holds the same sequences back to back in one row without padding:
`position_ids` restart at 0 for each sequence and there is no attention mask, so transformers' mask utilities
(or flash-attention's varlen path) keep attention within each sequence. Its answer positions are gathered by
index (`logits_to_keep` as a tensor), in the same order as the padded layout: sequence by sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdlab.tasks.base import IGNORE_INDEX, Encoded

SEQ_LENGTHS = "seq_lengths"  # the key that marks a packed batch: each sequence's length, [B]


@dataclass
class Scored:
    logits: torch.Tensor  # [N, V]: N answer tokens of the batch, row-major
    targets: torch.Tensor  # [N]
    hidden: dict[int, torch.Tensor]  # hidden_states index -> [N, d]
    counts: torch.Tensor  # [B]: answer tokens per row (to split N back into examples)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (needed by absolute-position models; harmless for RoPE)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pack(features: Sequence[Encoded]) -> dict[str, Any]:
    """A padding-free batch: every sequence's tokens back to back in one row ([1, T] `input_ids`, `labels`,
    `position_ids` restarting at 0 per sequence), `seq_lengths` [B] and `example_ids`; no attention mask.

    Each sequence must open with a prompt token (label -100): the logits at the last token of a sequence
    would otherwise "predict" the next sequence's first token.
    """
    if not features:
        raise ValueError("pack: empty batch")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        if len(f.labels) != len(f.input_ids) or not f.input_ids:
            raise ValueError(f"example {f.id!r}: {len(f.labels)} labels for {len(f.input_ids)} input ids")
        if f.labels[0] != IGNORE_INDEX:
            raise ValueError(f"{f.id!r}: a packed sequence must open with a prompt token (label -100)")
        ids.extend(f.input_ids)
        labels.extend(f.labels)
        positions.extend(range(len(f.input_ids)))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        SEQ_LENGTHS: torch.tensor([len(f.input_ids) for f in features], dtype=torch.long),
        "example_ids": [f.id for f in features],
    }


def is_packed(batch: Mapping[str, Any], prefix: str = "") -> bool:
    return prefix + SEQ_LENGTHS in batch


def answer_counts(batch: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Answer tokens per sequence [B] (labels other than -100 after the first position), in either layout."""
    labels = batch[prefix + "labels"]
    if not is_packed(batch, prefix):
        return (labels[:, 1:] != IGNORE_INDEX).sum(1)
    lengths = batch[prefix + SEQ_LENGTHS].to(labels.device)
    # Every sequence's first label is -100 (`pack`), so counting whole segments counts the same tokens.
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=labels.device), lengths)
    counts = torch.zeros(len(lengths), dtype=torch.long, device=labels.device)
    return counts.index_add_(0, segment, (labels[0] != IGNORE_INDEX).long())


def forward_scored(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    hidden_layers: Sequence[int] = (),
    vocab_size: int | None = None,
    prefix: str = "",
) -> Scored:
    """Run `model` on `batch[prefix + "input_ids"]` etc. and gather outputs at the answer positions.

    `vocab_size` slices padded output rows off (models often pad the head to a multiple of 64).
    """
    if is_packed(batch, prefix):
        return _forward_packed(model, batch, hidden_layers=hidden_layers, vocab_size=vocab_size,
                               prefix=prefix)
    labels = batch[prefix + "labels"]
    mask_full = labels != -100
    span = int(mask_full.sum(1).max())
    if span == 0:
        raise ValueError("batch has no answer tokens: every label is -100")
    out = model(
        input_ids=batch[prefix + "input_ids"],
        attention_mask=batch[prefix + "attention_mask"],
        position_ids=position_ids_for(batch[prefix + "attention_mask"]),
        logits_to_keep=span + 1,
        output_hidden_states=bool(hidden_layers),
        use_cache=False,
    )
    tail_labels = labels[:, -span:]
    mask = tail_labels != -100
    if int(mask.sum()) != int(mask_full.sum()):
        raise ValueError("answer tokens must be the last tokens of each row (left-padded batches)")
    logits = out.logits[:, -span - 1 : -1][mask]
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    hidden = {layer: out.hidden_states[layer][:, -span - 1 : -1][mask] for layer in hidden_layers}
    return Scored(logits=logits, targets=tail_labels[mask], hidden=hidden, counts=mask.sum(1))


def _forward_packed(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    hidden_layers: Sequence[int],
    vocab_size: int | None,
    prefix: str,
) -> Scored:
    labels = batch[prefix + "labels"]
    if labels.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got labels of shape {tuple(labels.shape)}")
    # Position p predicts token p + 1: keep the positions whose next token is an answer token.
    keep = (labels[0, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError("batch has no answer tokens: every label is -100")
    out = model(
        input_ids=batch[prefix + "input_ids"],
        position_ids=batch[prefix + "position_ids"],
        logits_to_keep=keep,
        output_hidden_states=bool(hidden_layers),
        use_cache=False,
    )
    logits = out.logits[0]
    if logits.shape[0] != keep.numel():
        raise ValueError(f"{type(model).__name__} ignored logits_to_keep as indices: packing needs it")
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    hidden = {layer: out.hidden_states[layer][0, keep] for layer in hidden_layers}
    counts = answer_counts(batch, prefix)
    return Scored(logits=logits, targets=labels[0, keep + 1], hidden=hidden, counts=counts)


@torch.no_grad()
def packing_respected(model: nn.Module, *, atol: float = 1e-3) -> bool:
    """Whether `model` keeps attention within each sequence of a packed row: two short random sequences,
    packed and run one by one, must give the same logits. A model whose masks ignore `position_ids` (an
    attention implementation or family that does not detect packed sequences) would let the second
    sequence attend to the first and fail here, before any training step is spent on it."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator, union-attr]
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(0, vocab, (1, 7), generator=gen).to(device)
        b = torch.randint(0, vocab, (1, 5), generator=gen).to(device)
        packed = torch.cat([a, b], dim=1)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
        joint = model(input_ids=packed, position_ids=positions, use_cache=False).logits.float()
        alone = [model(input_ids=x, use_cache=False).logits.float() for x in (a, b)]
        return bool(torch.allclose(joint, torch.cat(alone, dim=1), atol=atol, rtol=1e-2))
    finally:
        model.train(was_training)
