"""The methods of a study: what teacher signal each needs and how its loss is assembled from `losses`.

A new method is one entry in `METHODS` plus its settings class in `config` and its pure loss in `losses`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from kdlab import losses
from kdlab.scored import Scored, forward_scored


@dataclass
class TeacherBatch:
    """Teacher signals for the answer tokens of one batch, rows aligned with `Scored` rows."""

    topk_indices: torch.Tensor | None = None  # [N, k] (cached)
    topk_logprobs: torch.Tensor | None = None  # [N, k] (cached)
    tail_lse: torch.Tensor | None = None  # [N] fp32 logsumexp of the non-top-k logp / T (cached, at KD1's T)
    logits: torch.Tensor | None = None  # [N, V] (online)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [N, d_t]


@dataclass
class LossInputs:
    model: nn.Module
    batch: Mapping[str, torch.Tensor]
    forward_student: Callable[[], Scored]  # the student on the gold batch; run only if a loss reads it
    teacher: TeacherBatch | None
    num_tokens: torch.Tensor | float  # answer tokens in the global batch (transfer rows included)
    num_gold_tokens: torch.Tensor | float  # answer tokens of the gold rows (not transfer) in the global batch
    num_teacher_tokens: torch.Tensor | float  # KD2: tokens of the teacher answers in the global batch
    params: Mapping[str, Any]
    layer_pairs: list[tuple[int, int]]
    projections: nn.ModuleList | None
    vocab_size: int

    @cached_property
    def student(self) -> Scored:
        return self.forward_student()


LossFn = Callable[[LossInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _task_ce(x: LossInputs) -> torch.Tensor:
    """CE against the gold answers; transfer-set rows (targets are the teacher's answers) are left out."""
    s = x.student
    rows = x.batch.get("gold_rows")
    logits, targets = s.logits, s.targets
    if rows is not None and not bool(rows.all()):
        keep = rows.to(s.counts.device).repeat_interleave(s.counts)
        logits, targets = logits[keep], targets[keep]
    # A global batch drawn from the transfer set alone has no gold token: its task loss is 0, not 0/0.
    n = x.num_gold_tokens
    n = n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)
    return losses.cross_entropy_tokens(logits, targets, num_tokens=n)


def sft_loss(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = _task_ce(x)
    return ce, {"ce": ce}


def kd1_loss(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1-λ)·CE(gold) + λ·T²·D(teacher_T ‖ student_T) over the answer tokens.

    Cached teachers are compared over the top-k tokens plus one exact tail bucket; a run using fewer
    than the cached k folds the dropped entries into the tail (`losses.topk_head`).
    """
    ce = _task_ce(x)
    lam = float(x.params["lam"])
    if lam == 0.0:
        return ce, {"ce": ce}
    t = x.teacher
    assert t is not None
    temperature = float(x.params["temperature"])
    common = dict(
        temperature=temperature,
        divergence=x.params["divergence"],
        beta=float(x.params.get("jsd_beta", 0.5)),
        num_tokens=x.num_tokens,
    )
    if t.logits is not None:
        kd = losses.kd_divergence_full(x.student.logits, t.logits, **common)
    else:
        if t.topk_indices is None or t.topk_logprobs is None or t.tail_lse is None:
            raise ValueError("kd1 with a cached teacher needs its top-k indices, log-probs and tail_lse")
        k = int(x.params["top_k"])
        idx, lp, tail = losses.topk_head(
            t.topk_indices, t.topk_logprobs, t.tail_lse, k=k, temperature=temperature
        )
        kd = losses.kd_divergence_topk(x.student.logits, idx, lp, tail_lse=tail, **common)
    return losses.mix(ce, kd, lam), {"ce": ce, "kd": kd}


def kd2_loss(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1-λ)·CE(gold) + λ·CE(teacher's answer), prompt masked; λ=1 is Kim & Rush sequence-level KD."""
    lam = float(x.params["lam"])
    if lam == 0.0:
        ce = _task_ce(x)
        return ce, {"ce": ce}
    on_teacher = forward_scored(x.model, x.batch, vocab_size=x.vocab_size, prefix="kd2_")
    kd = losses.cross_entropy_tokens(on_teacher.logits, on_teacher.targets, num_tokens=x.num_teacher_tokens)
    if lam == 1.0:
        return kd, {"kd": kd}  # the gold sequences are never run: one forward pass per step, like SFT
    ce = _task_ce(x)
    return losses.mix(ce, kd, lam), {"ce": ce, "kd": kd}


def kd3_loss(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(gold) + λ·mean_l D(P_l·h_student[m(l)], h_teacher[l]) over the answer positions.

    D is the MSE of layer-normed states (or 1 - cosine), so the term is of order 1 per token whatever the
    teacher's hidden-state scale, and λ weighs it against the task CE directly.
    """
    ce = _task_ce(x)
    lam = float(x.params["lam"])
    if lam == 0.0:
        return ce, {"ce": ce}
    t = x.teacher
    assert t is not None
    feat = losses.feature_loss(
        [x.student.hidden[s] for s, _ in x.layer_pairs],
        [t.hidden[tl] for _, tl in x.layer_pairs],
        x.projections,
        kind=x.params.get("loss", "mse"),
        num_tokens=x.num_tokens,
    )
    return losses.add_weighted(ce, feat, lam), {"ce": ce, "kd": feat}


@dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    needs_topk: bool = False  # KD1: teacher log-probs at the answer tokens
    needs_answers: bool = False  # KD2: teacher-generated answers
    needs_hidden: bool = False  # KD3: teacher hidden states at mapped layers


METHODS: dict[str, Method] = {
    "sft": Method("sft", sft_loss),
    "kd1": Method("kd1", kd1_loss, needs_topk=True),
    "kd2": Method("kd2", kd2_loss, needs_answers=True),
    "kd3": Method("kd3", kd3_loss, needs_hidden=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]
