"""The study report, written from the output folder alone (so `kdlab report OUT` works in a fresh process).

    results.csv   every run, one row each (flattened metrics and params)
    summary.md    findings first (per task and KD method: Δ vs SFT with its 95% interval, p and Holm-adjusted
                  p, the teacher-SFT gap and the share of it recovered, and a sentence saying what KD did);
                  then per task: teacher rows, each (student, method)'s chosen setting with mean ± std over
                  seeds, and Δ vs SFT with a paired-bootstrap 95% interval and p-value
    summary.tex   the same tables for LaTeX (booktabs)
    per_example_scores.csv  the per-example evaluation scores the statistics use (run, example, score), so
                  every Δ and p can be recomputed
    figures/      λ sensitivity, efficiency frontier (with bench.json), training curves; PNG and PDF
    report.md     links to all of it, the data sizes, the environment and what reproducing the study needs
                  (versions, device, dtypes, determinism, seeds, fingerprints: provenance.json when the study
                  wrote one), the study config and how to reproduce it

Every file is written to a temporary name and moved into place, and report.md last, so a crash leaves either
the previous report or the new one, never half a file nor a report linking to missing figures.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdlab.config import StudyConfig, load_config
from kdlab.figures import (
    COLUMN_WIDTH_IN,
    Curve,
    EfficiencyPoint,
    LambdaSeries,
    atomic_output,
    efficiency_figure,
    lambda_figure,
    training_figure,
)
from kdlab.methods import METHODS, MixedSettings, baseline
from kdlab.metrics import LONG_NAMES, SHORT_NAMES
from kdlab.registry import Registry, RunRecord
from kdlab.stages.selection import Group
from kdlab.stages.selection import chosen_groups as selection_groups
from kdlab.stats import BootstrapResult, holm, mean_std, paired_bootstrap, significance_level
from kdlab.tasks import TASKS, Example, Task, get_task

__all__ = [
    "Comparison",
    "Finding",
    "Group",
    "StudyOutputs",
    "bootstrap_seed",
    "build_findings",
    "chosen_groups",
    "compare_to_sft",
    "finding_sentence",
    "load_outputs",
    "write_report",
    "write_results",
]

LABELS = SHORT_NAMES
METRIC_NAMES = LONG_NAMES
DECIMALS = 1
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
ALPHA = significance_level(CONFIDENCE)  # findings call a difference significant when Holm-adjusted p < ALPHA
SCORES_FILE = "per_example_scores.csv"
ENV_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "pandas", "matplotlib")
# The registry's eval metric and the mean of the per-example scores must agree to this many points (%).
CONSISTENCY_TOL = 0.01

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


# ---------------------------------------------------------------------------------------------------------
# reading the output folder


@dataclass
class StudyOutputs:
    """What a study left in its output folder, read once."""

    out: Path
    runs: list[RunRecord]
    selection: dict[str, Any]
    config: StudyConfig | None
    config_text: str | None
    bench: dict[str, Any] | None
    tasks: list[str]
    notes: list[str] = field(default_factory=list)  # problems met while reading, shown in report.md
    provenance: dict[str, Any] | None = None  # provenance.json: seeds, determinism, fingerprints
    _tasks: dict[str, Task] = field(default_factory=dict, repr=False)

    def task(self, name: str) -> Task:
        """The task `name` as the study defined it (a built-in task's defaults without a valid study.yaml)."""
        if name not in self._tasks:
            settings = self.config.tasks.get(name) if self.config is not None else None
            self._tasks[name] = get_task(name, settings)
        return self._tasks[name]

    def get(self, run_id: str | None) -> RunRecord | None:
        return next((r for r in self.runs if r.id == run_id), None) if run_id else None

    def run_dir(self, run: RunRecord) -> Path:
        # Relative to the folder first: output_dir is absolute and breaks when a study folder is moved.
        local = self.out / "runs" / run.id
        return local if local.is_dir() or not run.output_dir else Path(run.output_dir)

    @property
    def name(self) -> str:
        return self.config.name if self.config is not None else self.out.name


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        notes.append(f"{path.name} is not valid JSON ({e}); ignored")
        return None


def load_outputs(out: str | Path) -> StudyOutputs:
    out = Path(out)
    if not (out / "registry.sqlite").is_file():
        raise FileNotFoundError(f"{out}: no registry.sqlite here; not a kdlab study output folder")
    notes: list[str] = []
    runs = Registry(out / "registry.sqlite").runs()
    selection = _read_json(out / "selection.json", notes) or {}
    bench = _read_json(out / "bench.json", notes)
    if bench is not None and not isinstance(bench.get("models"), dict):
        notes.append("bench.json has no `models` mapping; efficiency results skipped")
        bench = None
    config, config_text = None, None
    if (out / "study.yaml").is_file():
        config_text = (out / "study.yaml").read_text(encoding="utf-8")
        try:
            config = load_config(out / "study.yaml")
        except ValueError as e:  # ConfigError: still report, with task defaults
            notes.append(f"study.yaml could not be validated ({e}); task defaults used")
    tasks = list(config.tasks) if config is not None else []
    tasks += [t for t in dict.fromkeys(r.task for r in runs) if t not in tasks]
    known = set(config.tasks) if config is not None else set(TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown:  # runs of a task this kdlab does not know: listed in results.csv, left out of the tables
        notes.append(f"unknown task(s) {', '.join(unknown)}: only in results.csv")
    tasks = [t for t in tasks if t in known]
    provenance = _read_json(out / "provenance.json", notes)
    if provenance is not None and not isinstance(provenance, dict):
        notes.append("provenance.json is not a JSON object; ignored")
        provenance = None
    return StudyOutputs(out, runs, selection, config, config_text, bench, tasks, notes, provenance)


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty: provenance.json and manifests are read defensively."""
    return value if isinstance(value, dict) else {}


def bootstrap_seed(outputs: StudyOutputs) -> int:
    """The bootstrap's seed: provenance.json's ``seeds.bootstrap`` when the study recorded one, else the
    default `BOOTSTRAP_SEED` (the study config has no bootstrap seed)."""
    seed = _mapping(_mapping(outputs.provenance).get("seeds")).get("bootstrap")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else BOOTSTRAP_SEED


def _seed_source(outputs: StudyOutputs, seed: int) -> str:
    recorded = _mapping(_mapping(outputs.provenance).get("seeds")).get("bootstrap")
    return "provenance.json" if recorded is not None and recorded == seed else "default"


def task_title(task: str) -> str:
    """How tables and figures name a task: a built-in task's title (SST-2, SQuAD), else its name."""
    return (TASKS[task].title if task in TASKS else "") or task


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _method_rank(method: str) -> tuple[int, str]:
    order = list(METHODS)  # registration order: the baseline, then the KD methods
    return (order.index(method) if method in order else len(order), method)


def _metric(run: RunRecord, split: str, metric: str) -> float | None:
    value = ((run.metrics or {}).get(split) or {}).get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def chosen_groups(outputs: StudyOutputs) -> dict[tuple[str, str, str], Group]:
    """The chosen setting per (student, method, task) of the study's known tasks (`selection.chosen_groups`:
    selection.json's entry, the only setting, or the best grid run so far), in table order."""
    seeds = outputs.config.seeds if outputs.config is not None else []
    runs = [r for r in outputs.runs if r.task in outputs.tasks]
    groups = selection_groups(runs, outputs.selection, seeds, lambda task: outputs.task(task).metric)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], _method_rank(kv[0][1]))))


# ---------------------------------------------------------------------------------------------------------
# results.csv

_CSV_HEAD = ["run", "kind", "task", "method", "student", "stage", "seed", "status", "chosen"]
_CSV_METRICS = [f"{split}_{m}" for split in ("eval", "selection") for m in ("accuracy", "exact_match", "f1")]
_CSV_TAIL = [
    "train_runtime",
    "steps",
    "train_examples",
    "trainable_parameters",
    "parameters",
    "wall_time",
    "attempts",
    "error",
]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "_"))
        else:
            out[name] = json.dumps(v) if isinstance(v, list) else v
    return out


def results_table(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and one row per run: identity, status, `param_*` columns, flattened metrics, wall time."""
    chosen_ids = {r.id for g in groups.values() for r in g.runs}
    rows: list[dict[str, Any]] = []
    param_cols: dict[str, None] = {}
    metric_cols: dict[str, None] = dict.fromkeys(_CSV_METRICS)
    for r in outputs.runs:
        row: dict[str, Any] = {
            "run": r.id,
            "kind": r.kind,
            "task": r.task,
            "method": r.method,
            "student": r.student,
            "stage": r.stage,
            "seed": r.seed,
            "status": r.status,
            "chosen": "" if r.kind == "teacher" else r.id in chosen_ids,
            "wall_time": round(r.wall_time, 2) if r.wall_time is not None else None,
            "attempts": r.attempts,
            "error": (r.error or "").strip().splitlines()[-1] if (r.error or "").strip() else None,
        }
        for k, v in r.params.items():
            param_cols[f"param_{k}"] = None
            row[f"param_{k}"] = json.dumps(v) if isinstance(v, list | dict) else v
        for k, v in _flatten(r.metrics or {}).items():
            if k not in _CSV_TAIL:
                metric_cols[k] = None
            row[k] = v
        rows.append(row)
    # Fixed columns first (a stable schema for scripts), then whatever else the runs recorded, sorted.
    extra = sorted(c for c in metric_cols if c not in _CSV_METRICS)
    header = _CSV_HEAD + sorted(param_cols) + _CSV_METRICS + extra + _CSV_TAIL
    return header, rows


def _csv_text(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in header})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# per-example scores and the comparison with SFT


@dataclass
class Comparison:
    """One method against SFT (same student, task) on one metric; ``result`` None with a ``note`` if it
    could not be computed."""

    task: str
    student: str
    method: str
    metric: str
    result: BootstrapResult | None
    seeds: tuple[int, int] = (0, 0)  # (method, SFT) seeds averaged per example
    note: str = ""
    # Holm-adjusted p over every comparison with SFT of the same student (all tasks, methods, metrics).
    holm_p: float | None = None


class _Scorer:
    """Reference answers and per-example scores of runs, loaded once per task."""

    def __init__(self, outputs: StudyOutputs, data_dir: str | Path | None, notes: list[str]):
        self.outputs, self.data_dir, self.notes = outputs, data_dir, notes
        self._refs: dict[str, tuple[Task, list[Example]] | str] = {}
        self._scores: dict[str, dict[str, np.ndarray] | str] = {}
        self.scored: dict[str, RunRecord] = {}  # runs scored so far, in order: rows of per_example_scores.csv

    def references(self, task: str) -> tuple[Task, list[Example]]:
        if task not in self._refs:
            try:
                self._refs[task] = self._load(task)
            except Exception as e:  # no data folder, hub offline, stale manifest: report without statistics
                self._refs[task] = f"{type(e).__name__}: {e}"
        ref = self._refs[task]
        if isinstance(ref, str):
            raise ValueError(f"evaluation references of {task} unavailable ({ref})")
        return ref

    def _load(self, task: str) -> tuple[Task, list[Example]]:
        config = self.outputs.config
        t = get_task(task, config.tasks.get(task) if config is not None else None)
        manifest = self.outputs.out / "data" / f"{task}.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found (it lists the evaluation example ids)")
        ids = [str(i) for i in json.loads(manifest.read_text())["eval"]]
        by_id = {ex.id: ex for ex in t.load(t.eval_split, self.data_dir)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} evaluation ids of data/{task}.json are not in the "
                f"{t.eval_split} split (e.g. {missing[0]!r}): another data folder?"
            )
        return t, [by_id[i] for i in ids]

    def scores(self, run: RunRecord) -> dict[str, np.ndarray]:
        if run.id not in self._scores:
            try:
                self._scores[run.id] = self._score(run)
            except Exception as e:
                self._scores[run.id] = f"{type(e).__name__}: {e}"
        got = self._scores[run.id]
        if isinstance(got, str):
            raise ValueError(got)
        self.scored.setdefault(run.id, run)
        return got

    def predictions_dir(self, run: RunRecord) -> Path:
        """Where a run's evaluation predictions are: a student's run folder; a teacher's evaluation folder,
        teacher/<task>-zero-shot or teacher/<task>-eval (the adapted teacher's own folder holds the model)."""
        if run.kind != "teacher":
            return self.outputs.run_dir(run)
        name = f"{run.task}-zero-shot" if run.id.endswith("-zero-shot") else f"{run.task}-eval"
        local = self.outputs.out / "teacher" / name
        if local.is_dir() or not run.output_dir:
            return local
        return Path(run.output_dir).with_name(name)

    def _score(self, run: RunRecord) -> dict[str, np.ndarray]:
        task, examples = self.references(run.task)
        path = self.predictions_dir(run) / task.predictions_file("eval")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        scores = task.per_example_scores(task.read_predictions(path), examples)
        for metric, values in scores.items():
            recorded = _metric(run, "eval", metric)
            if recorded is not None and abs(float(values.mean()) - recorded) > CONSISTENCY_TOL:
                self.notes.append(
                    f"{run.id}: its eval predictions give {metric} {values.mean():.2f} but the "
                    f"registry records {recorded:.2f} (predictions file from another run?)"
                )
        return scores


def compare_to_sft(
    outputs: StudyOutputs,
    groups: Mapping[tuple[str, str, str], Group],
    data_dir: str | Path | None = None,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int | None = None,
    notes: list[str] | None = None,
    scorer: _Scorer | None = None,
) -> list[Comparison]:
    """Paired bootstrap of every non-SFT method's chosen setting against SFT of the same student and task,
    per metric, on per-example scores averaged over each system's seeds (see `kdlab.stats`), with p-values
    Holm-adjusted per student over all its comparisons. ``seed``: default `bootstrap_seed` (provenance.json,
    else the default); ``scorer``: to keep the per-example scores it computes (write_report writes them)."""
    notes = notes if notes is not None else []
    seed = bootstrap_seed(outputs) if seed is None else seed
    scorer = scorer if scorer is not None else _Scorer(outputs, data_dir, notes)
    out: list[Comparison] = []
    sft = baseline().name
    for (student, method, task), group in groups.items():
        base = groups.get((student, sft, task))
        if method == sft or base is None:
            continue
        metrics = outputs.task(task).paired_metrics
        seeds = (len(group.runs), len(base.runs))
        try:
            if not group.runs or not base.runs:
                raise ValueError("no finished runs")
            system = [scorer.scores(r) for r in group.runs]
            reference = [scorer.scores(r) for r in base.runs]
        except ValueError as e:
            out += [Comparison(task, student, method, m, None, seeds, str(e)) for m in metrics]
            continue
        for m in metrics:
            res = paired_bootstrap(
                np.stack([s[m] for s in system]),
                np.stack([s[m] for s in reference]),
                n_resamples=n_resamples,
                confidence=CONFIDENCE,
                seed=seed,
            )
            out.append(Comparison(task, student, method, m, res, seeds))
    # One family per student: every method x task x metric compared with SFT (a study's "did KD help?").
    for student in dict.fromkeys(c.student for c in out):
        family = [c for c in out if c.student == student and c.result is not None]
        for c, adjusted in zip(family, holm([c.result.p_value for c in family]), strict=True):
            c.holm_p = float(adjusted)
    return out


def _score_all(outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], scorer: _Scorer) -> None:
    """Score what `compare_to_sft` did not need but a re-check does: every chosen run and the teachers."""
    for g in groups.values():
        for r in g.runs:
            with contextlib.suppress(ValueError):  # the comparison's note already says why
                scorer.scores(r)
    for task in outputs.tasks:
        try:
            scorer.references(task)
        except ValueError:
            continue  # no references: the Δ tables say so
        for rid in (f"teacher-{task}-zero-shot", f"teacher-{task}"):
            run = outputs.get(rid)
            if run is not None and run.done:
                try:
                    scorer.scores(run)
                except ValueError as e:
                    scorer.notes.append(f"{rid}: no per-example scores ({e})")


def per_example_rows(outputs: StudyOutputs, scorer: _Scorer) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of per_example_scores.csv: one row per (scored run, evaluation example), in the
    order of data/<task>.json's eval ids; a column per metric (x100, full precision)."""
    metrics = [m for t in outputs.tasks for m in outputs.task(t).paired_metrics]
    header = ["run", "task", "split", "example", *dict.fromkeys(metrics)]
    rows: list[dict[str, Any]] = []
    task_order = {t: i for i, t in enumerate(outputs.tasks)}
    runs = sorted(scorer.scored.values(), key=lambda r: (task_order.get(r.task, len(task_order)),
                                                          r.kind != "teacher"))
    for run in runs:  # per task, teachers first, then students in table order
        _, examples = scorer.references(run.task)
        scores = scorer.scores(run)
        for i, ex in enumerate(examples):
            row: dict[str, Any] = {"run": run.id, "task": run.task, "split": "eval", "example": ex.id}
            row.update({m: repr(float(v[i])) for m, v in scores.items()})
            rows.append(row)
    return header, rows


# ---------------------------------------------------------------------------------------------------------
# summary tables (markdown and LaTeX from one model)

_TEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
# "<" and ">" print as other glyphs in LaTeX's default text font encoding, hence the text commands.
_TEX_TEXT = {
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "λ": r"$\lambda$",
    "–": "--",
    "−": "$-$",
    "²": r"\textsuperscript{2}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def tex_escape(text: str) -> str:
    """Plain text as LaTeX: the ten specials escaped, and the few Unicode symbols kdlab writes as math."""
    return "".join(_TEX_SPECIALS.get(ch) or _TEX_TEXT.get(ch) or ch for ch in str(text))


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class SettingPart(NamedTuple):
    text: str  # the setting's name in tables ("": the value is shown alone)
    latex: str
    value: str


def _param_name(method: str, param: str) -> tuple[str, str]:
    """How `method`'s settings label a param: (text, LaTeX) ("" : the value alone)."""
    settings = METHODS[method].settings if method in METHODS else MixedSettings
    label = settings.label(param)
    text = param if label.text is None else label.text
    return text, tex_escape(text) if label.latex is None else label.latex


def setting_parts(group: Group) -> list[SettingPart]:
    """The chosen setting worth showing: what the method's settings always show (λ, T, divergence, ...),
    then any other grid axis that varied."""
    settings = METHODS[group.method].settings if group.method in METHODS else MixedSettings
    keys = [k for k, label in settings.labels.items() if label.in_tables and k in group.params]
    keys += [k for k in group.varying if k not in keys and k in group.params]
    return [SettingPart(*_param_name(group.method, k), _num(group.params[k])) for k in keys]


@dataclass
class SummaryRow:
    model: str
    method: str
    setting: list[SettingPart]
    values: dict[str, list[float]]  # metric -> values over seeds
    teacher: bool = False

    @property
    def n(self) -> int:
        return max((len(v) for v in self.values.values()), default=0)


@dataclass
class TaskSummary:
    task: str
    metrics: list[str]
    rows: list[SummaryRow]
    comparisons: list[Comparison]
    n_examples: int | None
    findings: list[Finding] = field(default_factory=list)

    def best(self, metric: str) -> float | None:
        """Best student mean as displayed (rounded: values that print the same are all bold)."""
        means = [
            round(mean_std(r.values[metric])[0], DECIMALS)
            for r in self.rows
            if not r.teacher and r.values.get(metric)
        ]
        return max(means) if means else None


def build_summaries(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], comparisons: Sequence[Comparison]
) -> list[TaskSummary]:
    out = []
    for task in outputs.tasks:
        metrics = list(outputs.task(task).metrics)
        rows: list[SummaryRow] = []
        for label, rid in (("zero-shot", f"teacher-{task}-zero-shot"), ("adapted", f"teacher-{task}")):
            run = outputs.get(rid)
            if run is not None and run.done:
                values = {m: [v] for m in metrics if (v := _metric(run, "eval", m)) is not None}
                rows.append(SummaryRow("teacher", label, [], values, teacher=True))
        for (student, method, t), g in groups.items():
            if t == task:
                values = {m: [v for r in g.runs if (v := _metric(r, "eval", m)) is not None] for m in metrics}
                rows.append(SummaryRow(student, method, setting_parts(g), values))
        n_examples = None
        manifest = outputs.out / "data" / f"{task}.json"
        if manifest.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                n_examples = len(json.loads(manifest.read_text())["eval"])
        task_comparisons = [c for c in comparisons if c.task == task]
        findings = build_findings(outputs, groups, task_comparisons)
        out.append(TaskSummary(task, metrics, rows, task_comparisons, n_examples, findings))
    return out


@dataclass
class Finding:
    """One KD method against SFT (same student) on one task and metric, with the teacher's lead over SFT."""

    comparison: Comparison
    setting: list[SettingPart]
    method_mean: float | None  # eval metric, mean over seeds (the results table's value)
    sft_mean: float | None
    teacher: float | None  # the teacher's eval metric, on the same evaluation examples
    teacher_label: str = "adapted"  # "zero-shot" when the study did not adapt the teacher

    @property
    def delta(self) -> float | None:
        """Δ vs SFT: the bootstrap's (the number printed beside the interval), else from the table means."""
        if self.comparison.result is not None:
            return self.comparison.result.delta
        if self.method_mean is None or self.sft_mean is None:
            return None
        return self.method_mean - self.sft_mean

    @property
    def gap(self) -> float | None:
        """Teacher minus SFT, in points."""
        return None if self.teacher is None or self.sft_mean is None else self.teacher - self.sft_mean

    @property
    def recovered(self) -> float | None:
        """Share of the teacher-SFT gap the method closes, in percent; None unless the teacher is ahead of
        SFT (as printed: a gap that rounds to 0 would turn noise into huge percentages)."""
        gap, delta = self.gap, self.delta
        if gap is None or delta is None or round(gap, DECIMALS) <= 0:
            return None
        return 100.0 * delta / gap

    @property
    def p_adjusted(self) -> float | None:
        """The p that decides significance: Holm-adjusted, else (no family computed) the raw p."""
        c = self.comparison
        if c.result is None:
            return None
        return c.holm_p if c.holm_p is not None else c.result.p_value

    @property
    def direction(self) -> int:
        """+1: significantly better than SFT, -1: significantly worse, 0: no significant difference (or
        not computed). The interval's side gives the sign: p < α means it excludes 0 (`kdlab.stats`)."""
        r, p = self.comparison.result, self.p_adjusted
        if r is None or p is None or p >= ALPHA:
            return 0
        return 1 if r.low > 0 else -1 if r.high < 0 else 0


def _teacher_reference(outputs: StudyOutputs, task: str) -> tuple[RunRecord | None, str]:
    """The teacher the students learned from: the adapted one of ``task``, else (no adaptation) the base."""
    for rid, label in ((f"teacher-{task}", "adapted"), (f"teacher-{task}-zero-shot", "zero-shot")):
        run = outputs.get(rid)
        if run is not None and run.done:
            return run, label
    return None, ""


def _seed_mean(runs: Sequence[RunRecord], metric: str) -> float | None:
    values = [v for r in runs if (v := _metric(r, "eval", metric)) is not None]
    return float(np.mean(values)) if values else None


def build_findings(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], comparisons: Sequence[Comparison]
) -> list[Finding]:
    """A `Finding` per comparison with SFT: the chosen setting, the means behind Δ and the teacher's score.
    The teacher's registry metric is on the same examples as the students' (data/<task>.json's eval ids)."""
    out = []
    for c in comparisons:
        group = groups.get((c.student, c.method, c.task))
        base = groups.get((c.student, baseline().name, c.task))
        teacher, label = _teacher_reference(outputs, c.task)
        out.append(
            Finding(
                c,
                setting_parts(group) if group is not None else [],
                _seed_mean(group.runs, c.metric) if group is not None else None,
                _seed_mean(base.runs, c.metric) if base is not None else None,
                _metric(teacher, "eval", c.metric) if teacher is not None else None,
                label,
            )
        )
    return out


def _p_num(p: float) -> str:
    """p with 3 decimals, more when 3 would round it across α (0.0496 must not print as 0.050)."""
    if p < 0.001:
        return "<0.001"
    digits = 3
    text = f"{p:.{digits}f}"
    while digits < 6 and (float(text) < ALPHA) != (p < ALPHA):
        digits += 1
        text = f"{p:.{digits}f}"
    return text


def _where(task: str, metric: str) -> str:
    return f"{task_title(task)} {METRIC_NAMES.get(metric, metric)}"


def finding_sentence(finding: Finding, *, many_students: bool = False) -> str:
    """What the method did, in one sentence from the numbers: beats SFT / is worse than SFT (Holm-adjusted
    p < 0.05) or no significant difference, with Δ, its 95% interval, p and the Holm-adjusted p."""
    c = finding.comparison
    who = _student_label(c.student, c.method, many_students)
    setting = _Markdown().setting(finding.setting)
    who += "" if setting == "–" else f" ({setting})"
    where = _where(c.task, c.metric)
    r = c.result
    if r is None:
        # The reason (often a long error) is listed once under the task's Δ table, not in every sentence.
        task = task_title(c.task)
        return f"{who} vs SFT on {where}: not computed (see the n/a notes under the {task} Δ table)."
    interval = f"[{_signed(r.low)}, {_signed(r.high)}]"
    holm_text = "" if c.holm_p is None else f"Holm {_p_num(c.holm_p)}"
    if finding.direction:
        verb = "beats SFT" if finding.direction > 0 else "is worse than SFT"
        stats = _p_text(r.p_value) + (f" ({holm_text})" if holm_text else "")
        return f"{who} {verb} on {where} by {_signed(r.delta)} points {interval}, {stats}."
    # Significant before the correction but not after: say so, the interval alone would suggest otherwise.
    after = " after Holm correction" if r.p_value < ALPHA and c.holm_p is not None else ""
    stats = ", ".join(x for x in (_p_text(r.p_value), holm_text) if x)
    return (
        f"{who}: no significant difference from SFT on {where}{after} "
        f"(Δ {_signed(r.delta)} {interval}, {stats})."
    )


def _mean_cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{DECIMALS}f}" if len(values) == 1 else f"{mean:.{DECIMALS}f} ± {std:.{DECIMALS}f}"


def _signed(x: float) -> str:
    return f"{x:+.{DECIMALS}f}"


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={_p_num(p)}"


def _delta_cell(c: Comparison) -> str:
    if c.result is None:
        return "n/a"
    r = c.result
    return f"{_signed(r.delta)} [{_signed(r.low)}, {_signed(r.high)}], {_p_text(r.p_value)}"


class _Markdown:
    def bold(self, s: str) -> str:
        return f"**{s}**"

    def text(self, s: str) -> str:
        return s.replace("|", "\\|")

    def setting(self, parts: Sequence[SettingPart]) -> str:
        return ", ".join(f"{p.text}={p.value}" if p.text else p.value for p in parts) or "–"

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
        sep = ["---:" if a == "r" else "---" for a in align]
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"


class _Latex(_Markdown):
    def bold(self, s: str) -> str:
        return rf"\textbf{{{s}}}"

    def text(self, s: str) -> str:
        return tex_escape(s)

    def setting(self, parts: Sequence[SettingPart]) -> str:
        return ", ".join(f"{p.latex}={tex_escape(p.value)}" if p.latex else tex_escape(p.value)
                         for p in parts) or "--"

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
        lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
        for r in rows:
            if r and r[0] == "\\midrule":
                lines.append(r"\midrule")
            else:
                lines.append(" & ".join(r) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"


def _results_rows(s: TaskSummary, fmt: _Markdown) -> tuple[list[str], list[list[str]], str]:
    head = [fmt.text(h) for h in ("model", "method", "chosen setting")]
    head += [fmt.text(f"{LABELS.get(m, m)} (%)") for m in s.metrics] + [fmt.text("seeds")]
    best = {m: s.best(m) for m in s.metrics}
    rows: list[list[str]] = []
    for i, r in enumerate(s.rows):
        if isinstance(fmt, _Latex) and i > 0 and s.rows[i - 1].teacher and not r.teacher:
            rows.append(["\\midrule"])  # teachers above the rule, students below
        cells = []
        for m in s.metrics:
            text = fmt.text(_mean_cell(r.values.get(m, [])))
            values = r.values.get(m)
            if (
                not r.teacher
                and values
                and best[m] is not None
                and round(mean_std(values)[0], DECIMALS) == best[m]
            ):
                text = fmt.bold(text)
            cells.append(text)
        setting = fmt.text("–") if r.teacher else fmt.setting(r.setting)
        rows.append([fmt.text(r.model), fmt.text(r.method), setting, *cells, str(r.n)])
    return head, rows, "lll" + "r" * len(s.metrics) + "r"


def _delta_rows(s: TaskSummary, fmt: _Markdown) -> tuple[list[str], list[list[str]], str]:
    head = [fmt.text("student"), fmt.text("method"), fmt.text("seeds (method/SFT)")]
    compared = [m for m in s.metrics if any(c.metric == m for c in s.comparisons)]
    head += [fmt.text(f"{LABELS.get(m, m)} Δ vs SFT [95% CI], p") for m in compared]
    keyed: dict[tuple[str, str], dict[str, Comparison]] = {}
    for c in s.comparisons:
        keyed.setdefault((c.student, c.method), {})[c.metric] = c
    rows = []
    for (student, method), by_metric in keyed.items():
        first = next(iter(by_metric.values()))
        cells = [fmt.text(_delta_cell(by_metric[m])) if m in by_metric else "" for m in compared]
        rows.append([fmt.text(student), fmt.text(method), f"{first.seeds[0]}/{first.seeds[1]}", *cells])
    return head, rows, "lll" + "l" * len(compared)


def _task_title(s: TaskSummary) -> str:
    metrics = ", ".join(METRIC_NAMES.get(m, m) for m in s.metrics)
    n = f", {s.n_examples} evaluation examples" if s.n_examples is not None else ""
    return f"{task_title(s.task)} ({metrics} %{n})"


def _bootstrap_setup(comparisons: Sequence[Comparison], seed: int = BOOTSTRAP_SEED) -> tuple[int, int]:
    """(resamples, seed) of the comparisons' bootstrap (the defaults when none was computed)."""
    r = next((c.result for c in comparisons if c.result is not None), None)
    return (r.n_resamples, r.seed) if r is not None else (N_RESAMPLES, seed)


def _stats_caption(s: TaskSummary) -> str:
    examples = (
        "the evaluation examples" if s.n_examples is None else f"the {s.n_examples} evaluation examples"
    )
    resamples, seed = _bootstrap_setup(s.comparisons)
    return (
        f"Δ vs SFT of the same student: mean difference over {examples} (per-example scores averaged "
        f"over seeds), 95% percentile interval of a paired bootstrap ({resamples} resamples, seed "
        f"{seed}) and the two-sided p-value of the same bootstrap (the interval excludes 0 exactly when "
        f"p < {ALPHA:g}); p is not adjusted here, the findings give the Holm-adjusted p"
    )


def _findings_rows(findings: Sequence[Finding], fmt: _Markdown) -> tuple[list[str], list[list[str]], str]:
    head = [
        fmt.text(h)
        for h in (
            "task",
            "student",
            "method",
            "chosen setting",
            "metric",
            "Δ vs SFT [95% CI]",
            "p",
            "Holm p",
            "teacher − SFT",
            "gap recovered",
        )
    ]
    rows = []
    for f in findings:
        c, r = f.comparison, f.comparison.result
        delta = "n/a" if r is None else f"{_signed(r.delta)} [{_signed(r.low)}, {_signed(r.high)}]"
        gap = "–" if f.gap is None else _signed(f.gap)
        gap += "" if f.gap is None or f.teacher_label == "adapted" else f" ({f.teacher_label})"
        rows.append(
            [
                fmt.text(task_title(c.task)),
                fmt.text(c.student),
                fmt.text(c.method),
                fmt.setting(f.setting),
                fmt.text(METRIC_NAMES.get(c.metric, c.metric)),
                fmt.text(delta),
                fmt.text("–" if r is None else _p_num(r.p_value)),
                fmt.text("–" if c.holm_p is None else _p_num(c.holm_p)),
                fmt.text(gap),
                fmt.text("n/a" if f.recovered is None else f"{f.recovered:.0f}%"),
            ]
        )
    return head, rows, "lllll" + "l" + "rr" + "rr"


def _findings_note(findings: Sequence[Finding]) -> str:
    family: dict[str, int] = {}
    for f in findings:
        if f.comparison.result is not None:
            family[f.comparison.student] = family.get(f.comparison.student, 0) + 1
    if len(family) > 1:
        sizes = ", ".join(f"{n} for {student}" for student, n in family.items())
    else:
        sizes = f"{next(iter(family.values()), 0)} comparisons"
    resamples, seed = _bootstrap_setup([f.comparison for f in findings])
    return (
        "Each KD method's chosen setting against SFT of the same student on the evaluation split, in "
        "percentage points. Δ, 95% interval and p come from one paired bootstrap of the per-example scores "
        f"({resamples} resamples, seed {seed}; {SCORES_FILE}). Significant: Holm-adjusted p < {ALPHA:g}, "
        f"adjusted over all comparisons with SFT of a student, every task, method and metric ({sizes}). "
        "Teacher − SFT: the teacher's evaluation score (the adapted teacher, on the same evaluation "
        "examples) minus SFT's mean over seeds; gap recovered: Δ / (teacher − SFT), n/a when the teacher "
        "is not ahead of SFT."
    )


def _all_findings(summaries: Sequence[TaskSummary]) -> list[Finding]:
    return [f for s in summaries for f in s.findings]


def findings_markdown(summaries: Sequence[TaskSummary], *, level: int = 2) -> str:
    """The findings section: one sentence per KD method, task and metric, then the table of its numbers."""
    findings = _all_findings(summaries)
    if not findings:
        return ""
    many = len({f.comparison.student for f in findings}) > 1
    fmt = _Markdown()
    head, rows, align = _findings_rows(findings, fmt)
    lines = [f"{'#' * level} Findings", ""]
    lines += [f"- {finding_sentence(f, many_students=many)}" for f in findings]
    lines += ["", fmt.table(head, rows, align), _findings_note(findings), ""]
    return "\n".join(lines)


SUMMARY_NOTE = (
    "Evaluation split, percentages. Mean ± sample standard deviation (n−1) over seeds of each "
    "method's chosen setting (a single value for one seed); the seeds column counts them. The "
    "chosen setting is the grid point with the best selection-split metric. Bold: best student "
    "per column. "
)


def summary_markdown(summaries: Sequence[TaskSummary], *, level: int = 2) -> str:
    fmt = _Markdown()
    h = "#" * level
    findings = findings_markdown(summaries, level=level)
    parts = ([findings] if findings else []) + [SUMMARY_NOTE + "\n"]
    for s in summaries:
        parts.append(f"{h} {_task_title(s)}\n")
        head, rows, align = _results_rows(s, fmt)
        parts.append(fmt.table(head, rows, align))
        if s.comparisons:
            parts.append(f"{h}# {task_title(s.task)}: Δ vs SFT [95% CI], p\n")
            head, rows, align = _delta_rows(s, fmt)
            parts.append(fmt.table(head, rows, align))
            parts.append(_stats_caption(s) + ".\n")
            for note in dict.fromkeys(c.note for c in s.comparisons if c.note):
                parts.append(f"\n- n/a: {note}\n")
    return "\n".join(parts)


def summary_latex(summaries: Sequence[TaskSummary], study: str) -> str:
    fmt = _Latex()
    label = "".join(ch if ch.isalnum() else "-" for ch in study)
    parts = ["% kdlab study tables; needs \\usepackage{booktabs} in the preamble.\n"]
    findings = _all_findings(summaries)
    if findings:
        head, rows, align = _findings_rows(findings, fmt)
        caption = tex_escape("Findings. " + _findings_note(findings))
        parts.append(
            "\\begin{table*}[t]\n\\centering\n\\small\n"
            + fmt.table(head, rows, align)
            + f"\\caption{{{caption}}}\n\\label{{tab:{label}-findings}}\n\\end{{table*}}\n"
        )
    for s in summaries:
        head, rows, align = _results_rows(s, fmt)
        parts.append(
            "\\begin{table}[t]\n\\centering\n\\small\n"
            + fmt.table(head, rows, align)
            + f"\\caption{{{tex_escape(_task_title(s) + '. ' + SUMMARY_NOTE.strip())}}}\n"
            + f"\\label{{tab:{label}-{s.task}}}\n\\end{{table}}\n"
        )
        if s.comparisons:
            head, rows, align = _delta_rows(s, fmt)
            caption = tex_escape(f"{task_title(s.task)}: {_stats_caption(s)}.")
            parts.append(
                "\\begin{table}[t]\n\\centering\n\\small\n"
                + fmt.table(head, rows, align)
                + f"\\caption{{{caption}}}"
                + f"\n\\label{{tab:{label}-{s.task}-vs-sft}}\n\\end{{table}}\n"
            )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# figures


@dataclass
class FigureEntry:
    title: str
    caption: str
    paths: list[Path]


def _student_label(student: str, method: str, many_students: bool) -> str:
    return f"{student} {method}" if many_students else method


def _metric_axis(metric: str, split: str) -> str:
    return f"{split} {METRIC_NAMES.get(metric, metric)} (%)"


def _lambda_figures(
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
                v = _metric(g.first, "selection", metric) if g.first is not None else None
                if v is not None:
                    baselines[f"{_student_label(student, method, many)} (no λ)"] = v
                continue
            # One line per combination of the other grid axes (e.g. temperature), λ on the x axis.
            lines: dict[str, list[RunRecord]] = {}
            for r in g.candidates:
                if "lam" in r.params and _metric(r, "selection", metric) is not None:
                    other = {k: r.params.get(k) for k in g.varying if k != "lam"}
                    lines.setdefault(_key(other), []).append(r)
            for other_key, runs in lines.items():
                other = json.loads(other_key)
                label = _student_label(student, method, many)
                if other:
                    label += (
                        " ("
                        + ", ".join(
                            f"{_param_name(method, k)[0] or k}={_num(v)}" for k, v in other.items()
                        )
                        + ")"
                    )
                is_chosen = all(g.params.get(k) == v for k, v in other.items())
                series.append(
                    LambdaSeries(
                        label,
                        method,
                        [float(r.params["lam"]) for r in runs],
                        [float(_metric(r, "selection", metric) or 0.0) for r in runs],
                        chosen_lam=float(g.params["lam"]) if is_chosen and "lam" in g.params else None,
                        student_index=students.index(student),
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
            "λ; the ring marks the chosen setting, dashed lines are SFT (no KD term)."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries


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
            values = [v for r in g.runs if (v := _metric(r, "eval", metric)) is not None]
            return float(np.mean(values)) if values else None
        return _metric(run, "eval", metric) if run.done else None
    if entry.get("role") == "teacher" or (run is not None and run.kind == "teacher"):
        ids = [f"teacher-{task}-zero-shot"] if zero_shot else [f"teacher-{task}", f"teacher-{task}-zero-shot"]
        for rid in ids:
            r = outputs.get(rid)
            if r is not None and r.done:
                return _metric(r, "eval", metric)
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
        points.append(
            EfficiencyPoint(
                str(label),
                str(entry.get("role", "student")),
                str(entry.get("method", "")),
                value,
                float(entry["parameters"]),
                float(latency) if isinstance(latency, int | float) else None,
            )
        )
    return points


def _efficiency_figures(
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
            f"{device} (bench.json); stars are teachers, the dashed line the frontier."
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


def _training_figures(
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
            setting = _Markdown().setting(setting_parts(g))
            label = _student_label(student, method, many) + ("" if setting == "–" else f" ({setting})")
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


# ---------------------------------------------------------------------------------------------------------
# environment and report.md


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh (write) the index of the user's checkout.
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the kdlab checkout, or (None, None) when kdlab is not run from a
    git checkout (e.g. installed from a wheel: the enclosing repository would be someone else's)."""
    import kdlab

    src = Path(kdlab.__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", "__init__.py"], src) is None:
        return None, None
    commit = _git(["rev-parse", "HEAD"], src)
    status = _git(["status", "--porcelain", "--untracked-files=no"], src)
    return commit, (bool(status) if status is not None else None)


def _device(bench: Mapping[str, Any] | None) -> str:
    if bench and bench.get("device"):
        return f"{bench['device']} (from bench.json)"
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} (report machine)"
        if torch.backends.mps.is_available():
            return "mps (report machine)"
    except Exception:  # torch missing or broken: the report still gets written
        pass
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (report machine)"


def environment(bench: Mapping[str, Any] | None) -> dict[str, str]:
    commit, dirty = git_commit()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "kdlab": _version("kdlab")}
    env.update({p: _version(p) for p in ENV_PACKAGES})
    env["device"] = _device(bench)
    env["git commit"] = (
        "unknown (kdlab not run from a git checkout)"
        if commit is None
        else (commit + (" (with uncommitted changes)" if dirty else ""))
    )
    return env


NOT_RECORDED = "not recorded"


def _cell(value: Any) -> str:
    """A provenance value as one Markdown table cell."""
    if value is None:
        return "–"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return _Markdown().text(text.replace("\n", " ")) or "–"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return _mapping(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _data_manifest(outputs: StudyOutputs, task: str) -> dict[str, Any]:
    return _read_manifest(outputs.out / "data" / f"{task}.json")


def _cache_manifest(outputs: StudyOutputs, task: str) -> dict[str, Any]:
    config = outputs.config
    custom = config.cache.dir if config is not None else None
    root = Path(custom) if custom else outputs.out / "teacher_cache"
    return _read_manifest(root / task / "manifest.json")


def _answers_line(task: str, answers: Any) -> str | None:
    """One line on the teacher's empty answers in a cache manifest's ``answers`` entry, or None."""
    a = _mapping(answers)
    if not a:
        return None

    def count(key: str) -> int | None:
        v = a.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    total, empty = count("total"), count("empty")
    if empty is None:
        head = "teacher answers" + (f": {total}" if total is not None else "")
    else:
        head = f"{empty} of {total}" if total is not None else str(empty)
        head += " teacher answers were empty"
    done = [f"{n} {what}" for what in ("replaced", "dropped") if (n := count(what)) is not None]
    policy = f"policy `{a['policy']}`" if a.get("policy") is not None else ""
    tail = ": ".join(x for x in (policy, ", ".join(done)) if x)
    return f"- {task_title(task)}: {head}" + (f"; {tail}" if tail else "") + "."


def data_markdown(outputs: StudyOutputs) -> str:
    """## Data: train / selection / eval (and KD transfer-set) sizes per task from data/<task>.json, and what
    happened to empty teacher answers (teacher_cache/<task>/manifest.json); empty when neither exists."""
    fmt = _Markdown()
    sizes = [(t, m) for t in outputs.tasks if (m := _data_manifest(outputs, t))]
    transfer = any(isinstance(m.get("transfer"), list) for _, m in sizes)
    answers = [
        line
        for t in outputs.tasks
        if (line := _answers_line(t, _cache_manifest(outputs, t).get("answers"))) is not None
    ]
    if not sizes and not answers:
        return ""
    lines = ["## Data", ""]
    if sizes:
        splits = ["train", "selection", "eval"] + (["transfer"] if transfer else [])
        rows = []
        for task, m in sizes:
            cells = [str(len(m[k])) if isinstance(m.get(k), list) else "–" for k in splits]
            rows.append([fmt.text(task_title(task)), *cells])
        lines.append(
            "Examples per split (data/<task>.json; selection is held out of the training data"
            + ("; transfer: unlabelled training inputs used only by the KD losses" if transfer else "")
            + "):"
        )
        lines += ["", fmt.table(["task", *splits], rows, "l" + "r" * len(splits))]
    if answers:
        lines += ["Empty teacher answers in the teacher cache (teacher_cache/<task>/manifest.json):", ""]
        lines += answers + [""]
    return "\n".join(lines)


def reproducibility_markdown(outputs: StudyOutputs) -> str:
    """What reproducing the study needs beyond the package versions: device, dtypes, determinism, the seed of
    every stage, model and data fingerprints. From study.yaml, provenance.json (when the study wrote one:
    otherwise "not recorded") and the teacher caches' manifests."""
    fmt = _Markdown()
    prov = outputs.provenance
    config = outputs.config
    no_prov = f"{NOT_RECORDED} (no provenance.json)"
    no_config = f"{NOT_RECORDED} (no valid study.yaml)"
    settings: list[tuple[str, str]] = []
    settings.append(("device (study.yaml)", config.device if config is not None else no_config))
    if prov is not None and "device" in prov:
        settings.append(("device (provenance.json)", _cell(prov["device"])))
    if config is not None:
        settings += [
            ("evaluation dtype", config.evaluation.dtype),
            ("training bf16 autocast (students)", str(config.training.bf16)),
            ("teacher adaptation bf16 autocast", str(config.teacher.training.bf16)),
            ("teacher cache hidden dtype", config.cache.hidden_dtype),
        ]
    else:
        settings += [("dtypes", no_config)]
    if prov is None:
        deterministic = no_prov
    else:
        deterministic = _cell(prov["deterministic"]) if "deterministic" in prov else NOT_RECORDED
    settings.append(("deterministic", deterministic))
    seeds = _mapping(_mapping(prov).get("seeds"))
    seed = bootstrap_seed(outputs)
    settings.append(("bootstrap seed (report)", f"{seed} ({_seed_source(outputs, seed)})"))
    lines = ["### Reproducibility", "", "| | |", "| --- | --- |"]
    lines += [f"| {fmt.text(k)} | {fmt.text(v)} |" for k, v in settings]

    lines += ["", "Seeds of every stage:", ""]
    if seeds:
        rows = [[fmt.text(str(k)), _cell(v)] for k, v in seeds.items()]
        lines.append(fmt.table(["stage", "seed"], rows, "lr"))
    else:
        lines.append(f"- {no_prov if prov is None else NOT_RECORDED}.")
        if config is not None:
            lines.append(
                f"- study.yaml: training seeds {', '.join(str(s) for s in config.seeds)}; data seed "
                f"{config.data_seed}."
            )
        lines.append("")

    lines += ["Models:", ""]
    models = _mapping(_mapping(prov).get("models"))
    if models:
        keys = ["spec", "path", "revision", "fingerprint"]
        rows = []
        for name, entry in models.items():
            e = _mapping(entry)
            cells = [_cell(e.get(k)) for k in keys] if e else [_cell(entry), "", "", ""]
            rows.append([fmt.text(str(name)), *cells])
        lines.append(fmt.table(["model", *keys], rows, "lllll"))
    else:
        lines += [f"- {no_prov if prov is None else NOT_RECORDED}.", ""]

    lines += ["Data:", ""]
    data = _mapping(_mapping(prov).get("data"))
    if data:
        rows = []
        for task, entry in data.items():
            files = _mapping(_mapping(entry).get("files"))
            if files:
                rows += [[fmt.text(str(task)), _cell(path), _cell(digest)] for path, digest in files.items()]
            else:
                rows.append([fmt.text(str(task)), "–", _cell(entry)])
        lines.append(fmt.table(["task", "file", "sha256"], rows, "lll"))
    else:
        lines += [f"- {no_prov if prov is None else NOT_RECORDED}.", ""]

    caches = [(t, m) for t in outputs.tasks if (m := _cache_manifest(outputs, t)).get("fingerprint")]
    if caches:
        lines += ["Teacher caches (teacher_cache/<task>/manifest.json):", ""]
        rows = [
            [fmt.text(task_title(t)), *(_cell(m.get(k)) for k in ("fingerprint", "hidden_dtype"))]
            for t, m in caches
        ]
        lines.append(fmt.table(["task", "fingerprint", "hidden dtype"], rows, "lll"))

    shown = {"deterministic", "seeds", "models", "data", "device"}
    other = [[fmt.text(str(k)), _cell(v)] for k, v in _mapping(prov).items() if k not in shown]
    if other:
        lines += ["Other provenance.json entries:", "", fmt.table(["entry", "value"], other, "ll")]
    return "\n".join(lines)


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _bench_reference(models: Mapping[str, Any], task: str) -> Mapping[str, Any] | None:
    """The teacher a student of `task` is compared with: the adapted teacher of that task, else the base."""
    for e in models.values():
        if e.get("role") == "teacher" and e.get("task") == task:
            return e
    return next((e for e in models.values() if e.get("role") == "teacher" and e.get("task") is None), None)


def _bench_table(bench: Mapping[str, Any]) -> str:
    fmt = _Markdown()
    head = [
        "model",
        "role",
        "method",
        "task",
        "params (M)",
        "disk (MB)",
        "latency p50 / p95 (ms)",
        "examples/s",
        "tokens/s",
        "peak memory (MB)",
        "× teacher: params / latency / throughput",
    ]
    rows = []
    models = bench.get("models", {})
    for label, e in models.items():
        for task, t in (e.get("tasks") or {}).items():

            def num(key: str, scale: float = 1.0, src: Mapping[str, Any] = t) -> str:
                v = src.get(key)
                return f"{v / scale:.1f}" if isinstance(v, int | float) else "–"

            ref = _bench_reference(models, task)
            ratio = "–"
            if ref is not None and ref is not e and task in (ref.get("tasks") or {}):
                rt = ref["tasks"][task]

                def share(a: Any, b: Any) -> str:
                    return (
                        f"{a / b:.2f}"
                        if isinstance(a, int | float) and isinstance(b, int | float) and b
                        else "–"
                    )

                ratio = " / ".join(
                    [
                        share(e.get("parameters"), ref.get("parameters")),
                        share(t.get("latency_ms_p50"), rt.get("latency_ms_p50")),
                        share(t.get("examples_per_s"), rt.get("examples_per_s")),
                    ]
                )
            rows.append(
                [
                    fmt.text(str(label)),
                    str(e.get("role", "")),
                    str(e.get("method", "")),
                    task,
                    num("parameters", 1e6, e),
                    num("disk_bytes", 1e6, e),
                    f"{num('latency_ms_p50')} / {num('latency_ms_p95')}",
                    num("examples_per_s"),
                    num("tokens_per_s"),
                    num("peak_memory_bytes", 1e6),
                    ratio,
                ]
            )
    return fmt.table(head, rows, "llllrrrrrrr")


def report_markdown(
    outputs: StudyOutputs,
    summaries: Sequence[TaskSummary],
    figures: Sequence[FigureEntry],
    tables: Mapping[str, Path],
    env: Mapping[str, str],
    notes: Sequence[str],
    data_dir: str | Path | None,
) -> str:
    out = outputs.out
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# {outputs.name}: knowledge-distillation study report",
        "",
        f"Written {now} by kdlab {env.get('kdlab', '?')} from the output folder `{out}`.",
        "",
        "## Contents",
        "",
    ]
    lines += [f"- [{_rel(p, out)}]({_rel(p, out)}): {what}" for what, p in tables.items()]
    for f in figures:
        links = ", ".join(f"[{p.suffix[1:].upper()}]({_rel(p, out)})" for p in f.paths)
        lines.append(f"- {f.title}: {links}")
    counts: dict[str, int] = {}
    for r in outputs.runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines += [
        "",
        "## Runs",
        "",
        f"{len(outputs.runs)} runs in registry.sqlite: "
        + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
        + ".",
    ]
    unfinished = [r for r in outputs.runs if not r.done]
    if unfinished:
        lines += [
            "",
            "Not finished (left out of the tables): "
            + ", ".join(f"`{r.id}` ({r.status})" for r in unfinished[:20])
            + (", …" if len(unfinished) > 20 else ""),
        ]
    data = data_markdown(outputs)
    if data:
        lines += ["", data]
    lines += ["", "## Results", "", summary_markdown(summaries, level=3)]
    if outputs.selection:
        lines += ["## Chosen settings", ""]
        fmt = _Markdown()
        rows = [
            [fmt.text(k), f"`{v.get('run', '')}`", fmt.text(str(v.get("why", "")))]
            for k, v in outputs.selection.items()
            if isinstance(v, dict)
        ]
        lines += [
            fmt.table(["method-task-student", "chosen run", "why"], rows, "lll"),
            "Methods with a single grid point have no entry: their only setting is the chosen one.",
            "",
        ]
    if figures:
        lines += [
            "## Figures",
            "",
            f"Drawn at print size, {COLUMN_WIDTH_IN} in wide (one column) with 9-10 pt text; include "
            "them at that width. PNG at 300 dpi, PDF with embedded fonts.",
            "",
        ]
        for f in figures:
            png = next((p for p in f.paths if p.suffix == ".png"), f.paths[0])
            pdf = next((p for p in f.paths if p.suffix == ".pdf"), None)
            lines += [
                f"### {f.title}",
                "",
                f"![{f.title}]({_rel(png, out)})",
                "",
                f.caption + (f" [PDF]({_rel(pdf, out)})" if pdf else ""),
                "",
            ]
    lines += ["## Efficiency", ""]
    if outputs.bench is not None:
        lines += [
            f"From bench.json, measured on {outputs.bench.get('device', 'an unnamed device')}. The last "
            "column divides each model's figure by its teacher's on the same task (the adapted teacher "
            "of that task, else the base teacher).",
            "",
            _bench_table(outputs.bench),
        ]
    else:
        lines += [
            "No bench.json in the output folder: run `kdlab bench` on the study, then `kdlab report` "
            "again for latency, throughput and memory, and the efficiency figures.",
            "",
        ]
    compared = [c for su in summaries for c in su.comparisons]
    resamples, seed = _bootstrap_setup(compared, bootstrap_seed(outputs))
    scored = "; ".join(f"{task_title(t)}: {outputs.task(t).per_example_note}" for t in outputs.tasks)
    lines += [
        "## Statistics",
        "",
        "Δ vs SFT compares each method's chosen setting with SFT of the same student on the same "
        f"evaluation examples. Per-example scores ({scored}; all in {SCORES_FILE}) are averaged over each "
        "system's seeds first, so Δ asks "
        "whether the method, averaged over training seeds, beats SFT on this evaluation set; seed-to-seed "
        f"spread is the ± std of the results tables. Examples are resampled with replacement {resamples} "
        "times (paired: the same resample for both systems). The interval is the percentile interval of "
        "the resampled Δ (order statistics, no interpolation), and the two-sided p-value inverts it: "
        "p = 2 (1 + the number of resamples on the far side of 0) / (1 + resamples), so the interval "
        f"excludes 0 exactly when p < {ALPHA:g}. Deterministic (numpy seed {seed}, "
        f"{_seed_source(outputs, seed)}). The findings adjust p for multiple comparisons with Holm's "
        "method, per student over all its comparisons with SFT (every task, method and metric), and call "
        f"a difference significant when the adjusted p < {ALPHA:g}.",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    lines += ["## Environment", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", reproducibility_markdown(outputs)]
    config_name = "study.yaml" if outputs.config_text is not None else "STUDY.yaml"
    data_flag = f" --data-dir {data_dir}" if data_dir else " --data-dir DATA"
    lines += [
        "",
        "## Reproduce",
        "",
        "With the kdlab checkout at the commit above (`pip install -e .`) and the data folder "
        "(sst2/{train,validation}.tsv, squad/{train,dev}-v1.1.json):",
        "",
        "```bash",
        f"kdlab run {out / config_name} --out {out}{data_flag}",
        f"kdlab report {out}{data_flag}",
        "```",
        "",
    ]
    if outputs.config_text is not None:
        lines += ["## Study config (study.yaml)", "", "```yaml", outputs.config_text.rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# entry points


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_report(
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    echo: Echo | None = None,
    n_resamples: int = N_RESAMPLES,
) -> list[Path]:
    """Write results.csv, summary.md/.tex, figures/ and report.md from the study folder ``out_dir``.

    ``data_dir``: the data folder with the evaluation references (for the per-example statistics); default
    the study config's ``data_dir``, else $KDLAB_DATA_DIR, else the Hugging Face hub. Without references,
    Δ vs SFT is reported as n/a and everything else is still written. Returns the written paths.
    """
    echo = echo or log.info
    outputs = load_outputs(out_dir)
    out = outputs.out
    notes = list(outputs.notes)
    if data_dir is None and outputs.config is not None:
        data_dir = outputs.config.data_dir
    groups = chosen_groups(outputs)
    for g in groups.values():
        if g.source.startswith("best selection"):
            notes.append(f"{g.method}-{g.task}-{g.student}: not in selection.json; {g.source}")
    scorer = _Scorer(outputs, data_dir, notes)
    comparisons = compare_to_sft(
        outputs, groups, data_dir, n_resamples=n_resamples, notes=notes, scorer=scorer
    )
    summaries = build_summaries(outputs, groups, comparisons)
    _score_all(outputs, groups, scorer)

    header, rows = results_table(outputs, groups)
    tables = {
        "every run, one row each (metrics and params flattened)": _write_text(
            out / "results.csv", _csv_text(header, rows)
        ),
        "findings and results tables with Δ vs SFT (Markdown)": _write_text(
            out / "summary.md", f"# {outputs.name}: summary\n\n" + summary_markdown(summaries)
        ),
        "the same tables for LaTeX (booktabs)": _write_text(
            out / "summary.tex", summary_latex(summaries, outputs.name)
        ),
    }
    if scorer.scored:  # without references nothing was scored: no file rather than an empty one
        header, rows = per_example_rows(outputs, scorer)
        tables["per-example evaluation scores (x100) behind Δ, p and the interval"] = _write_text(
            out / SCORES_FILE, _csv_text(header, rows)
        )
    if (out / "selection.json").is_file():
        tables["chosen grid settings and their candidates"] = out / "selection.json"

    fig_dir = out / "figures"
    figures: list[FigureEntry] = []
    for make in (_lambda_figures, _efficiency_figures):
        figures += make(outputs, groups, fig_dir)
    figures += _training_figures(outputs, groups, fig_dir, notes)

    env = environment(outputs.bench)
    report = _write_text(
        out / "report.md", report_markdown(outputs, summaries, figures, tables, env, notes, data_dir)
    )
    for note in dict.fromkeys(notes):
        echo(f"[report] note: {note}")
    echo(summary_markdown(summaries))
    paths = [*tables.values(), *(p for f in figures for p in f.paths), report]
    return [p for p in paths if p.name != "selection.json"]


def write_results(study: Any) -> list[Path]:
    """The last stage of `kdlab run`: the report of ``study`` (anything with .out and .data_dir)."""
    return write_report(study.out, data_dir=study.data_dir)
