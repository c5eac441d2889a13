"""Rendering: the findings, results and Δ tables as Markdown and LaTeX from one model, and report.md (runs,
data, results, chosen settings, figures, efficiency, statistics, environment, reproducibility)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.figures import (
    COLUMN_WIDTH_IN,
)
from kdlab.layout import STUDY_CONFIG
from kdlab.metrics import LONG_NAMES, SHORT_NAMES
from kdlab.report.collect import (
    BOOTSTRAP_SEED,
    StudyOutputs,
    as_mapping,
    bootstrap_seed,
    cache_manifest,
    data_manifest,
    run_metric,
    seed_source,
    task_title,
)
from kdlab.report.compare import (
    ALPHA,
    DECIMALS,
    N_RESAMPLES,
    SCORES_FILE,
    Comparison,
    Finding,
    SettingPart,
    TaskSummary,
    rate_text,
    setting_text,
    student_label,
)
from kdlab.report.costs import RunCost, group_cost
from kdlab.report.figures import FigureEntry
from kdlab.stats import mean_std, pareto_front

LABELS = SHORT_NAMES  # metric names in table headers
METRIC_NAMES = LONG_NAMES  # in sentences

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


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


def seed_caveat(comparison: Comparison) -> str:
    """The sentence a comparison that could not include seed variance carries (empty when it did)."""
    r = comparison.result
    if r is None or r.seed_aware:
        return ""
    n_method, n_sft = comparison.seeds
    plural = "s" * (n_method != 1)
    seeds = ("one training seed per system" if (n_method, n_sft) == (1, 1)
             else f"{n_method} training seed{plural} of {comparison.method} and {n_sft} of SFT")
    return (f"With {seeds}, this comparison covers test-set sampling only and cannot separate the method "
            "from the training seed.")


def finding_sentence(finding: Finding, *, many_students: bool = False) -> str:
    """What the method did, in one sentence from the numbers: beats SFT / is worse than SFT (Holm-adjusted
    p < 0.05, seed-aware) or no significant difference, with Δ, its 95% interval, p and the Holm-adjusted p.
    Without >= 2 seeds on both sides it never says "beats": it says the difference on these evaluation
    examples and that one seed cannot separate the method from the seed (`seed_caveat`)."""
    c = finding.comparison
    who = student_label(c.student, c.method, many_students)
    setting = Markdown().setting(finding.setting)
    who += "" if setting == "–" else f" ({setting})"
    where = _where(c.task, c.metric)
    r = c.result
    if r is None:
        # The reason (often a long error) is listed once under the task's Δ table, not in every sentence.
        task = task_title(c.task)
        return f"{who} vs SFT on {where}: not computed (see the n/a notes under the {task} Δ table)."
    interval = f"[{_signed(r.low)}, {_signed(r.high)}]"
    holm_text = "" if c.holm_p is None else f"Holm {_p_num(c.holm_p)}"
    caveat = seed_caveat(c)
    cost = f" {finding.cost_text}" if finding.cost_text else ""
    if finding.direction:
        stats = _p_text(r.p_value) + (f" ({holm_text})" if holm_text else "")
        if caveat:
            side = "above" if finding.direction > 0 else "below"
            return (f"{who} scores {side} SFT on {where} on these evaluation examples by {_signed(r.delta)} "
                    f"points {interval}, {stats}.{cost} {caveat}")
        verb = "beats SFT" if finding.direction > 0 else "is worse than SFT"
        return f"{who} {verb} on {where} by {_signed(r.delta)} points {interval}, {stats}.{cost}"
    # Significant before the correction but not after: say so, the interval alone would suggest otherwise.
    after = " after Holm correction" if r.p_value < ALPHA and c.holm_p is not None else ""
    stats = ", ".join(x for x in (_p_text(r.p_value), holm_text) if x)
    return (
        f"{who}: no significant difference from SFT on {where}{after} "
        f"(Δ {_signed(r.delta)} {interval}, {stats}).{cost}" + (f" {caveat}" if caveat else "")
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


class Markdown:
    def bold(self, s: str) -> str:
        return f"**{s}**"

    def text(self, s: str) -> str:
        return s.replace("|", "\\|")

    def setting(self, parts: Sequence[SettingPart]) -> str:
        return setting_text(parts)

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
        sep = ["---:" if a == "r" else "---" for a in align]
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"


class Latex(Markdown):
    def bold(self, s: str) -> str:
        return rf"\textbf{{{s}}}"

    def text(self, s: str) -> str:
        return tex_escape(s)

    def setting(self, parts: Sequence[SettingPart]) -> str:
        names = [tex_escape(p.text) if p.latex is None else p.latex for p in parts]
        return ", ".join(f"{n}={tex_escape(p.value)}" if n else tex_escape(p.value)
                         for n, p in zip(names, parts, strict=True)) or "--"

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
        lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
        for r in rows:
            if r and r[0] == "\\midrule":
                lines.append(r"\midrule")
            else:
                lines.append(" & ".join(r) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"


def _results_rows(s: TaskSummary, fmt: Markdown) -> tuple[list[str], list[list[str]], str]:
    head = [fmt.text(h) for h in ("model", "method", "chosen setting")]
    head += [fmt.text(f"{LABELS.get(m, m)} (%)") for m in s.metrics] + [fmt.text("seeds")]
    best = {m: s.best(m) for m in s.metrics}
    rows: list[list[str]] = []
    for i, r in enumerate(s.rows):
        if isinstance(fmt, Latex) and i > 0 and s.rows[i - 1].teacher and not r.teacher:
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


def _delta_rows(s: TaskSummary, fmt: Markdown) -> tuple[list[str], list[list[str]], str]:
    head = [fmt.text("student"), fmt.text("method"), fmt.text("seeds (method/SFT)"),
            fmt.text("interval covers")]
    compared = [m for m in s.metrics if any(c.metric == m for c in s.comparisons)]
    head += [fmt.text(f"{LABELS.get(m, m)} Δ vs SFT [95% CI], p") for m in compared]
    keyed: dict[tuple[str, str], dict[str, Comparison]] = {}
    for c in s.comparisons:
        keyed.setdefault((c.student, c.method), {})[c.metric] = c
    rows = []
    for (student, method), by_metric in keyed.items():
        first = next(iter(by_metric.values()))
        cells = [fmt.text(_delta_cell(by_metric[m])) if m in by_metric else "" for m in compared]
        computed = next((c.result for c in by_metric.values() if c.result is not None), None)
        covers = "–" if computed is None else _COVERS[computed.seed_aware]
        rows.append([fmt.text(student), fmt.text(method), f"{first.seeds[0]}/{first.seeds[1]}",
                     fmt.text(covers), *cells])
    return head, rows, "llll" + "l" * len(compared)


_COVERS = {True: "seeds + examples", False: "examples only"}


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
        f"Δ vs SFT of the same student: mean difference over {examples} and seeds; 95% interval and "
        f"two-sided p of one bootstrap ({resamples} resamples, seed {seed}); the interval excludes 0 exactly "
        f"when p < {ALPHA:g}. Seeds + examples: both systems have >= 2 seeds and the bootstrap includes "
        "training-seed variance (Student-t seed level, paired examples); examples only: a system has one "
        "seed, the interval covers test-set sampling only and cannot separate the method from the seed. "
        "p is not adjusted here, the findings give the Holm-adjusted p"
    )


def _findings_rows(findings: Sequence[Finding], fmt: Markdown) -> tuple[list[str], list[list[str]], str]:
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
            "seeds (method/SFT)",
            "method (mean ± std)",
            "SFT (mean ± std)",
            "s per run (method/SFT)",
            "Δ per extra hour",
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
                f"{len(f.method_values)}/{len(f.sft_values)}",
                fmt.text(_mean_cell(f.method_values)),
                fmt.text(_mean_cell(f.sft_values)),
                fmt.text(_cost_pair(f)),
                fmt.text("n/a" if (g := f.gain_per_cost("seconds")) is None else rate_text(g)),
            ]
        )
    return head, rows, "lllll" + "l" + "rr" + "rr" + "lrrrr"


def _cost_pair(f: Finding) -> str:
    a = f.method_cost.seconds if f.method_cost is not None else []
    b = f.sft_cost.seconds if f.sft_cost is not None else []
    return f"{np.mean(a):.0f} / {np.mean(b):.0f}" if a and b else "–"


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
        f"({resamples} resamples, seed {seed}; {SCORES_FILE}): with >= 2 seeds on both sides it includes "
        "training-seed variance; with one seed it covers test-set sampling only, and the sentence says "
        f"so instead of calling a winner. Significant: Holm-adjusted p < {ALPHA:g}, "
        f"adjusted over all comparisons with SFT of a student, every task, method and metric ({sizes}). "
        "Teacher − SFT: the teacher's evaluation score (the adapted teacher, on the same evaluation "
        "examples) minus SFT's mean over seeds; gap recovered: Δ / (teacher − SFT), n/a when the teacher "
        "is not ahead of SFT. Seconds per run: training plus the run's share of teacher adaptation and "
        "cache build, mean over the chosen setting's seeds (see the cost table); Δ per extra hour: Δ / "
        "(extra seconds per run over SFT / 3600), n/a when the method costs no more."
    )


def _all_findings(summaries: Sequence[TaskSummary]) -> list[Finding]:
    return [f for s in summaries for f in s.findings]


def findings_markdown(summaries: Sequence[TaskSummary], *, level: int = 2) -> str:
    """The findings section: one sentence per KD method, task and metric, then the table of its numbers."""
    findings = _all_findings(summaries)
    if not findings:
        return ""
    many = len({f.comparison.student for f in findings}) > 1
    fmt = Markdown()
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
    fmt = Markdown()
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
    fmt = Latex()
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



NOT_RECORDED = "not recorded"


def _cell(value: Any) -> str:
    """A provenance value as one Markdown table cell."""
    if value is None:
        return "–"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return Markdown().text(text.replace("\n", " ")) or "–"



def _answers_line(task: str, answers: Any) -> str | None:
    """One line on the teacher's empty answers in a cache manifest's ``answers`` entry, or None."""
    a = as_mapping(answers)
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
    fmt = Markdown()
    sizes = [(t, m) for t in outputs.tasks if (m := data_manifest(outputs, t))]
    transfer = any(isinstance(m.get("transfer"), list) for _, m in sizes)
    answers = [
        line
        for t in outputs.tasks
        if (line := _answers_line(t, cache_manifest(outputs, t).get("answers"))) is not None
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
    fmt = Markdown()
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
    seeds = as_mapping(as_mapping(prov).get("seeds"))
    seed = bootstrap_seed(outputs)
    settings.append(("bootstrap seed (report)", f"{seed} ({seed_source(outputs, seed)})"))
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
    models = as_mapping(as_mapping(prov).get("models"))
    if models:
        keys = ["spec", "path", "revision", "repo_id", "commit", "fingerprint", "tokenizer", "vocab_size"]
        rows = []
        for name, entry in models.items():
            e = as_mapping(entry)
            cells = [_cell(e.get(k)) for k in keys] if e else [_cell(entry)] + [""] * (len(keys) - 1)
            rows.append([fmt.text(str(name)), *cells])
        lines.append(fmt.table(["model", *keys], rows, "l" * (len(keys) + 1)))
    else:
        lines += [f"- {no_prov if prov is None else NOT_RECORDED}.", ""]

    lines += ["Data:", ""]
    data = as_mapping(as_mapping(prov).get("data"))
    if data:
        rows = []
        for task, entry in data.items():
            files = as_mapping(as_mapping(entry).get("files"))
            if files:
                rows += [[fmt.text(str(task)), _cell(path), _cell(digest)] for path, digest in files.items()]
            else:
                rows.append([fmt.text(str(task)), "–", _cell(entry)])
        lines.append(fmt.table(["task", "file", "sha256"], rows, "lll"))
    else:
        lines += [f"- {no_prov if prov is None else NOT_RECORDED}.", ""]

    caches = [(t, m) for t in outputs.tasks if (m := cache_manifest(outputs, t)).get("fingerprint")]
    if caches:
        lines += ["Teacher caches (teacher_cache/<task>/manifest.json):", ""]
        rows = [
            [fmt.text(task_title(t)), *(_cell(m.get(k)) for k in ("fingerprint", "hidden_dtype"))]
            for t, m in caches
        ]
        lines.append(fmt.table(["task", "fingerprint", "hidden dtype"], rows, "lll"))

    shown = {"deterministic", "seeds", "models", "data", "device"}
    other = [[fmt.text(str(k)), _cell(v)] for k, v in as_mapping(prov).items() if k not in shown]
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
    fmt = Markdown()
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
    extra_sections: Sequence[str] = (),
) -> str:
    """report.md; ``extra_sections`` (the cost and diagnostics sections) go after Efficiency."""
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
        fmt = Markdown()
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
    for section in extra_sections:
        if section:
            lines += [section, ""]
    compared = [c for su in summaries for c in su.comparisons]
    resamples, seed = _bootstrap_setup(compared, bootstrap_seed(outputs))
    scored = "; ".join(f"{task_title(t)}: {outputs.task(t).per_example_note}" for t in outputs.tasks)
    lines += [
        "## Statistics",
        "",
        "Δ vs SFT compares each method's chosen setting with SFT of the same student on the same "
        f"evaluation examples, averaged over examples and seeds (per-example scores: {scored}; all in "
        f"{SCORES_FILE}). When both systems have two or more seeds, the interval and p include training-seed "
        "variance as well as test-set sampling: a two-level paired bootstrap whose resampled Δ* = Δ + "
        "SE_seeds · t* + r · (the mean per-example difference over resampled examples − its mean), with "
        "SE_seeds² = s²_method / n_method + s²_SFT / n_SFT from the variances of the seeds' mean scores, "
        "t* a Student-t draw with Welch–Satterthwaite degrees of freedom, the examples resampled with "
        "replacement (the same resample for both systems), and r shrinking the example part so the "
        "seed × example noise the seed variances already hold is not counted twice "
        "(`kdlab.stats.seed_bootstrap`; its false-positive rate by simulation: bench/seed_calibration.py). "
        "With one seed on either side, "
        "only examples are resampled: the interval covers test-set sampling only and cannot separate the "
        f"method from the seed, and the findings say so instead of calling a winner. {resamples} "
        "resamples; the interval is the percentile interval of the resampled Δ (order statistics, no "
        "interpolation), and the two-sided p-value inverts it: "
        "p = 2 (1 + the number of resamples on the far side of 0) / (1 + resamples), so the interval "
        f"excludes 0 exactly when p < {ALPHA:g}. Deterministic (numpy seed {seed}, "
        f"{seed_source(outputs, seed)}). The findings adjust p for multiple comparisons with Holm's "
        "method, per student over all its comparisons with SFT (every task, method and metric), and call "
        f"a difference significant when the adjusted p < {ALPHA:g}.",
        "",
    ]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    lines += ["## Environment", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", reproducibility_markdown(outputs)]
    config_name = STUDY_CONFIG if outputs.config_text is not None else "STUDY.yaml"
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




def _fmt_flops(values: Sequence[float]) -> str:
    return f"{np.mean(values):.3g}" if values else "n/a"


def cost_markdown(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Any], costs: Mapping[str, RunCost]
) -> str:
    """## Cost: per task, each method's score against its cost per run (mean ± std over the chosen setting's
    seeds), the parts of that cost, its whole grid's seconds, and whether it is on the Pareto front."""
    if not costs:
        return ""
    fmt = Markdown()
    many = len({k[0] for k in groups}) > 1
    lines = [
        "## Cost",
        "",
        "Each method's chosen setting: its evaluation metric against its cost per run, mean ± std over "
        "seeds. Seconds per run = training (`train_runtime`; live-teacher passes and rollouts happen inside "
        "it) + the run's share of the teacher's adaptation (its training time over the runs that learn "
        "from the teacher) + its share of the cache build (the cache run's wall time over the runs that "
        "read it). FLOPs are estimated for training only (4N + 2N_trainable per token, plus 2N per live-"
        "teacher or rollout token; README); the teacher's adaptation and cache build count in seconds "
        "only. All runs: every grid point and seed of the method. Pareto: no other method of the task is "
        "both cheaper per run and better on average. Per-run costs are in results.csv (`cost_*`).",
        "",
    ]
    for task in outputs.tasks:
        metric = outputs.task(task).metric
        rows_data = []
        for (student, method, t), g in groups.items():
            if t != task:
                continue
            gc = group_cost(g, costs)
            values = [v for r in g.runs if (v := run_metric(r, "eval", metric)) is not None]
            parts = [costs[r.id] for r in g.runs if r.id in costs]
            rows_data.append((student, method, g, gc, values, parts))
        if not rows_data:
            continue
        means = [float(np.mean(r[3].seconds)) if r[3].seconds else float("nan") for r in rows_data]
        scores = [float(np.mean(r[4])) if r[4] else float("nan") for r in rows_data]
        front = set(pareto_front(means, scores))
        head = ["model", "method", "seeds", f"{LABELS.get(metric, metric)} (%)", "s per run",
                "training / teacher share / cache share (s)", "FLOPs per run", "all runs (s)", "Pareto"]
        # Methods that record where their training time went (live teacher, rollouts): shown when any does.
        inside = any(p.teacher_pass_s is not None or p.rollout_s is not None
                     for *_, ps in rows_data for p in ps)
        if inside:
            head.insert(6, "of training: live teacher / rollouts (s)")
        rows = []
        for i, (student, method, _, gc, values, parts) in enumerate(rows_data):
            split = " / ".join(
                f"{np.mean(xs):.1f}" if xs else "–"
                for xs in ([p.training_s for p in parts if p.training_s is not None],
                           [p.teacher_share_s for p in parts], [p.cache_share_s for p in parts])
            )
            row = [
                fmt.text(student_label(student, method, many) if many else student), fmt.text(method),
                str(len(values)), _mean_cell(values), _mean_cell(gc.seconds), split, _fmt_flops(gc.flops),
                f"{gc.grid_seconds:.0f}", "yes" if i in front else "",
            ]
            if inside:
                row.insert(6, " / ".join(
                    f"{np.mean(xs):.1f}" if xs else "–"
                    for xs in ([p.teacher_pass_s for p in parts if p.teacher_pass_s is not None],
                               [p.rollout_s for p in parts if p.rollout_s is not None])))
            rows.append(row)
        align = "lllrr" + "r" * (len(head) - 6) + "l"
        lines += [f"### {task_title(task)}", "", fmt.table(head, rows, align)]
    return "\n".join(lines)
