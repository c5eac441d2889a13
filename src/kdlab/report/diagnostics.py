"""The report's Diagnostics section, from files only: each chosen student's agreement with the teacher's
evaluation answers (prediction files), its KL(teacher ‖ student) on the gold answers and ECE (the run's
diagnostics.json, written by `kdlab.stages.diagnostics`), and each teacher cache's mass outside the top-k."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.report.collect import StudyOutputs, data_manifest, task_title
from kdlab.report.compare import student_label
from kdlab.selection import Group
from kdlab.stages.diagnostics import cache_tail_mass, read_diagnostics, teacher_agreement
from kdlab.stats import mean_std


@dataclass
class DiagnosticsRow:
    student: str
    method: str
    values: dict[str, list[float]] = field(default_factory=dict)  # agreement / kl / ece -> one per seed


def _teacher_predictions(outputs: StudyOutputs, task: str) -> Path | None:
    """The evaluation predictions of the teacher the students learned from (adapted, else zero-shot)."""
    t = outputs.task(task)
    layout = outputs.layout
    candidates = ((f"teacher-{task}", layout.teacher_eval(task)),
                  (f"teacher-{task}-zero-shot", layout.teacher_zero_shot(task)))
    for rid, folder in candidates:
        run = outputs.get(rid)
        path = folder / t.predictions_file("eval")
        if run is not None and run.done and path.is_file():
            return path
    return None


def diagnostics_rows(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], task: str, notes: list[str]
) -> list[DiagnosticsRow]:
    t = outputs.task(task)
    ids = [str(i) for i in data_manifest(outputs, task).get("eval", [])]
    teacher = _teacher_predictions(outputs, task)
    rows = []
    for (student, method, g_task), g in groups.items():
        if g_task != task:
            continue
        row = DiagnosticsRow(student, method)
        for run in g.runs:
            folder = outputs.run_dir(run)
            student_file = folder / t.predictions_file("eval")
            if teacher is not None and ids and student_file.is_file():
                try:
                    row.values.setdefault("agreement", []).append(
                        teacher_agreement(t, student_file, teacher, ids))
                except (ValueError, OSError) as e:
                    notes.append(f"{run.id}: agreement with the teacher not computed ({e})")
            diag = read_diagnostics(folder) or {}
            for key in ("kl_teacher_student", "ece"):
                v = diag.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    row.values.setdefault(key, []).append(float(v))
            if "error" in diag:
                notes.append(f"{run.id}: diagnostics not computed ({diag['error']})")
        rows.append(row)
    return rows


def cache_dir(outputs: StudyOutputs, task: str) -> Path:
    return outputs.layout.teacher_cache(task)


def tail_masses(outputs: StudyOutputs, notes: list[str]) -> dict[str, dict[str, Any]]:
    """Per task with a top-k cache: `stages.diagnostics.cache_tail_mass`."""
    out = {}
    for task in outputs.tasks:
        directory = cache_dir(outputs, task)
        if not (directory / "manifest.json").is_file():
            continue
        try:
            mass = cache_tail_mass(directory)
        except Exception as e:  # a damaged cache: the report still gets written
            notes.append(f"teacher_cache/{task}: tail mass not computed ({type(e).__name__}: {e})")
            continue
        if mass is not None:
            out[task] = mass
    return out


def _cell(values: list[float] | None, digits: int) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def diagnostics_markdown(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group], notes: list[str]
) -> str:
    """## Diagnostics (empty when there is nothing to show)."""
    from kdlab.report.render import Markdown

    fmt = Markdown()
    many = len({k[0] for k in groups}) > 1
    parts: list[str] = []
    for task in outputs.tasks:
        rows = diagnostics_rows(outputs, groups, task, notes)
        if not any(r.values for r in rows):
            continue
        classification = any("ece" in r.values for r in rows)
        head = ["model", "method", "seeds", "agreement with teacher (%)",
                "KL(teacher ‖ student) (nats/token)"]
        head += ["ECE (points)"] if classification else []
        body = []
        for r in rows:
            n = max((len(v) for v in r.values.values()), default=0)
            cells = [fmt.text(student_label(r.student, r.method, many) if many else r.student),
                     fmt.text(r.method), str(n), _cell(r.values.get("agreement"), 1),
                     _cell(r.values.get("kl_teacher_student"), 3)]
            cells += [_cell(r.values.get("ece"), 1)] if classification else []
            body.append(cells)
        parts += [f"### {task_title(task)}", "", fmt.table(head, body, "lll" + "r" * (len(head) - 3))]
    masses = tail_masses(outputs, notes)
    if masses:
        temps = sorted({t for m in masses.values() for t in m["mass"]}, key=float)
        head = ["task", "top-k", "answer tokens", *(f"mass outside top-k, T={t} (%)" for t in temps)]
        body = [[fmt.text(task_title(task)), str(m["top_k"]), str(m["tokens"]),
                 *(f"{100 * m['mass'][t]:.2f}" if t in m["mass"] else "–" for t in temps)]
                for task, m in masses.items()]
        parts += ["Teacher caches: the teacher's mean probability mass outside its top-k per answer token "
                  "(what the cached KD1 loss folds into one tail bucket), at T = 1 and at every temperature "
                  "the cache holds an exact tail for.", "",
                  fmt.table(head, body, "lrr" + "r" * len(temps))]
    if not parts:
        return ""
    intro = (
        "Each method's chosen setting on the evaluation split, mean ± std over seeds. Agreement: share of "
        "evaluation examples where the student's answer equals the teacher's (labels; generated answers "
        "after SQuAD normalization), from the prediction files. KL: mean over the gold answer tokens of "
        "KL(p_teacher ‖ q_student) at T = 1 over the full vocabulary. ECE: expected calibration error of the "
        "student's label probabilities (softmax over the labels' summed log-probs), 10 equal-width bins. "
        "Formulas in the README; KL and ECE from each run's diagnostics.json."
    )
    return "\n".join(["## Diagnostics", "", intro, "", *parts])
