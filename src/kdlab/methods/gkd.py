"""GKD, generalized knowledge distillation (Agarwal et al., ICLR 2024; TRL's `GKDTrainer`):
(1-λ)·CE(gold) + λ·T²·D(teacher_T ‖ student_T) over the answer tokens of the step's training answers.

With probability `student_fraction` (TRL's λ_on) a step's answers are the student's own samples, drawn
with its current weights inside the step (`Method.rollout`); the other steps use the gold answers, or the
teacher's answers with `seq_kd: true`. The teacher scores whatever answers the step trains on, so it runs
live whatever `cache.mode` says. With `student_fraction: 0` and no `seq_kd` this is online `kd1`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from kdlab import losses
from kdlab.config import as_list
from kdlab.methods.base import (
    POLICY,
    TEACHER_ANSWER,
    Label,
    LossInputs,
    LossParts,
    Method,
    MethodSettings,
    Rollout,
    SamplingSettings,
    Signals,
    in_unit_interval,
    register,
    task_ce,
)
from kdlab.methods.kd1 import DivergenceSettings, teacher_divergence


class GKDSettings(DivergenceSettings, SamplingSettings):
    labels: ClassVar[dict[str, Label]] = {
        **DivergenceSettings.labels,
        "student_fraction": Label(run_id="on", text="λ_on", latex=r"$\lambda_{\mathrm{on}}$", in_tables=True),
    }

    temperature: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="softmax temperature T of teacher and student in the divergence (times T^2)",
    )
    divergence: list[Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]] = Field(
        default_factory=lambda: ["reverse_kl"],
        description="as kd1's; reverse_kl on the student's own samples is on-policy distillation proper",
    )
    student_fraction: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="share of training steps whose answers the student samples itself (TRL's lmbda); the "
        "others train on the gold answers (or the teacher's, with seq_kd)",
    )
    seq_kd: bool = Field(False, description="off-policy steps train on the teacher's greedy answers")

    _fraction_list = field_validator("student_fraction", mode="before")(as_list)

    @field_validator("student_fraction")
    @classmethod
    def _fraction_range(cls, v: list[float]) -> list[float]:
        return in_unit_interval(v, "student_fraction")


@register
class GKD(Method):
    name = "gkd"
    settings = GKDSettings
    color = "#762a83"
    kd_term = "T²-scaled divergence on the step's answers (the student's own when on-policy), nats"
    # Across tokenizers the student's samples are retokenised for the teacher and compared like kd1's
    # (`training.KDTrainer._retokenised`, `TeacherBatch.divergence`).
    across_tokenizers = True

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(answers=bool(params.get("seq_kd")), live=True)

    def across_tokenizers_refused(self, settings: MethodSettings) -> str | None:
        if getattr(settings, "seq_kd", False):
            return "seq_kd: the teacher's answers are not scored in the teacher's own tokens yet"
        return None

    def rollout(self, params: Mapping[str, Any]) -> Rollout | None:
        return SamplingSettings.rollout_of(params, float(params["student_fraction"]))

    def loss(self, x: LossInputs) -> LossParts:
        lam = float(x.params["lam"])
        if lam == 0.0:
            ce = task_ce(x)
            return ce, {"ce": ce}
        if x.on_policy and not x.has_samples:
            # Every sample of the step came out empty: nothing to distil on, and gold answers are not the
            # student's (a step that is on-policy never trains the KD term on them).
            kd = x.student.logits.sum() * 0.0
        elif x.on_policy:
            on = x.forward_student(POLICY)
            kd = teacher_divergence(x, on.logits, x.forward_teacher(POLICY), x.num_policy_tokens)
        elif x.params.get("seq_kd"):
            on = x.forward_student(TEACHER_ANSWER)
            kd = teacher_divergence(x, on.logits, x.forward_teacher(TEACHER_ANSWER), x.num_teacher_tokens)
        else:  # the gold sequences: online kd1
            kd = teacher_divergence(x, x.student.logits, x.teacher, x.num_tokens)
        if lam == 1.0 and (x.on_policy or x.params.get("seq_kd")):
            return kd, {"kd": kd}  # the gold sequences are never run
        ce = task_ce(x)
        return losses.mix(ce, kd, lam), {"ce": ce, "kd": kd}
