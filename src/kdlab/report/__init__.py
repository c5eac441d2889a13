"""The study report, written from the output folder alone (so `kdlab report OUT` works in a fresh process).

    results.csv   every run, one row each (flattened metrics and params; student runs' costs: report.costs)
    summary.md    findings first (per task and KD method: Δ vs SFT with its 95% interval, p and Holm-adjusted
                  p, seed-aware with >= 2 seeds per system and said to cover test-set sampling only with one,
                  the teacher-SFT gap and the share of it recovered, mean ± std and seeds of both systems,
                  the cost per run and Δ per extra hour, and a sentence saying what KD did);
                  then per task: teacher rows, each (student, method)'s chosen setting with mean ± std over
                  seeds, and Δ vs SFT with a paired-bootstrap 95% interval and p-value
    summary.tex   the same tables for LaTeX (booktabs)
    per_example_scores.csv  the per-example evaluation scores the statistics use (run, example, score), so
                  every Δ and p can be recomputed
    figures/      λ sensitivity, efficiency frontier (with bench.json), metric vs cost per run with the Pareto
                  front, training curves, task metric vs benchmark retention (`evaluation.benchmarks`); the
                  seeds' spread as bars or points; PNG and PDF
    report.md     links to all of it, the data sizes, the cost table, the teacher-student diagnostics
                  (report.diagnostics), the General ability tables (report.benchmarks: lm-eval benchmarks),
                  the environment and what reproducing the study needs
                  (versions, device, dtypes, determinism, seeds, fingerprints: provenance.json when the study
                  wrote one), the study config and how to reproduce it

Every file is written to a temporary name and moved into place, and report.md last, so a crash leaves either
the previous report or the new one, never half a file nor a report linking to missing figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab.files import atomic_write_text
from kdlab.report.benchmarks import (
    general_ability,
    general_ability_latex,
    general_ability_markdown,
    retention_figures,
)
from kdlab.report.collect import (
    StudyOutputs,
    bootstrap_seed,
    chosen_groups,
    csv_text,
    environment,
    load_outputs,
    results_table,
)
from kdlab.report.compare import (
    N_RESAMPLES,
    Comparison,
    Finding,
    Scorer,
    SettingPart,
    TaskSummary,
    build_findings,
    build_summaries,
    compare_to_sft,
    per_example_rows,
    score_all,
)
from kdlab.report.costs import add_cost_columns, run_costs
from kdlab.report.diagnostics import diagnostics_markdown
from kdlab.report.figures import (
    FigureEntry,
    cost_figures,
    efficiency_figures,
    lambda_figures,
    training_figures,
)
from kdlab.report.render import (
    cost_markdown,
    finding_sentence,
    report_markdown,
    summary_latex,
    summary_markdown,
    tex_escape,
)
from kdlab.selection import Group

__all__ = [
    "Comparison",
    "Finding",
    "Group",
    "SettingPart",
    "StudyOutputs",
    "TaskSummary",
    "bootstrap_seed",
    "build_findings",
    "chosen_groups",
    "compare_to_sft",
    "finding_sentence",
    "load_outputs",
    "results_table",
    "summary_markdown",
    "tex_escape",
    "write_report",
    "write_results",
]

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


def _write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
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
    layout = outputs.layout
    notes = list(outputs.notes)
    if data_dir is None and outputs.config is not None:
        data_dir = outputs.config.data_dir
    groups = chosen_groups(outputs)
    for g in groups.values():
        if g.source.startswith("best selection"):
            notes.append(f"{g.method}-{g.task}-{g.student}: not in selection.json; {g.source}")
    scorer = Scorer(outputs, data_dir, notes)
    comparisons = compare_to_sft(
        outputs, groups, data_dir, n_resamples=n_resamples, notes=notes, scorer=scorer
    )
    summaries = build_summaries(outputs, groups, comparisons)
    score_all(outputs, groups, scorer)
    general = general_ability(outputs, groups, n_resamples=n_resamples)  # None without benchmarks

    costs = run_costs(outputs)
    header, rows = results_table(outputs, groups)
    header = add_cost_columns(header, rows, costs)
    tables = {
        "every run, one row each (metrics and params flattened)": _write_text(
            layout.results, csv_text(header, rows)
        ),
        "findings and results tables with Δ vs SFT (Markdown)": _write_text(
            layout.summary_markdown, f"# {outputs.name}: summary\n\n" + summary_markdown(summaries)
            + general_ability_markdown(general)
        ),
        "the same tables for LaTeX (booktabs)": _write_text(
            layout.summary_latex, summary_latex(summaries, outputs.name)
            + general_ability_latex(general, outputs.name)
        ),
    }
    if scorer.scored:  # without references nothing was scored: no file rather than an empty one
        header, rows = per_example_rows(outputs, scorer)
        tables["per-example evaluation scores (x100) behind Δ, p and the interval"] = _write_text(
            layout.per_example_scores, csv_text(header, rows)
        )
    if layout.selection.is_file():
        tables["chosen grid settings and their candidates"] = layout.selection

    fig_dir = layout.figures
    figures: list[FigureEntry] = []
    for make in (lambda_figures, efficiency_figures):
        figures += make(outputs, groups, fig_dir)
    figures += cost_figures(outputs, groups, fig_dir, costs)
    figures += training_figures(outputs, groups, fig_dir, notes)
    figures += retention_figures(outputs, general, groups, fig_dir)

    env = environment(outputs.bench)
    report = _write_text(
        layout.report,
        report_markdown(outputs, summaries, figures, tables, env, notes, data_dir,
                        extra_sections=[cost_markdown(outputs, groups, costs),
                                        diagnostics_markdown(outputs, groups, notes),
                                        general_ability_markdown(general)]),
    )
    for note in dict.fromkeys(notes):
        echo(f"[report] note: {note}")
    echo(summary_markdown(summaries))
    paths = [*tables.values(), *(p for f in figures for p in f.paths), report]
    return [p for p in paths if p != layout.selection]


def write_results(study: Any) -> list[Path]:
    """The last stage of `kdlab run`: the report of ``study`` (anything with .out and .data_dir)."""
    return write_report(study.out, data_dir=study.data_dir)

