"""What every method shares: its settings (the grid axes), the teacher signals a run reads, and the inputs
its loss gets.

A method is a subclass of `Method` in one module: `name`, a `settings` model, `signals(params)` (what one run
with these params reads from the teacher) and `loss(inputs)`. The study, the cache, the trainer, the report
and the figures ask the method these questions and never name it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from kdlab import cross_tokenizer, losses
from kdlab.alignment import VocabularyMap
from kdlab.config import Strict, as_list
from kdlab.scored import Scored

# ---------------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Label:
    """How one setting appears in run ids, result tables and figures."""

    run_id: str | None = None  # prefix of the value in run ids (None: the name; "": the value alone)
    text: str | None = None  # in tables and figure legends (None: the name; "": the value alone)
    latex: str | None = None  # in LaTeX tables (None: the escaped text)
    in_run_id: bool = False  # in run ids even when the grid has one value
    in_tables: bool = False  # beside the chosen setting even when the grid has one value


class MethodSettings(Strict):
    """A method's hyper-parameters: list-valued fields are grid axes, the others fixed settings."""

    labels: ClassVar[dict[str, Label]] = {}

    # Not a grid axis; left out of a run's params (and so of its hash) unless set.
    tasks: list[str] | None = Field(
        None,
        min_length=1,
        exclude_if=lambda v: v is None,
        description="the study's tasks this method runs on (default: every task)",
    )

    def grid_axes(self) -> dict[str, list[Any]]:
        return {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name != "tasks" and isinstance(getattr(self, name), list)
        }

    def runs_on(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks

    @classmethod
    def label(cls, name: str) -> Label:
        return cls.labels.get(name, Label())


class MixedSettings(MethodSettings):
    """Settings of a method whose teacher term is mixed with the task loss by λ."""

    labels: ClassVar[dict[str, Label]] = {
        "lam": Label(run_id="lam", text="λ", latex=r"$\lambda$", in_run_id=True, in_tables=True)
    }

    lam: list[float] = Field(default_factory=lambda: [0.5], alias="lambda", min_length=1)

    _as_list_lam = field_validator("lam", mode="before")(as_list)

    @field_validator("lam")
    @classmethod
    def _lam_range(cls, v: list[float]) -> list[float]:
        return in_unit_interval(v, "lambda")


def in_unit_interval(values: list[float], name: str) -> list[float]:
    """A grid axis whose every value must lie in [0, 1] (a validator body: ValueError names the setting)."""
    for x in values:
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"each {name} must be in [0, 1], got {x}")
    return values


class SamplingSettings(MixedSettings):
    """Settings of a method whose student samples its own training answers (see `Rollout`)."""

    sample_temperature: float = Field(
        1.0, gt=0, description="temperature the student samples at (1: exactly its own distribution)"
    )
    max_new_tokens: int = Field(32, gt=0, description="longest sampled answer, in tokens (EOS ends it)")

    @staticmethod
    def rollout_of(params: Mapping[str, Any], student_fraction: float) -> Rollout:
        """The `Rollout` of a run with these params."""
        return Rollout(student_fraction=student_fraction, temperature=float(params["sample_temperature"]),
                       max_new_tokens=int(params["max_new_tokens"]))


# ---------------------------------------------------------------------------------------------------------
# teacher signals


@dataclass(frozen=True)
class Signals:
    """What one run reads from the teacher at the answer tokens (from the cache, or a live teacher)."""

    answers: bool = False  # the teacher's greedy answers, as training targets
    top_k: int | None = None  # top-k log-probs (a live teacher gives full logits)...
    temperature: float | None = None  # ...and the exact tail of the rest at this temperature (cached)
    layer_map: Any = None  # hidden states at the teacher layers this layer map pairs with the student's
    # The teacher must run live whatever `cache.mode` says: what it scores (the student's own samples) is
    # only known during training, so nothing of it can be cached.
    live: bool = False

    @property
    def from_teacher(self) -> bool:
        return self.answers or self.top_k is not None or self.layer_map is not None or self.live


# Batch keys of the sequences whose targets are the teacher's answers (prompt + answer, prompt masked).
TEACHER_ANSWER = "teacher_answer_"
# Batch keys of the sequences whose answers the student sampled itself in this training step (`Rollout`).
POLICY = "policy_"
# Set in a batch whose step is on-policy, even when every sample came out empty.
ROLLOUT_STEP = "rollout_step"


@dataclass(frozen=True)
class Rollout:
    """How a method that makes its own training answers samples them: with probability `student_fraction`
    an optimizer step's answers are sampled from the student's current weights (no grad, dropout off), the
    others keep the batch's answers. An answer ends at EOS or after `max_new_tokens`."""

    student_fraction: float
    temperature: float
    max_new_tokens: int


@dataclass
class TeacherBatch:
    """The teacher at the answer tokens of one set of sequences, rows aligned with `Scored` rows: from the
    cache (top-k log-probs + the exact tail at the run's temperature) or a live teacher (full logits).
    Methods ask it for a divergence and never look at where it came from."""

    topk_indices: torch.Tensor | None = None  # [N, k] (cached)
    topk_logprobs: torch.Tensor | None = None  # [N, k] (cached)
    tail_lse: torch.Tensor | None = None  # [N] fp32 logsumexp of the non-top-k logp / T (cached, run's T)
    logits: torch.Tensor | None = None  # [N, V] (online)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [N, d_t]
    # A teacher with its own tokenizer: its rows are its own answer tokens, matched to the student's by
    # `alignment.batch_alignment` (the batch's `xt_*` tensors) and the matched vocabulary.
    alignment: Mapping[str, torch.Tensor] | None = None
    vocabulary: VocabularyMap | None = None
    targets: torch.Tensor | None = None  # [N] the teacher's own answer tokens (a live teacher's)

    @property
    def cross_tokenizer(self) -> bool:
        return self.alignment is not None

    def divergence(
        self,
        student_logits: torch.Tensor,
        *,
        temperature: float,
        divergence: str,
        num_tokens: torch.Tensor | float,
        top_k: int | None = None,
        beta: float = 0.5,
        alpha: float = 0.1,
        cross_tokenizer: str = "auto",
    ) -> torch.Tensor:
        """T²·Σ D(teacher_T, student_T) / num_tokens (`losses`): over the full vocabulary for a live
        teacher, over the cached top-k (the first `top_k` of them) + the exact tail bucket otherwise.

        `cross_tokenizer` ("uld", "hybrid", "auto": hybrid): how a teacher with its own tokenizer is compared
        (`kdlab.cross_tokenizer`, over the aligned pairs); with one tokenizer, "uld" compares row by row and
        the others are the plain divergence."""
        common = dict(temperature=temperature, divergence=divergence, beta=beta, alpha=alpha,
                      num_tokens=num_tokens)
        if self.cross_tokenizer or cross_tokenizer == "uld":
            return self._cross_divergence(student_logits, cross_tokenizer, top_k, **common)
        if self.logits is not None:
            return losses.kd_divergence_full(student_logits, self.logits, **common)
        if self.topk_indices is None or self.topk_logprobs is None or self.tail_lse is None:
            raise ValueError("the teacher gives neither logits nor its cached top-k with the tail")
        k = self.topk_indices.shape[-1] if top_k is None else top_k
        idx, lp, tail = losses.topk_head(
            self.topk_indices, self.topk_logprobs, self.tail_lse, k=k, temperature=temperature
        )
        return losses.kd_divergence_topk(student_logits, idx, lp, tail_lse=tail, **common)

    def head(
        self, temperature: float, top_k: int | None = None, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The teacher's rows (all, or `rows`) as a `cross_tokenizer` head at `temperature`: every token of
        a live teacher, the cached top-k (its first `top_k`) with the tail otherwise."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows.to(t.device)]

        if self.logits is not None:
            return cross_tokenizer.full_head(pick(self.logits), temperature)
        if self.topk_indices is None or self.topk_logprobs is None or self.tail_lse is None:
            raise ValueError("the teacher gives neither logits nor its cached top-k with the tail")
        k = self.topk_indices.shape[-1] if top_k is None else top_k
        idx, lp, tail = losses.topk_head(pick(self.topk_indices), pick(self.topk_logprobs),
                                         pick(self.tail_lse), k=k, temperature=temperature)
        return cross_tokenizer.cached_head(idx, lp, tail, temperature)

    def _cross_divergence(
        self, student_logits: torch.Tensor, mode: str, top_k: int | None, *, temperature: float,
        divergence: str, beta: float, alpha: float, num_tokens: torch.Tensor | float,
    ) -> torch.Tensor:
        """ULD or hybrid over the aligned (student row, teacher row) pairs (every row with one tokenizer)."""
        if self.alignment is None:  # one tokenizer: ULD row by row
            return cross_tokenizer.uld_loss(student_logits, *self.head(temperature, top_k),
                                            temperature=temperature, num_tokens=num_tokens)
        a = {k: v.to(student_logits.device) for k, v in self.alignment.items()}
        rows_s = a["xt_pair_student"]
        # Only the paired rows are read (a live head stays one broadcast row of token ids, not [N, V]).
        student, (idx, lp, tail) = student_logits[rows_s], self.head(temperature, top_k, a["xt_pair_teacher"])
        if mode == "uld":
            return cross_tokenizer.uld_loss(student, idx, lp, tail, temperature=temperature,
                                            num_tokens=num_tokens)
        if self.vocabulary is None:
            raise ValueError("hybrid cross-tokenizer KD needs the matched vocabulary")
        # The chain rule: each later piece's own tempered log-prob (at its own teacher row), summed per pair.
        m_idx, m_lp, _ = self.head(temperature, top_k, a["xt_merge_rows"])
        piece = cross_tokenizer.head_token_logprob(m_idx, m_lp, a["xt_merge_tokens"])
        rest = torch.zeros(len(rows_s), device=student.device).index_add(0, a["xt_merge_owner"], piece)
        return cross_tokenizer.hybrid_loss(
            student, idx, lp, tail,
            teacher_to_student=self.vocabulary.teacher_to_student().to(student.device),
            student_matched=self.vocabulary.student_matched().to(student.device),
            merged_student_token=a["xt_merged_student"], merged_first_piece=a["xt_merged_first"],
            merged_rest_logprob=rest, temperature=temperature, divergence=divergence, beta=beta,
            alpha=alpha, num_tokens=num_tokens,
        )

    def top_tokens(self, k: int = 1) -> torch.Tensor:
        """The teacher's `k` most likely tokens per row [N, k], most likely first (cache or live alike)."""
        if self.logits is not None:
            return self.logits.topk(k, dim=-1).indices
        if self.topk_indices is None or self.topk_indices.shape[-1] < k:
            raise ValueError(f"the teacher gives no top-{k} tokens (cache a top_k of at least {k})")
        return self.topk_indices[:, :k].long()

    def token_logprobs(self, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """log p_T of each row's target token [N] (a live teacher's, which on-policy methods need).

        A teacher with its own tokenizer: the log-prob of each aligned chunk's text (the sum over its own
        tokens of the chunk), at the chunk's last student row, 0 at its other rows; summed over an answer it
        is the teacher's log-prob of the answer's text, as the student tokens' sum is the student's."""
        if self.logits is None:
            raise ValueError("the teacher's log-prob of a sampled token needs a live teacher")
        if self.alignment is None:
            return losses.token_logprobs(self.logits, targets, temperature=temperature)
        if self.targets is None:
            raise ValueError("a teacher with its own tokenizer scores its own tokens: give its targets")
        own = losses.token_logprobs(self.logits, self.targets, temperature=temperature)
        return cross_tokenizer.chunk_logprobs_at_last_rows(
            own, self.alignment["xt_teacher_chunk"].to(own.device),
            self.alignment["xt_student_chunk"].to(own.device))


# ---------------------------------------------------------------------------------------------------------
# losses


@dataclass
class LossInputs:
    """What a method's loss gets for one micro-batch. The student and the teacher are run lazily, on the
    sequences a loss asks for: the gold batch (`student`, `teacher`), the teacher's answers
    (`TEACHER_ANSWER`) or the student's own samples (`POLICY`)."""

    model: nn.Module
    batch: Mapping[str, torch.Tensor]
    forward_student: Callable[[str], Scored]  # the student on the sequences under a batch-key prefix
    forward_teacher: Callable[[str], TeacherBatch | None]  # the teacher there (None: the run reads none)
    num_tokens: torch.Tensor | float  # answer tokens in the global batch (transfer rows included)
    num_gold_tokens: torch.Tensor | float  # answer tokens of the gold rows (not transfer) in the global batch
    num_teacher_tokens: torch.Tensor | float  # tokens of the teacher-answer sequences in the global batch
    params: Mapping[str, Any]
    layer_pairs: list[tuple[int, int]]
    projections: nn.ModuleList | None
    vocab_size: int
    num_policy_tokens: torch.Tensor | float = 1  # tokens of the student's sampled answers in the global batch

    @cached_property
    def student(self) -> Scored:
        return self.forward_student("")

    @cached_property
    def teacher(self) -> TeacherBatch | None:
        return self.forward_teacher("")

    @property
    def on_policy(self) -> bool:
        """Whether this micro-batch's step is on-policy (`Rollout`): its `POLICY` sequences hold the student's
        own samples, unless every sample came out empty (then there are none)."""
        return bool(self.batch.get(ROLLOUT_STEP, False))

    @property
    def has_samples(self) -> bool:
        return POLICY + "labels" in self.batch


LossParts = tuple[torch.Tensor, dict[str, torch.Tensor]]


def task_ce(x: LossInputs) -> torch.Tensor:
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


class Method:
    """One training method: subclasses set the class attributes, override `signals` and `loss`, and are
    added to the registry with `@register`."""

    name: ClassVar[str]
    settings: ClassVar[type[MethodSettings]] = MethodSettings
    baseline: ClassVar[bool] = False  # the method every other is compared with in the report
    color: ClassVar[str] = ""  # in figures ("": one from a spare palette)
    kd_term: ClassVar[str] = ""  # what its logged `loss_kd` measures (figure captions)
    # Whether it works for a student whose tokenizer differs from the teacher's (preflight refuses others).
    across_tokenizers: ClassVar[bool] = False

    def signals(self, params: Mapping[str, Any]) -> Signals:
        """What a run with these params (one grid point) reads from the teacher; none by default."""
        return Signals()

    def loss(self, x: LossInputs) -> LossParts:
        """The loss to minimise and its logged parts (`ce`, `kd`, ...), sums over tokens / `x.num_tokens`."""
        raise NotImplementedError

    def rollout(self, params: Mapping[str, Any]) -> Rollout | None:
        """How a run with these params samples its own training answers (on-policy); None: it does not."""
        return None

    def across_tokenizers_refused(self, settings: MethodSettings) -> str | None:
        """Why these settings cannot train a student whose tokenizer differs from the teacher's (None: they
        can); preflight refuses such a study with it."""
        return None if self.across_tokenizers else "it has no cross-tokenizer form yet"


METHODS: dict[str, Method] = {}  # name -> method, in registration order (the report's table order)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry; registering a name again replaces it."""
    if not getattr(cls, "name", ""):
        raise TypeError(f"{cls.__name__}: a method needs a `name`")
    METHODS[cls.name] = cls()
    return cls
