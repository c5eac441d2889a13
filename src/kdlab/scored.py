"""One forward pass that returns the model's outputs only at the positions that predict answer tokens.

Batches are left-padded (`training.TrainCollator` collates them with `padding_side="left"`), so every row's
answer tokens sit at the end and a single `logits_to_keep` slice covers them: the vocabulary projection runs
on a few positions instead of the whole prompt. The student, the live teacher and the teacher-cache builder
all gather their outputs here, so row *i* of every signal refers to the same token of the same example
(row-major over the batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Scored:
    logits: torch.Tensor  # [N, V]: N answer tokens of the batch, row-major
    targets: torch.Tensor  # [N]
    hidden: dict[int, torch.Tensor]  # hidden_states index -> [N, d]
    counts: torch.Tensor  # [B]: answer tokens per row (to split N back into examples)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (needed by absolute-position models; harmless for RoPE)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
