"""KD1, logit KD: (1-λ)·CE(gold) + λ·T²·D(teacher_T ‖ student_T) over the answer tokens.

A teacher with another tokenizer is compared over the aligned answer tokens by ULD or the hybrid
(`cross_tokenizer`, kdlab.cross_tokenizer). A cached teacher is compared over its top-k tokens plus one exact
tail bucket (the cache stores the tail's
log-sum-exp at every temperature of the grid); a run using fewer than the cached k folds the dropped entries
into the tail (`losses.topk_head`). A live teacher gives its full distribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from kdlab import losses
from kdlab.config import as_list
from kdlab.methods.base import Label, LossInputs, LossParts, Method, MixedSettings, Signals, register, task_ce

SKEW_ALPHA = 0.1  # DistiLLM's default skew


class DivergenceSettings(MixedSettings):
    """The grid of a logit divergence between teacher and student at temperature T (kd1, gkd)."""

    labels: ClassVar[dict[str, Label]] = {
        **MixedSettings.labels,
        "temperature": Label(run_id="T", text="T", latex="$T$", in_tables=True),
        "divergence": Label(run_id="", text="", latex="", in_tables=True),
    }

    temperature: list[float] = Field(
        default_factory=lambda: [2.0],
        min_length=1,
        description="softmax temperature T of teacher and student; every divergence is multiplied by T^2. "
        "The cache stores an exact top-k tail for each temperature listed",
    )
    divergence: list[Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]] = Field(
        default_factory=lambda: ["forward_kl"],
        description="forward_kl KL(teacher||student), reverse_kl KL(student||teacher), jsd (generalized, "
        "weighted by jsd_beta), skew_kl KL(teacher||a*teacher+(1-a)*student) and skew_reverse_kl "
        "KL(student||a*student+(1-a)*teacher) with a = skew_alpha (DistiLLM), or tvd (total variation)",
    )
    jsd_beta: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="jsd: the teacher's weight in the mixture m = beta*teacher + (1-beta)*student, as in "
        "TRL's GKD (0.5: the standard JSD)",
    )
    # Left out of a run's params (and so of its hash) unless set, so runs made before it existed keep theirs.
    skew_alpha: float | None = Field(
        None,
        ge=0,
        lt=1,
        exclude_if=lambda v: v is None,
        description=f"skew_kl / skew_reverse_kl: the weight of the distribution the KL is taken from in the "
        f"mixture, as in DistiLLM (default {SKEW_ALPHA}; 0 is plain KL)",
    )

    _divergence_lists = field_validator("temperature", "divergence", mode="before")(as_list)

    @field_validator("temperature")
    @classmethod
    def _t_pos(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("temperature must be > 0")
        return v


def teacher_divergence(x: LossInputs, student_logits: Any, teacher: Any, num_tokens: Any) -> Any:
    """The run's divergence (its params) between `teacher` (a `TeacherBatch`) and the student's logits; a
    teacher with its own tokenizer is compared as `cross_tokenizer` says (`TeacherBatch.divergence`)."""
    alpha = x.params.get("skew_alpha")
    return teacher.divergence(
        student_logits,
        temperature=float(x.params["temperature"]),
        divergence=x.params["divergence"],
        beta=float(x.params.get("jsd_beta", 0.5)),
        alpha=SKEW_ALPHA if alpha is None else float(alpha),
        top_k=int(x.params["top_k"]) if "top_k" in x.params else None,
        num_tokens=num_tokens,
        cross_tokenizer=x.params.get("cross_tokenizer", "auto"),
    )


class KD1Settings(DivergenceSettings):
    labels: ClassVar[dict[str, Label]] = {
        **DivergenceSettings.labels,
        "top_k": Label(run_id="k"),
    }

    top_k: list[int] = Field(
        default_factory=lambda: [32],
        min_length=1,
        description="teacher log-probs per token (the cache keeps the largest; smaller k read its head)",
    )

    # Left out of a run's params (and so of its hash) when "auto", so runs made before it existed keep theirs.
    cross_tokenizer: Literal["auto", "uld", "hybrid"] = Field(
        "auto",
        exclude_if=lambda v: v == "auto",
        description="a student whose tokenizer differs from the teacher's: uld (sorted probability vectors, "
        "Boizard et al.), hybrid (the run's divergence on the vocabulary both share, chain-rule merges of "
        "teacher pieces, ULD on the rest; see kdlab.cross_tokenizer) or auto (hybrid across tokenizers, "
        "plain KD with one tokenizer). uld with one tokenizer compares the sorted vectors row by row",
    )

    _lists = field_validator("top_k", mode="before")(as_list)

    @field_validator("top_k")
    @classmethod
    def _k_pos(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("top_k must be > 0")
        return v


@register
class KD1(Method):
    name = "kd1"
    settings = KD1Settings
    across_tokenizers = True
    color = "#2166ac"
    kd_term = "T²-scaled divergence, nats"

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(top_k=int(params["top_k"]), temperature=float(params["temperature"]))

    def loss(self, x: LossInputs) -> LossParts:
        ce = task_ce(x)
        lam = float(x.params["lam"])
        if lam == 0.0:
            return ce, {"ce": ce}
        assert x.teacher is not None
        kd = teacher_divergence(x, x.student.logits, x.teacher, x.num_tokens)
        return losses.mix(ce, kd, lam), {"ce": ce, "kd": kd}
