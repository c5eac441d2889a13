"""KD2, sequence-level KD: (1-λ)·CE(gold) + λ·CE(teacher's greedy answer), prompt masked; λ = 1 is Kim &
Rush's sequence-level KD and runs only the teacher-answer sequences (one forward pass per step, like SFT)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdlab import losses
from kdlab.methods.base import (
    TEACHER_ANSWER,
    LossInputs,
    LossParts,
    Method,
    MixedSettings,
    Signals,
    register,
    task_ce,
)


class KD2Settings(MixedSettings):
    pass


@register
class KD2(Method):
    name = "kd2"
    across_tokenizers = True  # the teacher's answers are text, encoded with the student's tokenizer
    settings = KD2Settings
    color = "#e08214"
    kd_term = "cross-entropy on the teacher's answers, nats"

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(answers=True)

    def loss(self, x: LossInputs) -> LossParts:
        lam = float(x.params["lam"])
        if lam == 0.0:
            ce = task_ce(x)
            return ce, {"ce": ce}
        on_teacher = x.forward_student(TEACHER_ANSWER)
        kd = losses.cross_entropy_tokens(
            on_teacher.logits, on_teacher.targets, num_tokens=x.num_teacher_tokens
        )
        if lam == 1.0:
            return kd, {"kd": kd}  # the gold sequences are never run
        ce = task_ce(x)
        return losses.mix(ce, kd, lam), {"ce": ce, "kd": kd}
