"""What each run cost, from what the registry recorded: seconds and estimated FLOPs of the student's training
(live-teacher passes and rollouts included), plus its share of the teacher's adaptation and of the teacher
cache's build, split evenly over the runs that use them. Read by results.csv, the cost table and figure, and
the findings (gain per unit of cost).

Seconds (all from the registry):
- training: the run's ``train_runtime`` (the Trainer's wall time: any live-teacher pass and rollout happen
  inside it; ``teacher_seconds`` / ``rollout_seconds`` / ``student_seconds``, when a method records them,
  say how it splits);
- teacher share: the adapted teacher's ``train_runtime`` (``teacher-<task>``; its wall time without the
  evaluation) divided by the number of student runs of the task that learn from the teacher (every method
  but the baseline; grid and final runs, every student);
- cache share: the ``cache-<task>`` run's wall time divided by the number of those runs that read the cache
  (`cache.mode: cached` and a method whose signals come from the teacher and not live).

Estimated FLOPs (the usual 2 FLOPs per parameter per token forward; backward 2 more for the activations'
gradients and 2 for every trainable weight's): student training (4 N + 2 N_trainable) x ``train_tokens``
(recorded by `kdlab.stages.diagnostics`), live-teacher forward passes 2 N_teacher x ``teacher_tokens``,
rollouts 2 N x ``rollout_tokens``. The teacher's adaptation and cache build have no token count in the
registry: they are counted in seconds only (FLOPs n/a for those parts), which the table's note says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdlab.methods import METHODS, baseline
from kdlab.registry import RunRecord
from kdlab.report.collect import StudyOutputs

# results.csv columns, in order.
COST_COLUMNS = ["cost_training_s", "cost_teacher_share_s", "cost_cache_share_s", "cost_total_s",
                "cost_flops"]


@dataclass
class RunCost:
    training_s: float | None  # train_runtime
    teacher_share_s: float = 0.0  # this run's share of teacher adaptation
    cache_share_s: float = 0.0  # and of the cache build
    flops: float | None = None  # estimated training FLOPs (student, live teacher, rollouts)
    rollout_s: float | None = None  # parts of training_s, when the method records them
    teacher_pass_s: float | None = None

    @property
    def total_s(self) -> float | None:
        if self.training_s is None:
            return None
        return self.training_s + self.teacher_share_s + self.cache_share_s


def _number(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    v = (metrics or {}).get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _learns_from_teacher(run: RunRecord) -> bool:
    return run.kind == "student" and run.method != baseline().name


def _reads_cache(outputs: StudyOutputs, run: RunRecord) -> bool:
    if not _learns_from_teacher(run) or run.method not in METHODS:
        return False
    if outputs.config is not None and outputs.config.cache.mode != "cached":
        return False
    try:
        signals = METHODS[run.method].signals(run.params)
    except Exception:  # params of another kdlab version: count it as a cache reader, as KD methods are
        return True
    return signals.from_teacher and not signals.live


def teacher_parameters(outputs: StudyOutputs) -> float | None:
    """The teacher's parameter count: bench.json's teacher entry (the registry does not record it)."""
    for entry in ((outputs.bench or {}).get("models") or {}).values():
        if isinstance(entry, Mapping) and entry.get("role") == "teacher":
            n = entry.get("parameters")
            if isinstance(n, int | float):
                return float(n)
    return None


def training_flops(metrics: Mapping[str, Any] | None, teacher_params: float | None) -> float | None:
    """Estimated FLOPs of one run's training (see the module docstring); None without ``train_tokens``."""
    tokens, n = _number(metrics, "train_tokens"), _number(metrics, "parameters")
    if tokens is None or n is None:
        return None
    trainable = _number(metrics, "trainable_parameters") or n
    flops = (4.0 * n + 2.0 * trainable) * tokens
    flops += 2.0 * n * (_number(metrics, "rollout_tokens") or 0.0)
    teacher_tokens = _number(metrics, "teacher_tokens") or 0.0
    if teacher_tokens:
        if teacher_params is None:
            return None  # a live teacher's share cannot be estimated without its size
        flops += 2.0 * teacher_params * teacher_tokens
    return flops


def run_costs(outputs: StudyOutputs) -> dict[str, RunCost]:
    """Every finished student run's cost, by run id."""
    students = [r for r in outputs.runs if r.kind == "student" and r.done]
    learners: dict[str, int] = {}
    readers: dict[str, int] = {}
    for r in students:
        if _learns_from_teacher(r):
            learners[r.task] = learners.get(r.task, 0) + 1
        if _reads_cache(outputs, r):
            readers[r.task] = readers.get(r.task, 0) + 1
    teacher_n = teacher_parameters(outputs)
    out: dict[str, RunCost] = {}
    for r in students:
        cost = RunCost(_number(r.metrics, "train_runtime"), flops=training_flops(r.metrics, teacher_n),
                       rollout_s=_number(r.metrics, "rollout_seconds"),
                       teacher_pass_s=_number(r.metrics, "teacher_seconds"))
        teacher = outputs.get(f"teacher-{r.task}")
        if _learns_from_teacher(r) and teacher is not None and teacher.done:
            seconds = _number(teacher.metrics, "train_runtime")
            seconds = seconds if seconds is not None else teacher.wall_time
            cost.teacher_share_s = (seconds or 0.0) / learners[r.task]
        cache = outputs.get(f"cache-{r.task}")
        if _reads_cache(outputs, r) and cache is not None and cache.done:
            cost.cache_share_s = (cache.wall_time or 0.0) / readers[r.task]
        out[r.id] = cost
    return out


def cost_row(cost: RunCost | None) -> dict[str, Any]:
    """A run's results.csv cost columns (empty when unknown)."""
    if cost is None:
        return {}
    total = cost.total_s
    return {
        "cost_training_s": None if cost.training_s is None else round(cost.training_s, 2),
        "cost_teacher_share_s": round(cost.teacher_share_s, 2),
        "cost_cache_share_s": round(cost.cache_share_s, 2),
        "cost_total_s": None if total is None else round(total, 2),
        "cost_flops": None if cost.flops is None else f"{cost.flops:.4g}",
    }


def add_cost_columns(
    header: list[str], rows: list[dict[str, Any]], costs: Mapping[str, RunCost]
) -> list[str]:
    """results.csv with each student run's cost columns (before the fixed tail columns); the new header."""
    for row in rows:
        row.update(cost_row(costs.get(row["run"])))
    at = header.index("train_runtime") if "train_runtime" in header else len(header)
    return header[:at] + COST_COLUMNS + header[at:]


@dataclass
class GroupCost:
    """A (student, method, task)'s cost: per chosen run (mean and std over seeds) and its whole grid."""

    seconds: list[float]  # total seconds of each chosen run (one per seed)
    flops: list[float]  # estimated FLOPs of each chosen run that has them
    grid_seconds: float  # every run of the group: grid candidates and the other seeds


def group_cost(group: Any, costs: Mapping[str, RunCost]) -> GroupCost:
    runs = {r.id: r for r in [*group.candidates, *group.runs]}
    chosen = [costs[r.id] for r in group.runs if r.id in costs]
    seconds = [t for c in chosen if (t := c.total_s) is not None]
    flops = [c.flops for c in chosen if c.flops is not None]
    grid = sum(t for rid in runs if rid in costs and (t := costs[rid].total_s) is not None)
    return GroupCost(seconds, flops, grid)
