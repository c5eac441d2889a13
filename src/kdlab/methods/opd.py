"""On-policy distillation with a sampled-token reverse-KL reward (MiniLLM, Gu et al. 2024; the on-policy
distillation recipes of Qwen3 and of Thinking Machines' Tinker cookbook):
(1-λ)·CE(gold) + λ·PG, where the student samples an answer to every training prompt inside the step and
each sampled token x_t gets the reward r_t = log p_teacher(x_t) − log q_student(x_t) (both at T = 1). PG is
REINFORCE on the student's log-probs of its own tokens with the return A_t = Σ_{s≥t} γ^{s−t} r_s held
constant: its gradient is that of the reverse KL(q ‖ p) on the student's own distribution (γ = 0: each
token's own reward, as Tinker; γ = 1: the sum over the rest of the answer, as MiniLLM's long-term term).
The logged `kd` is the sampled-token estimate of the reverse KL, Σ −r_t / tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import Field, field_validator

from kdlab import losses
from kdlab.config import as_list
from kdlab.methods.base import (
    POLICY,
    Label,
    LossInputs,
    LossParts,
    Method,
    Rollout,
    SamplingSettings,
    Signals,
    in_unit_interval,
    register,
    task_ce,
)


class OPDSettings(SamplingSettings):
    labels: ClassVar[dict[str, Label]] = {
        **SamplingSettings.labels,
        "discount": Label(run_id="g", text="γ", latex=r"$\gamma$", in_tables=True),
    }

    discount: list[float] = Field(
        default_factory=lambda: [0.0],
        min_length=1,
        description="γ in [0, 1]: 0 rewards each token alone, 1 with the sum over the rest of the answer",
    )

    _discount_list = field_validator("discount", mode="before")(as_list)

    @field_validator("discount")
    @classmethod
    def _discount_range(cls, v: list[float]) -> list[float]:
        return in_unit_interval(v, "discount")


@register
class OPD(Method):
    name = "opd"
    settings = OPDSettings
    # Across tokenizers the student's samples are retokenised for the teacher; each aligned chunk's text is
    # scored by the teacher at the chunk's last student token (`TeacherBatch.token_logprobs`).
    across_tokenizers = True
    color = "#c51b7d"
    kd_term = "reverse KL on the student's samples (sampled-token estimate), nats"

    def signals(self, params: Mapping[str, Any]) -> Signals:
        return Signals(live=True)

    def rollout(self, params: Mapping[str, Any]) -> Rollout | None:
        return SamplingSettings.rollout_of(params, 1.0)

    def loss(self, x: LossInputs) -> LossParts:
        lam = float(x.params["lam"])
        if lam == 0.0 or not x.has_samples:
            ce = task_ce(x)
            if not x.has_samples and lam == 1.0:
                ce = ce * 0.0  # every sample came out empty: nothing to learn from this step
            return ce, {"ce": ce}
        on = x.forward_student(POLICY)
        teacher = x.forward_teacher(POLICY)
        assert teacher is not None
        log_q = losses.token_logprobs(on.logits, on.targets)
        reward = (teacher.token_logprobs(on.targets) - log_q).detach()
        returns = losses.discounted_returns(reward, on.counts, float(x.params["discount"]))
        pg = losses.policy_gradient(log_q, returns, num_tokens=x.num_policy_tokens)
        reverse_kl = -reward.sum() / x.num_policy_tokens
        if lam == 1.0:
            return pg, {"kd": reverse_kl}
        ce = task_ce(x)
        return losses.mix(ce, pg, lam), {"ce": ce, "kd": reverse_kl}
