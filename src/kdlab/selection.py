"""Choosing a grid setting: the one rule the sweep, the report and the bench all use. The best setting of a
(task, student, method) is its first-seed grid run with the highest selection-split metric (the task's own,
e.g. accuracy or F1: losses of different methods do not compare); selection.json keeps each choice and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.files import atomic_write_json
from kdlab.layout import SELECTION
from kdlab.registry import RunRecord


def selection_value(run: RunRecord, metric: str) -> float | None:
    """A run's metric on the selection split (None: not evaluated there, or not a finite number)."""
    value = ((run.metrics or {}).get("selection") or {}).get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def best_run(runs: Sequence[RunRecord], metric: str) -> RunRecord:
    """The run with the highest selection-split `metric` (the first of equals; runs without one last)."""
    return max(runs, key=lambda r: -math.inf if (v := selection_value(r, metric)) is None else v)


def record_choice(path: Path, key: str, best: RunRecord, runs: Sequence[RunRecord], metric: str) -> None:
    """Add the choice of `key` (method-task-student) to the study's selection file `path`."""
    chosen = json.loads(path.read_text()) if path.exists() else {}
    chosen[key] = {
        "metric": f"selection {metric}",
        "chosen": best.params,
        "run": best.id,
        "candidates": {r.id: selection_value(r, metric) for r in runs},
        "why": f"highest selection-split {metric} ({selection_value(best, metric):.2f}) of {len(runs)} "
        "settings",
    }
    atomic_write_json(path, chosen, indent=1)


@dataclass
class Group:
    """The chosen setting of one (student, method, task) and its finished runs over seeds."""

    student: str
    method: str
    task: str
    params: dict[str, Any]
    runs: list[RunRecord]  # done runs of the chosen setting; the first-seed (grid) run first
    candidates: list[RunRecord]  # done first-seed grid runs, every setting
    source: str  # how the setting was chosen
    varying: list[str]  # params that differ between the grid's settings

    @property
    def first(self) -> RunRecord | None:
        return self.runs[0] if self.runs else None


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def chosen_groups(
    runs: Sequence[RunRecord],
    selection: Mapping[str, Any],
    seeds: Sequence[int],
    metric: Callable[[str], str],
) -> dict[tuple[str, str, str], Group]:
    """The chosen setting per (student, method, task) of the student `runs`: selection.json's entry, else the
    only setting, else (a grid still running in another process) `best_run` of the finished grid runs.
    `metric(task)` names the metric a task chooses on."""
    seed_order = {s: i for i, s in enumerate(seeds)}
    by_group: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in runs:
        if r.kind == "student":
            by_group.setdefault((r.student, r.method, r.task), []).append(r)
    groups: dict[tuple[str, str, str], Group] = {}
    for (student, method, task), group_runs in by_group.items():
        done = [r for r in group_runs if r.done]
        grid = [r for r in done if r.stage == "grid"]
        settings = {_key(r.params): r.params for r in group_runs}
        varying = sorted(
            {
                k
                for p in settings.values()
                for k in p
                if len({_key({k: q.get(k)}) for q in settings.values()}) > 1
            }
        )
        entry = selection.get(f"{method}-{task}-{student}")
        if isinstance(entry, dict) and isinstance(entry.get("chosen"), dict):
            params, source = entry["chosen"], SELECTION
        elif len(settings) == 1:
            params, source = next(iter(settings.values())), "single setting"
        elif grid:
            params = best_run(grid, metric(task)).params
            source = f"best selection {metric(task)} (no selection.json entry yet)"
        else:
            continue
        chosen = [r for r in done if _key(r.params) == _key(params)]
        chosen.sort(key=lambda r: (r.stage != "grid", seed_order.get(r.seed, len(seed_order)), r.seed or 0))
        groups[(student, method, task)] = Group(
            student, method, task, dict(params), chosen, grid, source, varying
        )
    return groups
