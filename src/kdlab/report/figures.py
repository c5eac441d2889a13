"""The report's figures from the study folder: λ sensitivity, quality against cost (bench.json), training
curves; drawn by `kdlab.figures` at print size."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.figures import (
    CostPoint,
    Curve,
    EfficiencyPoint,
    LambdaSeries,
    cost_figure,
    efficiency_figure,
    lambda_figure,
    training_figure,
)
from kdlab.methods import METHODS, baseline
from kdlab.metrics import LONG_NAMES
from kdlab.registry import RunRecord
from kdlab.report.collect import StudyOutputs, run_metric, setting_key, task_title
from kdlab.report.compare import format_value, param_name, setting_parts, setting_text, student_label
from kdlab.report.costs import RunCost
from kdlab.selection import Group

METRIC_NAMES = LONG_NAMES

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


# ---------------------------------------------------------------------------------------------------------
# figures


@dataclass
class FigureEntry:
    title: str
    caption: str
    paths: list[Path]


def _metric_axis(metric: str, split: str) -> str:
    return f"{split} {METRIC_NAMES.get(metric, metric)} (%)"


def lambda_figures(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], fig_dir: Path
) -> list[FigureEntry]:
    entries = []
    students = sorted({g.student for g in groups.values()})
    many = len(students) > 1
    for task in outputs.tasks:
        metric = outputs.task(task).metric
        series: list[LambdaSeries] = []
        baselines: dict[str, float] = {}
        for (student, method, t), g in groups.items():
            if t != task:
                continue
            if method == baseline().name:
                v = run_metric(g.first, "selection", metric) if g.first is not None else None
                if v is not None:
                    baselines[f"{student_label(student, method, many)} (no λ)"] = v
                continue
            # One line per combination of the other grid axes (e.g. temperature), λ on the x axis.
            lines: dict[str, list[RunRecord]] = {}
            for r in g.candidates:
                if "lam" in r.params and run_metric(r, "selection", metric) is not None:
                    other = {k: r.params.get(k) for k in g.varying if k != "lam"}
                    lines.setdefault(setting_key(other), []).append(r)
            for other_key, runs in lines.items():
                other = json.loads(other_key)
                label = student_label(student, method, many)
                if other:
                    label += (
                        " ("
                        + ", ".join(
                            f"{param_name(method, k)[0] or k}={format_value(v)}" for k, v in other.items()
                        )
                        + ")"
                    )
                is_chosen = all(g.params.get(k) == v for k, v in other.items())
                seed_values = [v for r in g.runs if (v := run_metric(r, "selection", metric)) is not None]
                series.append(
                    LambdaSeries(
                        label,
                        method,
                        [float(r.params["lam"]) for r in runs],
                        [float(run_metric(r, "selection", metric) or 0.0) for r in runs],
                        chosen_lam=float(g.params["lam"]) if is_chosen and "lam" in g.params else None,
                        student_index=students.index(student),
                        chosen_seed_values=seed_values if is_chosen else [],
                    )
                )
        if not series:
            continue
        title = f"{task_title(task)}: λ sensitivity"
        paths = lambda_figure(
            fig_dir / f"lambda_{task}",
            title=title,
            ylabel=_metric_axis(metric, "selection"),
            series=series,
            baselines=baselines,
        )
        caption = (
            f"Selection-split {METRIC_NAMES.get(metric, metric)} of the first-seed grid runs against "
            "λ; the ring marks the chosen setting, short bars its other seeds' values (the seeds' spread), "
            "dashed lines are SFT (no KD term)."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries


def _bench_values(
    outputs: StudyOutputs,
    groups: Mapping[tuple[str, str, str], Group],
    entry: Mapping[str, Any],
    task: str,
    metric: str,
) -> list[float]:
    """Every seed's evaluation metric behind `_bench_value` (one value for a teacher or a lone run)."""
    run = outputs.get(entry.get("run"))
    if run is not None and run.kind == "student" and run.task == task:
        g = groups.get((run.student, run.method, task))
        if g is not None and run.id in {r.id for r in g.runs}:
            return [v for r in g.runs if (v := run_metric(r, "eval", metric)) is not None]
    value = _bench_value(outputs, groups, entry, task, metric)
    return [] if value is None else [value]


def _bench_value(
    outputs: StudyOutputs,
    groups: Mapping[tuple[str, str, str], Group],
    entry: Mapping[str, Any],
    task: str,
    metric: str,
) -> float | None:
    """Evaluation metric of a benchmarked model on ``task``: its student group's mean over seeds, or the
    teacher run (zero-shot or adapted) that matches it."""
    run = outputs.get(entry.get("run"))
    zero_shot = "zero" in str(entry.get("method", "")) or (run is not None and run.id.endswith("-zero-shot"))
    if run is not None and run.kind == "student":
        if run.task != task:
            return None  # a student trained on another task: its quality here was never measured
        g = groups.get((run.student, run.method, task))
        if g is not None and run.id in {r.id for r in g.runs}:
            values = [v for r in g.runs if (v := run_metric(r, "eval", metric)) is not None]
            return float(np.mean(values)) if values else None
        return run_metric(run, "eval", metric) if run.done else None
    if entry.get("role") == "teacher" or (run is not None and run.kind == "teacher"):
        ids = [f"teacher-{task}-zero-shot"] if zero_shot else [f"teacher-{task}", f"teacher-{task}-zero-shot"]
        for rid in ids:
            r = outputs.get(rid)
            if r is not None and r.done:
                return run_metric(r, "eval", metric)
    return None


def efficiency_points(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], task: str
) -> list[EfficiencyPoint]:
    metric = outputs.task(task).metric
    points = []
    for label, entry in (outputs.bench or {}).get("models", {}).items():
        perf = (entry.get("tasks") or {}).get(task)
        if not isinstance(perf, Mapping) or not entry.get("parameters"):
            continue
        value = _bench_value(outputs, groups, entry, task, metric)
        if value is None:
            continue
        latency = perf.get("latency_ms_p50")
        seeds = _bench_values(outputs, groups, entry, task, metric)
        points.append(
            EfficiencyPoint(
                str(label),
                str(entry.get("role", "student")),
                str(entry.get("method", "")),
                value,
                float(entry["parameters"]),
                float(latency) if isinstance(latency, int | float) else None,
                float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0,
            )
        )
    return points


def efficiency_figures(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], fig_dir: Path
) -> list[FigureEntry]:
    if outputs.bench is None:
        return []
    entries = []
    for task in outputs.tasks:
        points = efficiency_points(outputs, groups, task)
        if not points:
            continue
        metric = outputs.task(task).metric
        title = f"{task_title(task)}: quality vs cost"
        paths = efficiency_figure(
            fig_dir / f"efficiency_{task}", title=title, ylabel=_metric_axis(metric, "eval"), points=points
        )
        device = outputs.bench.get("device", "the bench device")
        caption = (
            f"Evaluation {METRIC_NAMES.get(metric, metric)} against parameters and median latency on "
            f"{device} (bench.json); stars are teachers, bars ±1 std over the seeds of a student's chosen "
            "setting, the dashed line the frontier."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries


def _log_losses(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    history = json.loads(path.read_text())
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name in ("ce", "kd"):
        steps, values = [], []
        for entry in history:
            v = entry.get(f"loss_{name}")
            if v is None and name == "ce" and "loss_kd" not in entry:
                v = entry.get("loss")  # an SFT log without parts: its loss is the CE
            if isinstance(v, int | float) and math.isfinite(v) and "step" in entry:
                steps.append(float(entry["step"]))
                values.append(float(v))
        if steps:
            out[name] = (steps, values)
    return out


def training_figures(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], fig_dir: Path, notes: list[str]
) -> list[FigureEntry]:
    entries = []
    students = sorted({g.student for g in groups.values()})
    many = len(students) > 1
    for task in outputs.tasks:
        curves = []
        for (student, method, t), g in groups.items():
            if t != task or g.first is None:
                continue
            path = outputs.run_dir(g.first) / "log_history.json"
            if not path.is_file():
                notes.append(f"{g.first.id}: no log_history.json; left out of the training curves")
                continue
            try:
                losses = _log_losses(path)
            except (ValueError, TypeError, AttributeError) as e:
                notes.append(f"{path}: unreadable log history ({e})")
                continue
            setting = setting_text(setting_parts(g))
            label = student_label(student, method, many) + ("" if setting == "–" else f" ({setting})")
            curves.append(Curve(label, method, losses, students.index(student)))
        if not any(c.losses for c in curves):
            continue
        title = f"{task_title(task)}: training losses"
        paths = training_figure(fig_dir / f"training_{task}", title=title, curves=curves)
        caption = (
            "Losses logged during training of the first-seed run of each chosen setting: task "
            "cross-entropy on the gold answers, and the KD term ("
            + "; ".join(f"{m.name}: {m.kd_term}" for m in METHODS.values() if m.kd_term)
            + ")."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries




def cost_points(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], task: str,
    costs: Mapping[str, RunCost],
) -> list[CostPoint]:
    """Per (student, method) of ``task``: each chosen run's evaluation metric and total cost per run, seed
    by seed (runs without a cost are left out)."""
    metric = outputs.task(task).metric
    many = len({g.student for g in groups.values()}) > 1
    points = []
    for (student, method, t), g in groups.items():
        if t != task:
            continue
        pairs = [(v, c.total_s) for r in g.runs if (v := run_metric(r, "eval", metric)) is not None
                 and (c := costs.get(r.id)) is not None and c.total_s is not None]
        if pairs:
            points.append(CostPoint(student_label(student, method, many), method, [p[0] for p in pairs],
                                    [float(p[1]) for p in pairs]))
    return points


def cost_figures(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], fig_dir: Path,
    costs: Mapping[str, RunCost],
) -> list[FigureEntry]:
    entries = []
    for task in outputs.tasks:
        points = cost_points(outputs, groups, task, costs)
        if not points:
            continue
        metric = outputs.task(task).metric
        title = f"{task_title(task)}: quality vs training cost"
        paths = cost_figure(fig_dir / f"cost_{task}", title=title, ylabel=_metric_axis(metric, "eval"),
                            points=points)
        caption = (
            f"Evaluation {METRIC_NAMES.get(metric, metric)} of each method's chosen setting against its "
            "cost per run: training plus its share of the teacher's adaptation and cache build (registry "
            "times; see the cost table). Small dots are seeds, large ones their mean with ±1 std bars; the "
            "dashed line is the Pareto front of the means."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries
