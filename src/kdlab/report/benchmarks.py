"""The report's "General ability" section: what the teacher and each final student score on the lm-eval
benchmarks of `evaluation.benchmarks` (`kdlab.stages.benchmarks`), each KD method against SFT of the same
student by the task metrics' own procedure (`stats.compare_systems` on per-document scores: seed-aware with
>= 2 seeds a side, Holm-adjusted per student over its benchmark comparisons), and the retention of the base
teacher's scores. Values are in lm-eval's units (accuracy as a fraction), as lm-eval prints them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdlab.figures import RetentionPoint, retention_figure
from kdlab.methods import baseline
from kdlab.plan import BENCHMARK_METHOD
from kdlab.registry import RunRecord
from kdlab.report.collect import StudyOutputs, bootstrap_seed, run_metric, task_title
from kdlab.report.compare import CONFIDENCE, N_RESAMPLES, holm_per_student, student_label
from kdlab.report.figures import METRIC_NAMES, FigureEntry
from kdlab.report.render import Latex, Markdown, tex_escape
from kdlab.selection import Group
from kdlab.stages.benchmarks import BASE_TEACHER, student_init
from kdlab.stats import BootstrapResult, compare_systems, mean_std

DIGITS = 3  # lm-eval's fractions, as it prints them
GROUP_TOLERANCE = 1e-9  # a group's per-document mean must reproduce lm-eval's aggregate to be compared


@dataclass(frozen=True)
class Column:
    """One reported number: `metric` of lm-eval entry `entry` (the benchmark itself, or a subtask of a
    group lm-eval does not aggregate) of benchmark `benchmark`."""

    benchmark: str
    entry: str
    metric: str

    @property
    def label(self) -> str:
        return f"{self.entry} {self.metric}"


@dataclass
class Evaluations:
    """The finished benchmark runs of a study by (model key, benchmark), and the columns they report."""

    runs: dict[tuple[str, str], RunRecord]
    columns: list[Column]

    def value(self, model: str, column: Column) -> float | None:
        run = self.runs.get((model, column.benchmark))
        if run is None:
            return None
        value = (((run.metrics or {}).get("benchmarks") or {}).get(column.entry) or {}).get(column.metric)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def benchmark_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    return [r for r in runs if r.method == BENCHMARK_METHOD]


def collect_evaluations(outputs: StudyOutputs) -> Evaluations:
    """The finished benchmark runs, and their columns in the config's benchmark order: the benchmark's own
    entry when lm-eval reports one (a task, an aggregated group), else each of its subtasks."""
    runs = {(r.params.get("model"), r.params.get("benchmark")): r
            for r in benchmark_runs(outputs.runs) if r.done}
    settings = outputs.config.evaluation.benchmarks if outputs.config is not None else None
    # The config's benchmarks (one taken out of it is no longer reported), else whatever was evaluated.
    order = list(settings.tasks) if settings is not None else sorted({b for _, b in runs})
    columns: list[Column] = []
    for name in order:
        entries: dict[str, dict[str, None]] = {}
        for (_, benchmark), run in runs.items():
            if benchmark != name:
                continue
            metrics = (run.metrics or {}).get("benchmarks") or {}
            for entry in ([name] if name in metrics else sorted(metrics)):
                for metric in metrics.get(entry) or {}:
                    if not metric.endswith("_stderr"):
                        entries.setdefault(entry, {})[metric] = None
        columns += [Column(name, entry, metric) for entry, metrics in entries.items() for metric in metrics]
    return Evaluations(runs, columns)


def per_document_scores(outputs: StudyOutputs, run: RunRecord, column: Column) -> np.ndarray:
    """`column`'s per-document scores of a benchmark run (a group: its subtasks' documents in order);
    ValueError when there are none, or when their mean is not lm-eval's number (a group lm-eval aggregates
    otherwise than by document)."""
    path = outputs.layout.benchmark_scores(run.params["model"], column.benchmark)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    scores = json.loads(path.read_text()).get("scores") or {}
    tasks = [column.entry] if column.entry in scores else sorted(scores)
    values = [v for t in tasks for v in (scores.get(t) or {}).get(column.metric, [])]
    if not values:
        raise ValueError(f"no per-document {column.metric} scores in {path.name}")
    array = np.asarray(values, dtype=float)
    recorded = (((run.metrics or {}).get("benchmarks") or {}).get(column.entry) or {}).get(column.metric)
    if recorded is None or abs(float(array.mean()) - float(recorded)) > GROUP_TOLERANCE:
        raise ValueError(f"the per-document {column.metric} scores do not average to lm-eval's {recorded}")
    return array


@dataclass
class BenchmarkComparison:
    """One KD method against SFT (same student and task) on one benchmark column."""

    student: str
    method: str
    task: str
    column: Column
    result: BootstrapResult | None
    seeds: tuple[int, int]
    note: str = ""
    holm_p: float | None = None


@dataclass
class BenchmarkRow:
    model: str
    method: str
    values: dict[Column, list[float]]  # per column, one value per seed
    retention: list[float] = field(default_factory=list)  # per seed, % of the base teacher's scores
    teacher: bool = False


def retention(evaluations: Evaluations, model: str) -> float | None:
    """The mean over columns of `model`'s score as a share of the base teacher's, in %: what it kept of the
    base model's general ability (columns where the base teacher scores 0 are left out)."""
    shares = []
    for column in evaluations.columns:
        base, value = evaluations.value(BASE_TEACHER, column), evaluations.value(model, column)
        if base is not None and value is not None and base != 0:
            shares.append(100.0 * value / base)
    return float(np.mean(shares)) if shares else None


def compare_benchmarks_to_sft(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], evaluations: Evaluations,
    *, n_resamples: int = N_RESAMPLES, seed: int | None = None,
) -> list[BenchmarkComparison]:
    """Each non-SFT group against SFT of the same student and task on every benchmark column, with Holm's
    adjustment per student over all of them (a family apart from the task metrics')."""
    seed = bootstrap_seed(outputs) if seed is None else seed
    sft = baseline().name
    out: list[BenchmarkComparison] = []
    for (student, method, task), group in groups.items():
        base = groups.get((student, sft, task))
        if method == sft or base is None:
            continue
        for column in evaluations.columns:
            mine = [evaluations.runs.get((r.id, column.benchmark)) for r in group.runs]
            theirs = [evaluations.runs.get((r.id, column.benchmark)) for r in base.runs]
            mine, theirs = [r for r in mine if r is not None], [r for r in theirs if r is not None]
            seeds = (len(mine), len(theirs))
            try:
                if not mine or not theirs:
                    raise ValueError("not evaluated")
                system = np.stack([per_document_scores(outputs, r, column) for r in mine])
                reference = np.stack([per_document_scores(outputs, r, column) for r in theirs])
                if system.shape[1] != reference.shape[1]:
                    raise ValueError("evaluated on different documents")
            except ValueError as e:
                out.append(BenchmarkComparison(student, method, task, column, None, seeds, str(e)))
                continue
            result = compare_systems(system, reference, n_resamples=n_resamples, confidence=CONFIDENCE,
                                     seed=seed)
            out.append(BenchmarkComparison(student, method, task, column, result, seeds))
    holm_per_student(out)
    return out


def benchmark_rows(
    groups: Mapping[tuple[str, str, str], Group], evaluations: Evaluations, task: str
) -> list[BenchmarkRow]:
    """The base teacher, the teacher adapted to `task`, then per student its initial weights and each of its
    methods on `task`."""
    rows = []
    for model, label in ((BASE_TEACHER, "base (zero-shot)"), (f"teacher-{task}", "adapted")):
        values = {c: [v] for c in evaluations.columns if (v := evaluations.value(model, c)) is not None}
        if values:
            kept = retention(evaluations, model)
            rows.append(BenchmarkRow("teacher", label, values, [kept] if kept is not None else [], True))
    shown: set[str] = set()
    for (student, method, t), g in groups.items():
        if t != task:
            continue
        if student not in shown:  # what the student knew before training, first
            shown.add(student)
            values = {c: [v] for c in evaluations.columns
                      if (v := evaluations.value(student_init(student), c)) is not None}
            kept = retention(evaluations, student_init(student))
            if values:
                rows.append(BenchmarkRow(student, "initial", values, [kept] if kept is not None else []))
        values = {c: [v for r in g.runs if (v := evaluations.value(r.id, c)) is not None]
                  for c in evaluations.columns}
        kept_by_seed = [k for r in g.runs if (k := retention(evaluations, r.id)) is not None]
        if any(values.values()):
            rows.append(BenchmarkRow(student, method, values, kept_by_seed))
    return rows


def _mean_cell(values: Sequence[float], digits: int = DIGITS) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _delta_cell(c: BenchmarkComparison) -> str:
    if c.result is None:
        return f"n/a ({c.note})" if c.note else "n/a"
    r = c.result
    p = "p<0.001" if r.p_value < 0.001 else f"p={r.p_value:.3f}"
    holm_text = f", Holm {c.holm_p:.3f}" if c.holm_p is not None else ""
    return f"{r.delta:+.{DIGITS}f} [{r.low:+.{DIGITS}f}, {r.high:+.{DIGITS}f}], {p}{holm_text}"


def _tables(
    rows: Sequence[BenchmarkRow], comparisons: Sequence[BenchmarkComparison], columns: Sequence[Column],
    fmt: Markdown,
) -> list[tuple[list[str], list[list[str]], str]]:
    head = [fmt.text("model"), fmt.text("method"), *(fmt.text(c.label) for c in columns),
            fmt.text("retention (%)"), fmt.text("seeds")]
    body = []
    for i, r in enumerate(rows):
        if isinstance(fmt, Latex) and i > 0 and rows[i - 1].teacher and not r.teacher:
            body.append(["\\midrule"])
        n = max((len(v) for v in r.values.values()), default=0)
        body.append([fmt.text(r.model), fmt.text(r.method),
                     *(fmt.text(_mean_cell(r.values.get(c, []))) for c in columns),
                     fmt.text(_mean_cell(r.retention, 1)), str(n)])
    tables = [(head, body, "ll" + "r" * (len(columns) + 2))]
    if comparisons:
        keyed: dict[tuple[str, str], dict[Column, BenchmarkComparison]] = {}
        for c in comparisons:
            keyed.setdefault((c.student, c.method), {})[c.column] = c
        head = [fmt.text("student"), fmt.text("method"), fmt.text("seeds (method/SFT)"),
                fmt.text("interval covers"), *(fmt.text(f"{c.label} Δ vs SFT [95% CI], p") for c in columns)]
        body = []
        for (student, method), by_column in keyed.items():
            first = next(iter(by_column.values()))
            computed = next((c.result for c in by_column.values() if c.result is not None), None)
            covers = "–" if computed is None else ("seeds + examples" if computed.seed_aware
                                                    else "examples only")
            body.append([fmt.text(student), fmt.text(method), f"{first.seeds[0]}/{first.seeds[1]}",
                         fmt.text(covers),
                         *(fmt.text(_delta_cell(by_column[c])) if c in by_column else "" for c in columns)])
        tables.append((head, body, "llll" + "l" * len(columns)))
    return tables


NOTE = (
    "lm-evaluation-harness scores in its own units (accuracy as a fraction). Teacher rows: one evaluation "
    "(lm-eval's stderr is in results.csv); students: mean ± sample std over the seeds of the chosen setting. "
    "Retention: the mean over these columns of the model's score as a share of the base (zero-shot) "
    "teacher's, in %. Δ vs SFT of the same student: the task metrics' procedure on the per-document scores "
    "(seed-aware bootstrap with >= 2 seeds on both sides, else examples only), Holm-adjusted over every "
    "benchmark comparison of the student."
)


@dataclass
class GeneralAbility:
    """The section's model: per study task, its rows and comparisons."""

    evaluations: Evaluations
    rows: dict[str, list[BenchmarkRow]]
    comparisons: list[BenchmarkComparison]
    settings_text: str


def general_ability(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], *, n_resamples: int = N_RESAMPLES
) -> GeneralAbility | None:
    """None when the study has no finished benchmark run."""
    evaluations = collect_evaluations(outputs)
    if not evaluations.runs:
        return None
    comparisons = compare_benchmarks_to_sft(outputs, groups, evaluations, n_resamples=n_resamples)
    rows = {task: benchmark_rows(groups, evaluations, task) for task in outputs.tasks}
    settings = outputs.config.evaluation.benchmarks if outputs.config is not None else None
    text = ""
    if settings is not None:
        shots = "each task's default few-shot" if settings.num_fewshot is None else \
            f"{settings.num_fewshot}-shot"
        limit = f", the first {settings.limit} documents of each task" if settings.limit else ""
        text = f"{', '.join(settings.tasks)}; {shots}{limit}"
    return GeneralAbility(evaluations, rows, comparisons, text)


def general_ability_markdown(section: GeneralAbility | None, *, level: int = 2) -> str:
    if section is None:
        return ""
    lines = [f"{'#' * level} General ability (lm-evaluation-harness)", ""]
    if section.settings_text:
        lines += [f"Benchmarks: {section.settings_text}.", ""]
    for task, rows in section.rows.items():
        if not rows:
            continue
        comparisons = [c for c in section.comparisons if c.task == task]
        lines += [f"{'#' * (level + 1)} Students of {task_title(task)}", ""]
        for head, body, align in _tables(rows, comparisons, section.evaluations.columns, Markdown()):
            lines += [Markdown().table(head, body, align)]
    lines += [NOTE, ""]
    return "\n".join(lines)


def general_ability_latex(section: GeneralAbility | None, study: str) -> str:
    if section is None:
        return ""
    fmt = Latex()
    label = "".join(ch if ch.isalnum() else "-" for ch in study)
    parts = []
    for task, rows in section.rows.items():
        comparisons = [c for c in section.comparisons if c.task == task]
        for i, (head, body, align) in enumerate(_tables(rows, comparisons, section.evaluations.columns, fmt)):
            what = "General ability" if i == 0 else "General ability, Δ vs SFT"
            caption = tex_escape(f"{what}, students of {task_title(task)}. {NOTE}")
            parts.append("\\begin{table}[t]\n\\centering\n\\small\n" + fmt.table(head, body, align)
                         + f"\\caption{{{caption}}}\n\\label{{tab:{label}-{task}-general{i}}}\n"
                         + "\\end{table}\n")
    return "\n".join(parts)


def retention_points(
    outputs: StudyOutputs, section: GeneralAbility, groups: Mapping[tuple[str, str, str], Group], task: str
) -> list[RetentionPoint]:
    """Per (student, method) of `task`, seed by seed: the task's evaluation metric and the benchmark
    retention; and the adapted teacher's."""
    metric = outputs.task(task).metric
    many = len({g.student for g in groups.values()}) > 1
    points = []
    teacher = outputs.get(f"teacher-{task}")
    kept = retention(section.evaluations, f"teacher-{task}")
    if teacher is not None and (v := run_metric(teacher, "eval", metric)) is not None and kept is not None:
        points.append(RetentionPoint("teacher (adapted)", "teacher", [v], [kept]))
    for (student, method, t), g in groups.items():
        if t != task:
            continue
        pairs = [(v, k) for r in g.runs if (v := run_metric(r, "eval", metric)) is not None
                 and (k := retention(section.evaluations, r.id)) is not None]
        if pairs:
            points.append(RetentionPoint(student_label(student, method, many), method,
                                         [p[0] for p in pairs], [p[1] for p in pairs]))
    return points


def retention_figures(
    outputs: StudyOutputs, section: GeneralAbility | None, groups: Mapping[tuple[str, str, str], Group],
    fig_dir: Path,
) -> list[FigureEntry]:
    if section is None:
        return []
    entries = []
    for task in outputs.tasks:
        points = retention_points(outputs, section, groups, task)
        if not points:
            continue
        metric = outputs.task(task).metric
        title = f"{task_title(task)}: task score vs general ability kept"
        paths = retention_figure(
            fig_dir / f"retention_{task}", title=title,
            ylabel=f"eval {METRIC_NAMES.get(metric, metric)} (%)",
            xlabel="benchmark retention (% of the base teacher)", points=points,
        )
        caption = (
            f"Evaluation {METRIC_NAMES.get(metric, metric)} of each method's chosen setting against its "
            "benchmark retention: the mean over the General ability columns of its score as a share of the "
            "base teacher's. Small dots are seeds, large ones their mean with ±1 std bars."
        )
        entries.append(FigureEntry(title, caption, paths))
    return entries
