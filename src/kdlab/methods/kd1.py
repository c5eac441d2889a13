"""KD1, logit KD: (1-λ)·CE(gold) + λ·T²·D(teacher_T ‖ student_T) over the answer tokens.

A cached teacher is compared over its top-k tokens plus one exact tail bucket (the cache stores the tail's
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


class KD1Settings(MixedSettings):
    labels: ClassVar[dict[str, Label]] = {
        **MixedSettings.labels,
        "temperature": Label(run_id="T", text="T", latex="$T$", in_tables=True),
        "divergence": Label(run_id="", text="", latex="", in_tables=True),
        "top_k": Label(run_id="k"),
    }

    temperature: list[float] = Field(
        default_factory=lambda: [2.0],
        min_length=1,
        description="softmax temperature T of teacher and student; every divergence is multiplied by T^2. "
        "The cache stores an exact top-k tail for each temperature listed",
    )
    divergence: list[Literal["forward_kl", "reverse_kl", "jsd"]] = Field(
        default_factory=lambda: ["forward_kl"],
        description="forward_kl KL(teacher||student), reverse_kl KL(student||teacher), or jsd (generalized, "
        "weighted by jsd_beta)",
    )
    jsd_beta: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="jsd: the teacher's weight in the mixture m = beta*teacher + (1-beta)*student, as in "
        "TRL's GKD (0.5: the standard JSD)",
    )
    top_k: list[int] = Field(
        default_factory=lambda: [32],
        min_length=1,
        description="teacher log-probs per token (the cache keeps the largest; smaller k read its head)",
    )

    _lists = field_validator("temperature", "divergence", "top_k", mode="before")(as_list)

    @field_validator("top_k")
    @classmethod
    def _k_pos(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("top_k must be > 0")
        return v

    @field_validator("temperature")
    @classmethod
    def _t_pos(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("temperature must be > 0")
        return v


@register
class KD1(Method):
    name = "kd1"
    settings = KD1Settings
    color = "#2166ac"
    kd_term = "T²-scaled divergence, nats"

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(top_k=int(params["top_k"]), temperature=float(params["temperature"]))

    def loss(self, x: LossInputs) -> LossParts:
        ce = task_ce(x)
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
