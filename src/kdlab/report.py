"""Results tables from the registry: the teacher rows and, per student and method, the chosen setting's
mean ± std over seeds on each task's evaluation split."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.registry import Registry, RunRecord

METRICS = {"sst2": ["accuracy"], "squad": ["exact_match", "f1"]}
LABELS = {"accuracy": "Acc", "exact_match": "EM", "f1": "F1"}
TASK_LABELS = {"sst2": "SST-2", "squad": "SQuAD"}


@dataclass
class Row:
    model: str
    method: str
    cells: dict[tuple[str, str], list[float]]  # (task, metric) -> values over seeds
    params: dict[tuple[str, str], dict[str, Any]]


def final_runs(registry: Registry, selection: dict[str, Any]) -> dict[tuple[str, str, str], list[RunRecord]]:
    """Done student runs of the chosen setting of each (student, method, task), all seeds."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in registry.runs(kind="student", status="done"):
        chosen = selection.get(f"{r.method}-{r.task}-{r.student}")
        if chosen is not None and r.params != chosen["chosen"]:
            continue
        groups.setdefault((r.student, r.method, r.task), []).append(r)
    return groups


def build_rows(registry: Registry, selection: dict[str, Any], tasks: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for label, rid in (("teacher (zero-shot)", "zero-shot"), ("teacher (adapted)", "")):
        cells: dict[tuple[str, str], list[float]] = {}
        for task in tasks:
            run = registry.get(f"teacher-{task}-{rid}".rstrip("-"))
            if run is not None and run.status == "done":
                for m in METRICS[task]:
                    cells[(task, m)] = [run.metrics["eval"][m]]
        if cells:
            rows.append(Row(label, "teacher", cells, {}))
    groups = final_runs(registry, selection)
    for student, method in sorted({(s, m) for s, m, _ in groups}, key=lambda x: (x[0], _method_order(x[1]))):
        cells, params = {}, {}
        for task in tasks:
            runs = groups.get((student, method, task), [])
            for m in METRICS[task]:
                if runs:
                    cells[(task, m)] = [r.metrics["eval"][m] for r in runs]
            if runs:
                params[(task, "")] = runs[0].params
        rows.append(Row(student, method, cells, params))
    return rows


def _method_order(m: str) -> int:
    return ["teacher", "sft", "kd1", "kd2", "kd3"].index(m) if m in ("teacher", "sft", "kd1", "kd2", "kd3") else 9


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    cols = [(t, m) for t in tasks for m in METRICS[t]]
    head = ["model", "method"] + [f"{TASK_LABELS[t]} {LABELS[m]}" for t, m in cols] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = max((len(v) for v in r.cells.values()), default=0)
        lines.append("| " + " | ".join([r.model, r.method] + [_cell(r.cells.get(c)) for c in cols]
                                        + [str(seeds)]) + " |")
    return "\n".join(lines) + "\n"


def write_results(study: Any) -> list[Path]:
    out: Path = study.out
    tasks = list(study.config.tasks)
    selection_path = out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.exists() else {}
    rows = build_rows(study.registry, selection, tasks)
    md = out / "results.md"
    md.write_text(f"# {study.config.name}: results\n\nMean ± std over seeds on each task's evaluation split "
                  "(SST-2 accuracy %, SQuAD EM/F1).\n\n" + markdown_table(rows, tasks))
    csv_path = out / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "kind", "task", "method", "student", "stage", "seed", "params", "status",
                    "eval_metrics", "selection_metrics", "wall_time"])
        for r in study.registry.runs():
            metrics = r.metrics or {}
            w.writerow([r.id, r.kind, r.task, r.method, r.student, r.stage, r.seed, json.dumps(r.params),
                        r.status, json.dumps(metrics.get("eval", {})), json.dumps(metrics.get("selection", {})),
                        f"{r.wall_time:.1f}" if r.wall_time else ""])
    study.echo(markdown_table(rows, tasks))
    return [md, csv_path]
