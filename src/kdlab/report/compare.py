"""Comparing: per-example scores of the evaluation predictions, the paired bootstrap of every KD method
against SFT (Holm-adjusted), the findings, and the numbers of the results tables."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdlab.layout import PER_EXAMPLE_SCORES
from kdlab.methods import METHODS, MixedSettings, baseline
from kdlab.registry import RunRecord
from kdlab.report.collect import StudyOutputs, bootstrap_seed, run_metric
from kdlab.report.costs import GroupCost, group_cost, run_costs
from kdlab.selection import Group
from kdlab.stats import BootstrapResult, compare_systems, holm, mean_std, significance_level
from kdlab.tasks import Example, Task, get_task

DECIMALS = 1
N_RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = significance_level(CONFIDENCE)  # findings call a difference significant when Holm-adjusted p < ALPHA
SCORES_FILE = PER_EXAMPLE_SCORES.name  # the name, for the report text
# The registry's eval metric and the mean of the per-example scores must agree to this many points (%).
CONSISTENCY_TOL = 0.01

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


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
    seeds: tuple[int, int] = (0, 0)  # (method, SFT) seeds behind the scores
    note: str = ""
    # Holm-adjusted p over every comparison with SFT of the same student (all tasks, methods, metrics).
    holm_p: float | None = None


class Scorer:
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
        manifest = self.outputs.layout.data_manifest(task)
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
        layout = self.outputs.layout  # inside the study folder, as run_dir
        zero_shot = run.id.endswith("-zero-shot")
        return layout.teacher_zero_shot(run.task) if zero_shot else layout.teacher_eval(run.task)

    def _score(self, run: RunRecord) -> dict[str, np.ndarray]:
        task, examples = self.references(run.task)
        path = self.predictions_dir(run) / task.predictions_file("eval")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        scores = task.per_example_scores(task.read_predictions(path), examples)
        for metric, values in scores.items():
            recorded = run_metric(run, "eval", metric)
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
    scorer: Scorer | None = None,
) -> list[Comparison]:
    """Every non-SFT method's chosen setting against SFT of the same student and task, per metric:
    `stats.compare_systems` on the per-example scores of every seed (seed-aware with >= 2 seeds on each side,
    else a paired bootstrap over examples only; see `kdlab.stats`), with p-values
    Holm-adjusted per student over all its comparisons. ``seed``: default `bootstrap_seed` (provenance.json,
    else the default); ``scorer``: to keep the per-example scores it computes (write_report writes them)."""
    notes = notes if notes is not None else []
    seed = bootstrap_seed(outputs) if seed is None else seed
    scorer = scorer if scorer is not None else Scorer(outputs, data_dir, notes)
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
            # Seed-aware (seeds + examples) when both have >= 2 seeds, else examples only (`kdlab.stats`).
            res = compare_systems(
                np.stack([s[m] for s in system]),
                np.stack([s[m] for s in reference]),
                n_resamples=n_resamples,
                confidence=CONFIDENCE,
                seed=seed,
            )
            out.append(Comparison(task, student, method, m, res, seeds))
    holm_per_student(out)
    return out


def holm_per_student(comparisons: Sequence[Any]) -> None:
    """Sets each comparison's `holm_p`: Holm's adjustment within one family per student, every method x task
    x metric compared with SFT (a study's "did KD help?"); comparisons without a result stay out of it."""
    for student in dict.fromkeys(c.student for c in comparisons):
        family = [c for c in comparisons if c.student == student and c.result is not None]
        for c, adjusted in zip(family, holm([c.result.p_value for c in family]), strict=True):
            c.holm_p = float(adjusted)


def score_all(outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], scorer: Scorer) -> None:
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


def per_example_rows(outputs: StudyOutputs, scorer: Scorer) -> tuple[list[str], list[dict[str, Any]]]:
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



def format_value(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def student_label(student: str, method: str, many_students: bool) -> str:
    return f"{student} {method}" if many_students else method


class SettingPart(NamedTuple):
    text: str  # the setting's name in tables ("": the value is shown alone)
    latex: str | None  # its name in LaTeX (None: the text, escaped)
    value: str


def param_name(method: str, param: str) -> tuple[str, str | None]:
    """How `method`'s settings label a param: (text, LaTeX) ("": the value alone; LaTeX None: the text)."""
    settings = METHODS[method].settings if method in METHODS else MixedSettings
    label = settings.label(param)
    return (param if label.text is None else label.text), label.latex


def setting_text(parts: Sequence[SettingPart]) -> str:
    """A setting as plain text ("λ=0.5, T=2, forward_kl"; "–" for none)."""
    return ", ".join(f"{p.text}={p.value}" if p.text else p.value for p in parts) or "–"


def setting_parts(group: Group) -> list[SettingPart]:
    """The chosen setting worth showing: what the method's settings always show (λ, T, divergence, ...),
    then any other grid axis that varied."""
    settings = METHODS[group.method].settings if group.method in METHODS else MixedSettings
    keys = [k for k, label in settings.labels.items() if label.in_tables and k in group.params]
    keys += [k for k in group.varying if k not in keys and k in group.params]
    return [SettingPart(*param_name(group.method, k), format_value(group.params[k])) for k in keys]


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
                values = {m: [v] for m in metrics if (v := run_metric(run, "eval", m)) is not None}
                rows.append(SummaryRow("teacher", label, [], values, teacher=True))
        for (student, method, t), g in groups.items():
            if t == task:
                values = {m: [v for r in g.runs if (v := run_metric(r, "eval", m)) is not None]
                          for m in metrics}
                rows.append(SummaryRow(student, method, setting_parts(g), values))
        n_examples = None
        manifest = outputs.layout.data_manifest(task)
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
    method_values: list[float] = field(default_factory=list)  # eval metric of each seed
    sft_values: list[float] = field(default_factory=list)
    method_cost: GroupCost | None = None  # seconds / FLOPs per run (report.costs)
    sft_cost: GroupCost | None = None

    def _extra(self, kind: str) -> tuple[float, float] | None:
        """(method, SFT) mean cost per run in seconds ("seconds") or FLOPs ("flops"), when both are known."""
        if self.method_cost is None or self.sft_cost is None:
            return None
        a, b = getattr(self.method_cost, kind), getattr(self.sft_cost, kind)
        return (float(np.mean(a)), float(np.mean(b))) if a and b else None

    def gain_per_cost(self, kind: str) -> float | None:
        """Δ per unit of extra cost over SFT per run: points per hour ("seconds") or per PFLOP ("flops");
        None when the cost is unknown or the method costs no more than SFT."""
        costs, delta = self._extra(kind), self.delta
        if costs is None or delta is None or costs[0] <= costs[1]:
            return None
        unit = 3600.0 if kind == "seconds" else 1e15
        return delta / ((costs[0] - costs[1]) / unit)

    @property
    def cost_text(self) -> str:
        """The cost beside the gain, for the finding's sentence ("" when unknown)."""
        costs = self._extra("seconds")
        if costs is None:
            return ""
        text = f"Cost per run {costs[0]:.0f} s against SFT's {costs[1]:.0f} s"
        per_hour, per_pflop = self.gain_per_cost("seconds"), self.gain_per_cost("flops")
        if per_hour is None:
            return text + " (no extra cost)."
        text += f": {rate_text(per_hour)} points per extra hour"
        return text + (f", {rate_text(per_pflop)} per extra PFLOP." if per_pflop is not None else ".")

    @property
    def seed_aware(self) -> bool:
        """Whether Δ's interval and p include training-seed variance (>= 2 seeds on both sides)."""
        r = self.comparison.result
        return r is not None and r.seed_aware

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


def rate_text(x: float) -> str:
    """A gain per unit of cost: 3 significant digits, without exponents for large values."""
    return f"{x:+,.0f}" if abs(x) >= 100 else f"{x:+.3g}"


def _teacher_reference(outputs: StudyOutputs, task: str) -> tuple[RunRecord | None, str]:
    """The teacher the students learned from: the adapted one of ``task``, else (no adaptation) the base."""
    for rid, label in ((f"teacher-{task}", "adapted"), (f"teacher-{task}-zero-shot", "zero-shot")):
        run = outputs.get(rid)
        if run is not None and run.done:
            return run, label
    return None, ""


def _seed_values(runs: Sequence[RunRecord], metric: str) -> list[float]:
    return [v for r in runs if (v := run_metric(r, "eval", metric)) is not None]


def _seed_mean(runs: Sequence[RunRecord], metric: str) -> float | None:
    values = _seed_values(runs, metric)
    return float(np.mean(values)) if values else None


def build_findings(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], comparisons: Sequence[Comparison]
) -> list[Finding]:
    """A `Finding` per comparison with SFT: the chosen setting, the means behind Δ and the teacher's score.
    The teacher's registry metric is on the same examples as the students' (data/<task>.json's eval ids)."""
    out = []
    costs = run_costs(outputs)
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
                run_metric(teacher, "eval", c.metric) if teacher is not None else None,
                label,
                _seed_values(group.runs, c.metric) if group is not None else [],
                _seed_values(base.runs, c.metric) if base is not None else [],
                group_cost(group, costs) if group is not None else None,
                group_cost(base, costs) if base is not None else None,
            )
        )
    return out


