"""KD3, feature KD: CE(gold) + λ·mean over layer pairs of D(P·h_student, h_teacher) at the answer tokens.

D is the MSE of layer-normed states (or 1 - cosine), so the term is of order 1 per token whatever the
teacher's hidden-state scale, and λ weighs it against the task CE directly. P are learned projections
(identity-initialised when the widths match). A teacher with its own tokenizer: both sides' states averaged
over each aligned chunk first (`pooled_by_chunk`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from kdlab import cross_tokenizer, losses
from kdlab.methods.base import Label, LossInputs, LossParts, Method, MixedSettings, Signals, register, task_ce


class KD3Settings(MixedSettings):
    labels: ClassVar[dict[str, Label]] = {**MixedSettings.labels, "layer_map": Label(run_id="map")}

    # One map, or a list of maps as a grid axis: "auto", "derived", "uniform", "last", or explicit
    # [[student, teacher], ...] pairs of hidden-state indices.
    layer_map: list[Literal["auto", "derived", "uniform", "last"] | list[tuple[int, int]]] = Field(
        default_factory=lambda: ["auto"],
        min_length=1,
        description="'derived': each block of a derived student paired with the teacher block it was copied "
        "from; 'uniform': evenly spaced pairs (students unrelated to the teacher); 'auto' (default): derived "
        "for derived students, else uniform; 'last': the last blocks only; or explicit [[student, teacher]] "
        "hidden-state indices",
    )
    loss: Literal["mse", "cosine"] = Field(
        "mse",
        description="the feature loss compares layer-normed hidden states (mse; cosine: 1 - cosine "
        "similarity), averaged over layer pairs, so it is of order 1 per token and lambda weighs it against "
        "the task CE",
    )

    @field_validator("layer_map", mode="before")
    @classmethod
    def _one_or_many_maps(cls, v: Any) -> Any:
        # A bare name, or one explicit list of pairs, is a single map; anything else is a list of maps.
        if isinstance(v, str):
            return [v]
        if (
            isinstance(v, list)
            and v
            and all(
                isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in v
            )
        ):
            return [v]
        return v


def pooled_by_chunk(
    student: list[torch.Tensor], teacher: list[torch.Tensor], alignment: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's states averaged over each aligned chunk on both sides, then read back at every student
    answer row (its chunk's averages): rows [N_s, d] on both sides, as `losses.feature_loss` takes them."""
    device = student[0].device
    s_chunk = alignment["xt_student_chunk"].to(device)
    t_chunk = alignment["xt_teacher_chunk"].to(device)
    chunks = int(alignment["xt_pair_student"].numel())
    pool = cross_tokenizer.pool_by_chunk
    return ([pool(h, s_chunk, chunks)[s_chunk] for h in student],
            [pool(h.to(device), t_chunk, chunks)[s_chunk] for h in teacher])


@register
class KD3(Method):
    name = "kd3"
    settings = KD3Settings
    across_tokenizers = True  # hidden states pooled over the aligned chunks
    color = "#1b7837"
    kd_term = "feature distance"

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(layer_map=params["layer_map"])

    def loss(self, x: LossInputs) -> LossParts:
        ce = task_ce(x)
        lam = float(x.params["lam"])
        if lam == 0.0:
            return ce, {"ce": ce}
        t = x.teacher
        assert t is not None
        student = [x.student.hidden[s] for s, _ in x.layer_pairs]
        teacher = [t.hidden[tl] for _, tl in x.layer_pairs]
        if t.alignment is not None:  # a teacher with its own tokenizer: states pooled over aligned chunks
            student, teacher = pooled_by_chunk(student, teacher, t.alignment)
        feat = losses.feature_loss(
            student,
            teacher,
            x.projections,
            kind=x.params.get("loss", "mse"),
            num_tokens=x.num_tokens,
        )
        return losses.add_weighted(ce, feat, lam), {"ce": ce, "kd": feat}
