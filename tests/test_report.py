"""Tests for the study report (kdlab.report, kdlab.stats, kdlab.figures) on a fake study folder: no models."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_diagnostics import write_cache

from kdlab import report as report_mod
from kdlab.config import parse_config
from kdlab.figures import style_font_sizes
from kdlab.registry import Registry, RunSpec
from kdlab.report import (
    Comparison,
    Finding,
    SettingPart,
    TaskSummary,
    chosen_groups,
    compare_to_sft,
    finding_sentence,
    load_outputs,
    summary_markdown,
    tex_escape,
    write_report,
    write_results,
)
from kdlab.report import figures as report_figures
from kdlab.resolve import resolve_config
from kdlab.stats import (
    BootstrapResult,
    compare_systems,
    holm,
    interval_rank,
    mean_std,
    paired_bootstrap,
    pareto_front,
)
from kdlab.tasks import get_task

OWNER = "test-host:1"
KD1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 32}
# Correct eval answers per run (out of the 20 examples of each tiny eval split).
CORRECT = {
    "sft": {42: 8, 7: 9},
    "kd1-0.5": {42: 11},
    "kd1-1": {42: 18, 7: 19},
    "kd2": {42: 13},
    "teacher-zero-shot": 9,
    "teacher": 17,
}
N_RUNS = 4 + 2 * 8  # teachers + per task (cache, sft x2, kd1 x3, kd2, one failed kd2 seed)
# Seconds the registry records: each student run's train_runtime (+1 s on seed 7), the adapted teacher's
# train_runtime and the cache build's wall time; every student run trains on TRAIN_TOKENS tokens.
RUNTIME = {"sft": 3.0, "kd1": 6.0, "kd2": 4.0}
TEACHER_TRAIN_S, CACHE_WALL_S, TRAIN_TOKENS = 20.0, 30.0, 640


def _predictions(task: str, examples: list, n_correct: int) -> dict[str, Any]:
    """The first ``n_correct`` examples answered right, the rest wrong."""
    out: dict[str, Any] = {}
    for i, ex in enumerate(examples):
        if task == "sst2":
            out[ex.id] = ex.label if i < n_correct else 1 - ex.label
        else:
            out[ex.id] = ex.answers[0] if i < n_correct else "zzz qqq"
    return out


def _write_predictions(task_obj, folder: Path, predictions: dict[str, Any]) -> None:
    for split in ("eval", "selection"):
        task_obj.write_predictions(predictions, folder / task_obj.predictions_file(split))


def _diagnostics(task: str, n_correct: int) -> dict[str, Any]:
    """A run's diagnostics.json, values made up from its number of right answers (checked by hand)."""
    out: dict[str, Any] = {"split": "eval", "kl_teacher_student": 0.05 * (20 - n_correct), "kl_tokens": 40}
    if task == "sst2":
        out["ece"] = 30.0 - n_correct
    return out


def _log_history(kd: bool, scale: float) -> list[dict[str, Any]]:
    logs = []
    for step in (2, 4, 6, 8):
        entry = {"step": step, "epoch": step / 8, "learning_rate": 1e-4, "loss": scale / step + 0.5,
                 "loss_ce": scale / step}
        if kd:
            entry["loss_kd"] = 0.5 * scale / step
        logs.append(entry)
    logs.append({"step": 8, "train_runtime": 1.0, "train_loss": 1.0})  # the Trainer's closing entry
    return logs


def build_study(out: Path, data_dir: Path) -> dict[str, Any]:
    """A finished fake study: registry, predictions, manifests, selection.json, logs, bench.json, config."""
    config = resolve_config(parse_config({
        "name": "tiny_study", "output_dir": str(out), "data_dir": str(data_dir),
        "teacher": {"model": "tiny-teacher"},
        "students": [{"name": "s1", "derive": {"num_layers": 2}}],
        "tasks": {"sst2": {"selection_size": 4, "eval_size": 20},
                  "squad": {"selection_size": 4, "eval_size": 20}},
        "methods": {"sft": {}, "kd1": {"lambda": [0.5, 1.0]}, "kd2": {"lambda": 0.5}},
        "seeds": [42, 7],
    }))
    out.mkdir(parents=True)
    (out / "study.yaml").write_text(config.to_yaml())
    reg = Registry(out / "registry.sqlite")
    expected: dict[str, Any] = {"metrics": {}}

    def finish(spec: RunSpec, metrics: dict[str, Any], wall_time: float = 12.5) -> None:
        reg.add(spec)
        assert reg.claim(spec.id, OWNER)
        reg.finish(spec.id, metrics, wall_time, OWNER)
        expected["metrics"][spec.id] = metrics

    selection: dict[str, Any] = {}
    for task in ("sst2", "squad"):
        t = get_task(task, config.tasks[task])
        examples = t.load(t.eval_split, data_dir)[:20]
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / f"{task}.json").write_text(json.dumps({"task": task, "eval": [e.id for e in examples],
                                                               "train": [], "selection": []}))

        def score(n_correct: int, folder: Path, t=t, task=task, examples=examples) -> dict[str, Any]:
            preds = _predictions(task, examples, n_correct)
            _write_predictions(t, folder, preds)
            s = t.score(preds, examples)
            return {"selection": {**s, "n": 20}, "eval": {**s, "n": 20, "truncated": 0, "seconds": 1.0}}

        for name, rid in (("teacher-zero-shot", f"teacher-{task}-zero-shot"), ("teacher", f"teacher-{task}")):
            folder = out / "teacher" / (f"{task}-zero-shot" if "zero" in name else f"{task}-eval")
            finish(RunSpec(id=rid, kind="teacher", task=task, method="teacher", student="teacher",
                           stage="teacher", params={"adapted": "zero" not in name}, config_hash="h",
                           output_dir=str(out / "teacher" / task)),
                   score(CORRECT[name], folder)
                   | ({} if "zero" in name else {"train_runtime": TEACHER_TRAIN_S}))
        finish(RunSpec(id=f"cache-{task}", kind="teacher", task=task, method="cache", student="teacher",
                       stage="teacher", params={"fingerprint": "f"}, config_hash="f",
                       output_dir=str(out / "teacher_cache" / task)),
               {"cache": {"examples": 64}}, CACHE_WALL_S)

        def student(method: str, params: dict[str, Any], rid_mid: str, seed: int, n_correct: int | None,
                    task: str = task, score=score, t=t) -> str:
            rid = f"{method}-{task}-s1{rid_mid}-seed{seed}"
            folder = out / "runs" / rid
            spec = RunSpec(id=rid, kind="student", task=task, method=method, student="s1",
                           stage="grid" if seed == 42 else "final", params=params, seed=seed,
                           config_hash="h", output_dir=str(folder))
            if n_correct is None:  # a run that crashed
                reg.add(spec)
                assert reg.claim(rid, OWNER)
                reg.fail(rid, "Traceback ...\nRuntimeError: out of memory", OWNER)
                return rid
            metrics = score(n_correct, folder)
            # Selection metric differs from eval so the λ=1 choice is visible in the λ figure.
            metrics["selection"][t.metric] = metrics["eval"][t.metric] - 1.0
            metrics.update(train_runtime=RUNTIME[method] + (seed == 7), steps=8, train_examples=64,
                           trainable_parameters=1000, parameters=2000, train_tokens=TRAIN_TOKENS)
            logs = _log_history(method != "sft", 2.0 + seed / 100)
            (folder / "log_history.json").write_text(json.dumps(logs))
            (folder / "diagnostics.json").write_text(json.dumps(_diagnostics(task, n_correct)))
            finish(spec, metrics)
            return rid

        for seed, n in CORRECT["sft"].items():
            student("sft", {}, "", seed, n)
        lo = student("kd1", KD1, "-lam0.5", 42, CORRECT["kd1-0.5"][42])
        hi = student("kd1", {**KD1, "lam": 1.0}, "-lam1", 42, CORRECT["kd1-1"][42])
        student("kd1", {**KD1, "lam": 1.0}, "-lam1", 7, CORRECT["kd1-1"][7])
        kd2 = {"lam": 0.5}
        student("kd2", kd2, "-lam0.5", 42, CORRECT["kd2"][42])
        student("kd2", kd2, "-lam0.5", 7, None)
        metric = t.metric
        m = expected["metrics"]
        selection[f"kd1-{task}-s1"] = {
            "metric": f"selection {metric}", "chosen": {**KD1, "lam": 1.0}, "run": hi,
            "candidates": {lo: m[lo]["selection"][metric], hi: m[hi]["selection"][metric]},
            "why": f"highest selection-split {metric}",
        }
    (out / "selection.json").write_text(json.dumps(selection, indent=1))
    expected["tail_mass"] = write_cache(out / "teacher_cache" / "sst2", np.random.default_rng(3))
    perf = {"latency_ms_p50": 10.0, "latency_ms_p95": 12.0, "examples_per_s": 50.0, "tokens_per_s": 900.0,
            "peak_memory_bytes": 2_000_000}
    bench = {"device": "cpu: test", "models": {
        "teacher": {"role": "teacher", "run": "teacher-sst2", "method": "teacher", "task": None,
                    "parameters": 135_000_000, "trainable_parameters": 0, "disk_bytes": 270_000_000,
                    "tasks": {"sst2": perf, "squad": {**perf, "latency_ms_p50": 40.0}}},
        "s1 kd1 sst2": {"role": "student", "run": "kd1-sst2-s1-lam1-seed42", "method": "kd1", "task": "sst2",
                        "parameters": 60_000_000, "trainable_parameters": 60_000_000, "disk_bytes": 1,
                        "tasks": {"sst2": {**perf, "latency_ms_p50": 4.0}}},
        "s1 sft sst2": {"role": "student", "run": "sft-sst2-s1-seed42", "method": "sft", "task": "sst2",
                        "parameters": 60_000_000, "trainable_parameters": 60_000_000, "disk_bytes": 1,
                        "tasks": {"sst2": {**perf, "latency_ms_p50": 4.5}}},
    }}
    (out / "bench.json").write_text(json.dumps(bench))
    return expected


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("study") / "out"
    expected = build_study(out, tiny_data_dir)
    echoed: list[str] = []
    paths = write_report(out, echo=echoed.append)
    return SimpleNamespace(out=out, data_dir=tiny_data_dir, expected=expected, paths=paths, echoed=echoed)


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """Rows of the first markdown table after a heading line starting with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif seen:
            break
    return rows[2:]  # header and separator dropped


# ---------------------------------------------------------------------------------------------------------
# results.csv


def test_results_csv_has_one_row_per_run(study: SimpleNamespace) -> None:
    with (study.out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    runs = Registry(study.out / "registry.sqlite").runs()
    assert len(runs) == N_RUNS
    assert [r["run"] for r in rows] == [r.id for r in runs]
    for col in ("eval_accuracy", "eval_exact_match", "eval_f1", "selection_accuracy", "selection_f1",
                "param_lam", "param_temperature", "wall_time", "status", "chosen"):
        assert col in rows[0], col
    by_id = {r["run"]: r for r in rows}
    kd1 = by_id["kd1-squad-s1-lam1-seed7"]
    assert float(kd1["eval_f1"]) == pytest.approx(study.expected["metrics"][kd1["run"]]["eval"]["f1"])
    assert kd1["param_lam"] == "1.0" and kd1["chosen"] == "True" and kd1["status"] == "done"
    assert by_id["kd1-squad-s1-lam0.5-seed42"]["chosen"] == "False"
    failed = by_id["kd2-sst2-s1-lam0.5-seed7"]
    assert failed["status"] == "failed" and failed["eval_accuracy"] == ""
    assert "out of memory" in failed["error"]


# ---------------------------------------------------------------------------------------------------------
# summary tables


def test_summary_md_mean_std_and_bold(study: SimpleNamespace) -> None:
    text = (study.out / "summary.md").read_text()
    m = study.expected["metrics"]
    sst2 = _table_rows(text, "## SST-2")
    by = {(r[0], r[1]): r for r in sst2}
    assert by[("teacher", "zero-shot")][3] == _cell([m["teacher-sst2-zero-shot"]["eval"]["accuracy"]])
    assert by[("teacher", "adapted")][3] == _cell([m["teacher-sst2"]["eval"]["accuracy"]])
    sft = [m[f"sft-sst2-s1-seed{s}"]["eval"]["accuracy"] for s in (42, 7)]
    kd1 = [m[f"kd1-sst2-s1-lam1-seed{s}"]["eval"]["accuracy"] for s in (42, 7)]
    assert by[("s1", "sft")][3] == _cell(sft) and by[("s1", "sft")][-1] == "2"
    assert by[("s1", "kd1")][3] == f"**{_cell(kd1)}**"  # the best student, bold
    assert by[("s1", "kd1")][2] == "λ=1, T=2, forward_kl"
    assert by[("s1", "kd2")][3] == _cell([m["kd2-sst2-s1-lam0.5-seed42"]["eval"]["accuracy"]])
    assert by[("s1", "kd2")][-1] == "1"  # the failed seed is not counted
    assert "**" not in " ".join(by[("teacher", "adapted")])  # teachers are never bold
    squad = {(r[0], r[1]): r for r in _table_rows(text, "## SQuAD")}
    for col, metric in ((3, "exact_match"), (4, "f1")):
        values = [m[f"kd1-squad-s1-lam1-seed{s}"]["eval"][metric] for s in (42, 7)]
        assert squad[("s1", "kd1")][col] == f"**{_cell(values)}**"
    # Δ vs SFT table: kd1 is clearly better than SFT on SST-2, with 2 seeds each: seed-aware.
    delta = {(r[0], r[1]): r for r in _table_rows(text, "### SST-2: Δ vs SFT")}
    assert delta[("s1", "kd1")][3] == "seeds + examples" and delta[("s1", "kd2")][3] == "examples only"
    cell = delta[("s1", "kd1")][4]
    d, lo, hi = (float(x) for x in re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cell).groups())
    assert d == pytest.approx(statistics.fmean(kd1) - statistics.fmean(sft), abs=0.05)
    assert lo > 0 and hi >= d
    assert "p<0.001" in cell or float(cell.split("p=")[1]) < 0.05
    assert delta[("s1", "kd1")][2] == "2/2"


def test_summary_tex_booktabs_and_escaping(study: SimpleNamespace) -> None:
    tex = (study.out / "summary.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    # findings (one table for the study) + results and Δ per task
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 5
    assert r"\begin{table*}" in tex and "tab:tiny-study-findings" in tex
    assert r"forward\_kl" in tex
    assert re.search(r"(?<!\\)_", tex.replace(r"\_", "")) is None  # no unescaped underscore anywhere
    assert r"$\pm$" in tex and r"\textbf{" in tex and r"$\lambda$=1" in tex
    assert re.search(r"(?<!\\)%(?! kdlab)", tex.split("\n", 1)[1]) is None  # % only escaped after line 1


def test_tex_escape_specials() -> None:
    assert tex_escape("a_b & 50% #1 $x {y} ~^\\") == (
        r"a\_b \& 50\% \#1 \$x \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}")
    assert tex_escape("72.0 ± 1.0") == r"72.0 $\pm$ 1.0"


# ---------------------------------------------------------------------------------------------------------
# statistics


def test_bootstrap_identical_systems() -> None:
    scores = np.random.default_rng(1).integers(0, 2, 200) * 100.0
    r = paired_bootstrap(scores, scores.copy())
    assert r.delta == 0.0 and r.low == 0.0 and r.high == 0.0
    assert r.p_value == pytest.approx(1.0)
    assert r.n_resamples == 10_000 and r.n_examples == 200


def test_bootstrap_clearly_different_systems() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(300) < 0.5) * 100.0
    better = np.where(rng.random(300) < 0.6, 100.0, base)  # fixes most errors, breaks nothing
    r = paired_bootstrap(better, base, n_resamples=2000, seed=3)
    assert r.delta == pytest.approx(better.mean() - base.mean())
    assert r.p_value < 0.05 and r.low > 0 and r.low <= r.delta <= r.high and r.significant
    worse = paired_bootstrap(base, better, n_resamples=2000, seed=3)
    assert worse.high < 0 and worse.delta == pytest.approx(-r.delta)


def test_bootstrap_no_difference_is_not_significant() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(50, 10, 400), rng.normal(50, 10, 400)
    r = paired_bootstrap(a, b, n_resamples=2000)
    assert r.low < 0 < r.high or r.p_value > 0.01


def test_bootstrap_is_deterministic_given_the_seed() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random(150) * 100, rng.random(150) * 100
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


def test_bootstrap_averages_seeds_first() -> None:
    system = np.array([[100.0, 0.0, 100.0], [100.0, 100.0, 0.0]])  # two seeds, three examples
    base = np.array([0.0, 0.0, 0.0])
    r = paired_bootstrap(system, base, n_resamples=500)
    assert r.delta == pytest.approx(np.mean([100.0, 50.0, 50.0]))
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def _random_paired_scores(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paired per-example scores of many shapes: 0/100 correctness, few-valued F1-like, continuous; one seed
    or several; systems from identical to clearly apart, so ties at 0 and both outcomes occur."""
    n = int(rng.integers(1, 60))
    kind = rng.integers(0, 3)
    shift = rng.choice([0.0, 0.1, 0.3, 0.6])

    def draw(p: float) -> np.ndarray:
        if kind == 0:
            return (rng.random(n) < p) * 100.0
        if kind == 1:
            return rng.choice([0.0, 100 / 3, 50.0, 200 / 3, 100.0], size=n, p=[0.4 - p / 4, 0.15, 0.15, 0.15,
                                                                                0.15 + p / 4])
        return np.clip(rng.normal(100 * p, 20, n), 0, 100)

    base = draw(0.5)
    if rng.random() < 0.1:
        return base.copy(), base  # identical systems
    system = np.where(rng.random(n) < shift, draw(0.95), base)  # changes some examples only: paired
    if rng.random() < 0.3:  # (seeds, examples)
        system = np.stack([system, np.where(rng.random(n) < 0.2, draw(0.5), system)])
    return system, base


def test_bootstrap_interval_excludes_zero_iff_p_below_alpha() -> None:
    # The property the report relies on: the printed interval and p never disagree (they once showed
    # "[-2.4, -0.2], p=0.052"), over 600 random paired score vectors and B values.
    rng = np.random.default_rng(20)
    outcomes = {True: 0, False: 0}
    for case in range(600):
        confidence = [0.95, 0.9, 0.99][case % 3]
        resamples = int(rng.choice([40, 41, 79, 199, 200, 999, 1000, 1999]))
        if confidence == 0.99:
            resamples = max(resamples, 199) + 1
        system, base = _random_paired_scores(rng)
        r = paired_bootstrap(system, base, n_resamples=resamples, confidence=confidence, seed=case)
        excludes = r.low > 0.0 or r.high < 0.0
        below = r.p_value < round(1.0 - confidence, 12)  # alpha, not the float 0.05000000000000004
        assert excludes == below == r.significant, (case, r)
        assert r.low <= r.high and 0.0 < r.p_value <= 1.0
        outcomes[excludes] += 1
    assert min(outcomes.values()) > 100, outcomes  # both outcomes well exercised


@pytest.mark.parametrize("far", [0, 22, 23, 24, 25, 500])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bootstrap_agreement_at_the_boundary(far: int, sign: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # B = 999: p = 2 (far + 1) / 1000 equals alpha = 0.05 at far = 24 (not significant), is below it at 23.
    # Resampled Δ* are faked to put exactly ``far`` of them at or beyond 0 (half of them exactly 0).
    from kdlab import stats

    fake = np.concatenate([np.linspace(-3.0, -1.0, far - far // 2), np.zeros(far // 2),
                           np.linspace(1.0, 5.0, 999 - far)]) * sign
    monkeypatch.setattr(stats, "bootstrap_mean_differences", lambda *a, **k: fake.copy())
    r = paired_bootstrap(np.ones(10) * sign, np.zeros(10), n_resamples=999)
    at_or_below, at_or_above = far, 999 - far + far // 2
    assert r.p_value == pytest.approx(min(1.0, 2 * (min(at_or_below, at_or_above) + 1) / 1000))
    assert r.significant == (far <= 23) == (r.p_value < 0.05)


def test_bootstrap_interval_rank() -> None:
    # j-th order statistic from each end: p = 2 (m + 1) / (B + 1) < alpha exactly for m < j.
    assert interval_rank(10_000, 0.95) == 250  # 2 * 250 / 10001 < 0.05 <= 2 * 251 / 10001
    assert interval_rank(999, 0.95) == 24  # 2 * 25 / 1000 == 0.05 is not below 0.05
    assert interval_rank(40, 0.95) == 1
    with pytest.raises(ValueError, match="use >= 40"):
        interval_rank(39, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        interval_rank(1000, 1.0)


def test_bootstrap_p_is_the_share_beyond_zero() -> None:
    # Every resample of [+100, 0 x 19] that misses the one +100 example has Δ* = 0: a tie on both sides.
    system, base = np.zeros(20), np.zeros(20)
    system[0] = 100.0
    r = paired_bootstrap(system, base, n_resamples=999, seed=1)
    assert r.delta == pytest.approx(5.0)
    # No resample is below 0, so #(Δ* <= 0) = #(Δ* == 0), about (19/20)^20 = 36% of them, decides p.
    assert 0.55 < r.p_value < 0.9 and r.low == 0.0 and not r.significant


def test_holm_hand_computed() -> None:
    # m = 4, sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.5, 0.9]) == pytest.approx([0.6, 1.0, 1.0])  # capped at 1
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])  # ties
    assert holm([0.3]) == pytest.approx([0.3]) and holm([]).size == 0
    for bad in ([0.1, float("nan")], [1.5], [-0.1]):
        with pytest.raises(ValueError):
            holm(bad)


def test_holm_matches_the_step_down_procedure() -> None:
    # Independent check: adjusted p < alpha exactly for the hypotheses Holm's step-down test rejects at alpha
    # (reject the i-th smallest while p_(i) < alpha / (m - i + 1)); adjusted p >= p, <= 1, order kept.
    rng = np.random.default_rng(3)
    for _ in range(300):
        m = int(rng.integers(1, 12))
        p = rng.random(m) ** rng.choice([1, 3, 6])  # many small p-values too
        adjusted = holm(p)
        assert np.all(adjusted >= p - 1e-12) and np.all(adjusted <= 1.0)
        for i in range(m):
            for j in range(m):
                if p[i] <= p[j]:
                    assert adjusted[i] <= adjusted[j] + 1e-12
        for alpha in (0.01, 0.05, 0.1, 0.3):
            rejected = np.zeros(m, dtype=bool)
            for step, idx in enumerate(np.argsort(p, kind="stable")):
                if p[idx] * (m - step) >= alpha:
                    break
                rejected[idx] = True
            assert np.array_equal(adjusted < alpha, rejected), (p, alpha)


def test_mean_std_and_pareto() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    # (cost, value): the 2nd is dominated by the 1st, the 4th by the 3rd.
    assert pareto_front([1, 2, 3, 4, 5], [50, 40, 70, 60, 80]) == [0, 2, 4]


def test_per_example_scores_match_the_task_metrics(tiny_data_dir: Path) -> None:
    for task in ("sst2", "squad"):
        t = get_task(task)
        examples = t.load(t.eval_split, tiny_data_dir)
        preds = _predictions(task, examples, 7)
        if task == "squad":  # an alternative gold answer and a partial answer count as in the official script
            preds[examples[7].id] = examples[7].answers[1]
            preds[examples[8].id] = examples[8].answers[0].split()[-1]
        scores = t.per_example_scores(preds, examples)
        assert set(scores) == set(t.paired_metrics)
        for metric, value in t.score(preds, examples).items():
            if metric in t.paired_metrics:
                assert scores[metric].mean() == pytest.approx(value)


# ---------------------------------------------------------------------------------------------------------
# figures and report.md


def test_figures_exist_and_are_valid(study: SimpleNamespace) -> None:
    fig_dir = study.out / "figures"
    kinds, tasks = ("lambda", "efficiency", "training"), ("sst2", "squad")
    expected = [f"{kind}_{task}" for kind in kinds for task in tasks]
    for stem in expected:
        png, pdf = fig_dir / f"{stem}.png", fig_dir / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert pdf.read_bytes()[:5] == b"%PDF-", stem
        assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000
    assert min(style_font_sizes()) >= 9
    leftovers = [p for p in study.out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_report_md_links_every_figure_and_table(study: SimpleNamespace) -> None:
    text = (study.out / "report.md").read_text()
    links = set(re.findall(r"\]\(([^)]+)\)", text))
    for path in study.paths:
        if path.name != "report.md":
            assert path.relative_to(study.out).as_posix() in links, path
    for link in links:
        assert (study.out / link).is_file(), link
    assert {"summary.md", "summary.tex", "results.csv", "selection.json"} <= links
    assert "```yaml" in text and "name: tiny_study" in text  # the study config, embedded
    for key in ("| python |", "| torch |", "| transformers |", "| peft |", "| git commit |",
                "| device | cpu: test (from bench.json)"):
        assert key in text, key
    assert "kdlab report" in text and "kdlab run" in text
    assert "Not finished" in text and "kd2-sst2-s1-lam0.5-seed7" in text
    assert any("SST-2" in line for line in study.echoed)


def test_report_paths_returned(study: SimpleNamespace) -> None:
    names = {p.name for p in study.paths}
    assert {"results.csv", "summary.md", "summary.tex", "report.md", "lambda_sst2.png",
            "training_squad.pdf"} <= names
    assert all(p.is_file() for p in study.paths)


def test_missing_bench_and_missing_references_do_not_crash(study: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study.out, out, ignore=shutil.ignore_patterns("figures", "report.md", "summary.*"))
    (out / "bench.json").unlink()
    empty = tmp_path / "no-data"
    empty.mkdir()
    echoed: list[str] = []
    paths = write_report(out, data_dir=empty, echo=echoed.append)
    assert not list((out / "figures").glob("efficiency_*"))
    assert (out / "figures" / "lambda_sst2.png").is_file()
    text = (out / "report.md").read_text()
    assert "No bench.json" in text and "n/a" in (out / "summary.md").read_text()
    assert "(report machine)" in text
    assert all(p.is_file() for p in paths)
    assert any("unavailable" in e for e in echoed) or "unavailable" in (out / "summary.md").read_text()


def test_a_crash_leaves_the_previous_report(study: SimpleNamespace, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    before = (out / "report.md").read_text()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_figures, "training_figure", boom)
    with pytest.raises(RuntimeError):
        write_report(out, echo=lambda _: None, n_resamples=50)
    assert (out / "report.md").read_text() == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_write_results_uses_the_study_folder(study: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    (out / "report.md").unlink()
    fake = SimpleNamespace(out=out, data_dir=study.data_dir, echo=lambda _: None, config=None, registry=None)
    paths = write_results(fake)
    assert out / "report.md" in paths and (out / "report.md").is_file()


def test_chosen_groups(study: SimpleNamespace) -> None:
    groups = chosen_groups(load_outputs(study.out))
    kd1 = groups[("s1", "kd1", "sst2")]
    assert kd1.source == "selection.json" and kd1.params["lam"] == 1.0
    assert [r.id for r in kd1.runs] == ["kd1-sst2-s1-lam1-seed42", "kd1-sst2-s1-lam1-seed7"]
    assert len(kd1.candidates) == 2 and kd1.varying == ["lam"]
    assert groups[("s1", "sft", "squad")].source == "single setting"
    assert [r.id for r in groups[("s1", "kd2", "sst2")].runs] == ["kd2-sst2-s1-lam0.5-seed42"]


def test_missing_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="registry.sqlite"):
        write_report(tmp_path)


def test_efficiency_table_gives_ratios_to_the_teacher(study: SimpleNamespace) -> None:
    # kd1 student: 60M vs 135M parameters, p50 4.0 vs 10.0 ms on sst2, same throughput as the teacher.
    lines = (study.out / "report.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| s1 kd1")]
    assert rows and rows[0].rstrip(" |").endswith("0.44 / 0.40 / 1.00"), rows


# ---------------------------------------------------------------------------------------------------------
# findings, Holm, gap recovered, per-example scores, provenance


def _finding(delta: float, low: float, high: float, p: float, holm_p: float | None, *, method: str = "kd1",
             task: str = "sst2", metric: str = "accuracy", setting: list[tuple[str, str]] | None = None,
             teacher: float | None = 80.0, sft: float | None = 70.0,
             seeds: tuple[int, int] = (2, 2)) -> Finding:
    aware = min(seeds) >= 2
    result = BootstrapResult(delta, low, high, p, 500, 10_000, 0.95,
                             procedure="seeds+examples" if aware else "examples", n_seeds=seeds)
    c = Comparison(task, "s1", method, metric, result, seeds, holm_p=holm_p)
    lam, temperature = SettingPart("λ", r"$\lambda$", "0.5"), SettingPart("T", "$T$", "2")
    setting = [lam, temperature] if setting is None else setting
    method_mean = None if sft is None else sft + delta
    return Finding(c, setting, method_mean, sft, teacher)


def test_finding_sentences() -> None:
    better = finding_sentence(_finding(2.1, 0.4, 3.8, 0.02, 0.04))
    assert better == ("kd1 (λ=0.5, T=2) beats SFT on SST-2 accuracy by +2.1 points [+0.4, +3.8], p=0.020 "
                      "(Holm 0.040).")
    worse = finding_sentence(_finding(-1.3, -2.4, -0.2, 0.004, 0.012, method="kd3", task="squad", metric="f1",
                                      setting=[SettingPart("λ", r"$\lambda$", "0.5")]))
    assert worse == ("kd3 (λ=0.5) is worse than SFT on SQuAD F1 by -1.3 points [-2.4, -0.2], p=0.004 "
                     "(Holm 0.012).")
    same = finding_sentence(_finding(0.4, -1.2, 2.0, 0.61, 1.0))
    assert same == ("kd1 (λ=0.5, T=2): no significant difference from SFT on SST-2 accuracy "
                    "(Δ +0.4 [-1.2, +2.0], p=0.610, Holm 1.000).")
    # Significant alone, not after the correction: the sentence says why the interval excludes 0.
    corrected = finding_sentence(_finding(1.5, 0.2, 2.8, 0.03, 0.09))
    assert "no significant difference from SFT on SST-2 accuracy after Holm correction" in corrected
    assert "p=0.030, Holm 0.090" in corrected
    # Holm p just under 0.05 must not print as 0.050 beside "beats".
    assert "(Holm 0.0496)" in finding_sentence(_finding(2.0, 0.5, 3.0, 0.01, 0.0496))
    assert "s1 kd1" in finding_sentence(_finding(2.1, 0.4, 3.8, 0.02, 0.04), many_students=True)
    # One seed on either side: the difference on these examples, never "beats", and the caveat in words.
    one = finding_sentence(_finding(2.1, 0.4, 3.8, 0.02, 0.04, seeds=(1, 1)))
    assert one == ("kd1 (λ=0.5, T=2) scores above SFT on SST-2 accuracy on these evaluation examples by "
                   "+2.1 points [+0.4, +3.8], p=0.020 (Holm 0.040). With one training seed per system, "
                   "this comparison covers test-set sampling only and cannot separate the method from the "
                   "training seed.")
    below = finding_sentence(_finding(-2.1, -3.8, -0.4, 0.02, 0.04, seeds=(3, 1)))
    assert "scores below SFT" in below and "With 3 training seeds of kd1 and 1 of SFT" in below
    unclear = finding_sentence(_finding(0.4, -1.2, 2.0, 0.61, 1.0, seeds=(1, 2)))
    assert unclear.startswith("kd1 (λ=0.5, T=2): no significant difference from SFT")
    assert unclear.endswith("cannot separate the method from the training seed.")
    for text in (one, below, unclear):
        assert "beats" not in text and "worse" not in text
    missing = Finding(Comparison("sst2", "s1", "kd2", "accuracy", None, note="no references"), [], None, None,
                      None)
    assert finding_sentence(missing) == (
        "kd2 vs SFT on SST-2 accuracy: not computed (see the n/a notes under the SST-2 Δ table).")


def test_gap_recovered() -> None:
    f = _finding(5.0, 1.0, 9.0, 0.001, 0.002, teacher=80.0, sft=70.0)
    assert f.gap == pytest.approx(10.0) and f.recovered == pytest.approx(50.0)
    behind = _finding(5.0, 1.0, 9.0, 0.001, 0.002, teacher=69.0, sft=70.0)
    level = _finding(5.0, 1.0, 9.0, 0.001, 0.002, teacher=70.01, sft=70.0)  # prints as +0.0: not ahead
    assert behind.recovered is None and level.recovered is None
    assert _finding(5.0, 1.0, 9.0, 0.001, 0.002, teacher=None).recovered is None
    summary = TaskSummary("sst2", ["accuracy"], [], [behind.comparison], 500, [behind])
    rows = _table_rows(summary_markdown([summary]), "## Findings")
    assert rows[0][8] == "-1.0" and rows[0][9] == "n/a"


def test_findings_section_of_the_study(study: SimpleNamespace) -> None:
    text = (study.out / "summary.md").read_text()
    assert text.index("## Findings") < text.index("## SST-2")  # at the top
    findings = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    # kd1 (18-19 of 20 right vs SFT's 8-9, 2 seeds each) is clearly better with seed variance included;
    # kd2 (13, one seed: its second seed failed) is above SFT on these examples, but one seed cannot say why.
    assert "- kd1 (λ=1, T=2, forward_kl) beats SFT on SST-2 accuracy by +50.0 points [" in findings
    assert "- kd1 (λ=1, T=2, forward_kl) beats SFT on SQuAD F1 by +50.0 points [" in findings
    kd2 = next(line for line in findings.splitlines() if line.startswith("- kd2 (λ=0.5)") and "SST-2" in line)
    assert kd2.startswith("- kd2 (λ=0.5) scores above SFT on SST-2 accuracy on these evaluation examples by "
                          "+22.5 points [")
    assert kd2.endswith("With 1 training seed of kd2 and 2 of SFT, this comparison covers test-set sampling "
                        "only and cannot separate the method from the training seed.")
    assert "kd2 (λ=0.5) beats" not in findings
    rows = {(r[0], r[2], r[4]): r for r in _table_rows(text, "## Findings")}
    assert len(rows) == 6  # (kd1, kd2) x (SST-2 accuracy, SQuAD EM, SQuAD F1)
    # Teacher 17/20 = 85, SFT (8 + 9) / 2 = 42.5, kd1 (18 + 19) / 2 = 92.5, kd2 13 = 65.
    kd1, kd2 = rows[("SST-2", "kd1", "accuracy")], rows[("SST-2", "kd2", "accuracy")]
    assert kd1[3] == "λ=1, T=2, forward_kl" and kd1[8] == "+42.5" and kd1[9] == "118%"
    assert kd2[8] == "+42.5" and kd2[9] == "53%"
    assert rows[("SQuAD", "kd1", "F1")][9] == "118%"
    # seeds and mean ± std over seeds of both systems
    assert kd1[10:13] == ["2/2", "92.5 ± 3.5", "42.5 ± 3.5"] and kd2[10:13] == ["1/2", "65.0", "42.5 ± 3.5"]
    # Cost per run: training (kd1 6 and 7 s, SFT 3 and 4 s) + a quarter of the teacher's 20 s and of the
    # cache's 30 s (4 finished KD runs per task learn from the teacher and read the cache): 19 vs 3.5 s.
    kd1_s, sft_s = (6 + 7) / 2 + TEACHER_TRAIN_S / 4 + CACHE_WALL_S / 4, (3 + 4) / 2
    assert kd1[13] == f"{kd1_s:.0f} / {sft_s:.0f}" == "19 / 4"
    per_hour = 50.0 / ((kd1_s - sft_s) / 3600)
    assert kd1[14] == f"{per_hour:+,.0f}" == "+11,613"
    assert f"Cost per run 19 s against SFT's 4 s: {per_hour:+,.0f} points per extra hour" in findings
    assert "6 comparisons" in findings and "Holm" in findings


def test_holm_over_all_comparisons_of_a_student(study: SimpleNamespace) -> None:
    outputs = load_outputs(study.out)
    comparisons = compare_to_sft(outputs, chosen_groups(outputs), study.data_dir, n_resamples=2000)
    assert len(comparisons) == 6 and all(c.result is not None for c in comparisons)
    p = [c.result.p_value for c in comparisons]
    assert [c.holm_p for c in comparisons] == pytest.approx(list(holm(p)))
    # The family is every task, method and metric (6): kd2's three equal p-values are the 4th-6th smallest,
    # so each is multiplied by 6 - 4 + 1 = 3 (the running maximum carries the 4th to the 5th and 6th).
    kd2 = [c for c in comparisons if c.method == "kd2"]
    assert len({c.result.p_value for c in kd2}) == 1
    assert all(c.holm_p == pytest.approx(min(1.0, 3 * c.result.p_value)) for c in kd2)
    # The study's summary shows the same numbers (10000 resamples there).
    text = (study.out / "summary.md").read_text()
    full = compare_to_sft(outputs, chosen_groups(outputs), study.data_dir)
    rows = {(r[0], r[2], r[4]): r for r in _table_rows(text, "## Findings")}
    c = next(c for c in full if c.method == "kd2" and c.task == "sst2")
    assert rows[("SST-2", "kd2", "accuracy")][6:8] == [f"{c.result.p_value:.3f}", f"{c.holm_p:.3f}"]


def test_per_example_scores_are_written_and_recheck_the_statistics(study: SimpleNamespace) -> None:
    path = study.out / "per_example_scores.csv"
    assert path in study.paths and "[per_example_scores.csv](per_example_scores.csv)" in (
        study.out / "report.md").read_text()
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["run", "task", "split", "example", "accuracy", "exact_match", "f1"]
    runs = {r["run"] for r in rows}
    # Every chosen run (SFT and KD, every seed) and the two teachers, per task: 20 examples each.
    assert {"teacher-sst2", "teacher-sst2-zero-shot", "sft-sst2-s1-seed7", "kd1-squad-s1-lam1-seed7",
            "kd2-sst2-s1-lam0.5-seed42"} <= runs
    assert "kd1-sst2-s1-lam0.5-seed42" not in runs  # a grid run that was not chosen
    assert len(rows) == 20 * len(runs) and all(r["split"] == "eval" for r in rows)

    def scores(run: str, metric: str) -> np.ndarray:
        return np.array([float(r[metric]) for r in rows if r["run"] == run])

    m = study.expected["metrics"]
    assert scores("teacher-sst2", "accuracy").mean() == pytest.approx(m["teacher-sst2"]["eval"]["accuracy"])
    # Recompute kd1 vs SFT on SQuAD F1 from the file alone: the same Δ, interval and p as the summary.
    system = np.stack([scores(f"kd1-squad-s1-lam1-seed{s}", "f1") for s in (42, 7)])
    base = np.stack([scores(f"sft-squad-s1-seed{s}", "f1") for s in (42, 7)])
    r = compare_systems(system, base, seed=0)
    assert r.seed_aware
    delta = {(row[0], row[1]): row for row in _table_rows((study.out / "summary.md").read_text(),
                                                          "### SQuAD: Δ vs SFT")}
    p_text = "p<0.001" if r.p_value < 0.001 else f"p={r.p_value:.3f}"
    assert delta[("s1", "kd1")][5] == f"{r.delta:+.1f} [{r.low:+.1f}, {r.high:+.1f}], {p_text}"


def _fast_report(out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """write_report without figures (they are tested above), small bootstrap; report.md's text."""
    for name in ("lambda_figures", "efficiency_figures", "training_figures", "cost_figures"):
        monkeypatch.setattr(report_mod, name, lambda *a, **k: [])
    write_report(out, echo=lambda _: None, n_resamples=200)
    return (out / "report.md").read_text()


PROVENANCE = {
    "deterministic": False,
    "seeds": {"data": 1234, "teacher-sst2": 42, "student-init-s1": 42, "kd1-sst2-s1-lam1-seed42": 42,
              "bootstrap": 5},
    "models": {"teacher": {"spec": "smollm2-135m-instruct", "path": "/models/t", "revision": None,
                           "fingerprint": "ab12cd34"},
               "students.s1": {"spec": "derived", "path": "students/s1/init", "revision": "r1",
                               "fingerprint": "ef56"}},
    "data": {"sst2": {"files": {"sst2/train.tsv": "sha256-train", "sst2/validation.tsv": "sha256-val"}}},
    "cuda": "12.4",
}


def test_provenance_answers_and_transfer_are_reported(study: SimpleNamespace, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    (out / "provenance.json").write_text(json.dumps(PROVENANCE))
    cache = out / "teacher_cache" / "sst2"
    shutil.rmtree(cache)  # the study's small cache, replaced by a manifest alone
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({
        "fingerprint": "cafe01", "hidden_dtype": "float16",
        "answers": {"total": 64, "empty": 14, "policy": "gold", "replaced": 14, "dropped": 0}}))
    manifest = json.loads((out / "data" / "sst2.json").read_text())
    (out / "data" / "sst2.json").write_text(json.dumps({**manifest, "transfer": [f"t{i}" for i in range(7)]}))
    text = _fast_report(out, monkeypatch)
    for line in ("| deterministic | false |", "| evaluation dtype | bfloat16 |",
                 "| training bf16 autocast (students) | False |", "| teacher cache hidden dtype | float16 |",
                 "| bootstrap seed (report) | 5 (provenance.json) |", "| teacher-sst2 | 42 |",
                 "| kd1-sst2-s1-lam1-seed42 | 42 |", "| bootstrap | 5 |",
                 "| teacher | smollm2-135m-instruct | /models/t | – | – | – | ab12cd34 |",
                 "| students.s1 | derived | students/s1/init | r1 | – | – | ef56 |",
                 "| sst2 | sst2/train.tsv | sha256-train |", "| SST-2 | cafe01 | float16 |",
                 "| cuda | 12.4 |",
                 "- SST-2: 14 of 64 teacher answers were empty; policy `gold`: 14 replaced, 0 dropped.",
                 "| task | train | selection | eval | transfer |", "| SST-2 | 0 | 0 | 20 | 7 |",
                 "| SQuAD | 0 | 0 | 20 | – |"):
        assert line in text, line
    assert "not recorded" not in text.split("## Environment", 1)[1].split("## Reproduce", 1)[0]
    # The bootstrap ran with provenance's seed, and the captions say so.
    assert "resamples, seed 5)" in (out / "summary.md").read_text()
    assert "numpy seed 5, provenance.json)" in text


def test_absent_or_malformed_provenance_is_not_recorded(study: SimpleNamespace, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    text = (study.out / "report.md").read_text()
    assert "| deterministic | not recorded (no provenance.json) |" in text
    assert "| bootstrap seed (report) | 0 (default) |" in text
    assert "study.yaml: training seeds 42, 7; data seed 1234." in text
    assert text.count("- not recorded (no provenance.json).") == 3  # seeds, models, data
    report = text.split("## Study config", 1)[0]
    assert "teacher answers" not in report and "transfer" not in report  # optional parts absent
    assert "resamples, seed 0)" in (study.out / "summary.md").read_text()
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    for bad in ({"seeds": "oops", "models": [1], "data": {"sst2": 3}, "deterministic": None}, [1, 2], "{"):
        (out / "provenance.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        text = _fast_report(out, monkeypatch)
        assert "## Environment" in text and "| bootstrap seed (report) | 0 (default) |" in text
    assert "provenance.json is not valid JSON" in text


def test_paired_bootstrap_agrees_with_scipy() -> None:
    """kdlab's percentile interval (order statistics) against scipy's bootstrap of the same paired means."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    system = 100.0 * (rng.random((2, 400)) < 0.62)  # two seeds of per-example correctness
    baseline = 100.0 * (rng.random(400) < 0.55)
    ours = paired_bootstrap(system, baseline, n_resamples=20_000, seed=1)
    diffs = system.mean(0) - baseline
    theirs = scipy_stats.bootstrap((diffs,), np.mean, n_resamples=20_000, confidence_level=0.95,
                                   method="percentile", random_state=2).confidence_interval
    assert ours.delta == pytest.approx(diffs.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.4) and ours.high == pytest.approx(theirs.high, abs=0.4)
    # The p-value inverts the interval: the t-test's p on the same differences is of the same order.
    t_p = scipy_stats.ttest_1samp(diffs, 0.0).pvalue
    assert (ours.p_value < 0.05) == (t_p < 0.05)


# ---------------------------------------------------------------------------------------------------------
# costs and diagnostics


def test_results_csv_cost_columns(study: SimpleNamespace) -> None:
    with (study.out / "results.csv").open() as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    kd1 = rows["kd1-sst2-s1-lam1-seed7"]
    # training 7 s, a quarter of the teacher's 20 s and of the cache's 30 s (4 finished KD runs of SST-2)
    assert float(kd1["cost_training_s"]) == 7.0
    assert float(kd1["cost_teacher_share_s"]) == TEACHER_TRAIN_S / 4
    assert float(kd1["cost_cache_share_s"]) == CACHE_WALL_S / 4
    assert float(kd1["cost_total_s"]) == 7.0 + (TEACHER_TRAIN_S + CACHE_WALL_S) / 4
    # (4 N + 2 N_trainable) x tokens, N = 2000, N_trainable = 1000
    assert float(kd1["cost_flops"]) == pytest.approx((4 * 2000 + 2 * 1000) * TRAIN_TOKENS)
    sft = rows["sft-sst2-s1-seed42"]  # SFT learns nothing from the teacher: no share
    assert float(sft["cost_total_s"]) == 3.0 and float(sft["cost_teacher_share_s"]) == 0.0
    assert rows["teacher-sst2"]["cost_total_s"] == ""
    assert rows["kd2-sst2-s1-lam0.5-seed7"]["cost_total_s"] == ""  # failed


def test_cost_table_and_figure(study: SimpleNamespace) -> None:
    text = (study.out / "report.md").read_text()
    rows = {r[1]: r for r in _table_rows(text.split("## Cost", 1)[1], "### SST-2")}
    share = (TEACHER_TRAIN_S + CACHE_WALL_S) / 4
    assert rows["sft"][2:6] == ["2", _cell([40.0, 45.0]), _cell([3.0, 4.0]), "3.5 / 0.0 / 0.0"]
    assert rows["kd1"][2:6] == ["2", _cell([90.0, 95.0]), _cell([6 + share, 7 + share]), "6.5 / 5.0 / 7.5"]
    assert rows["kd2"][4] == _cell([4 + share])
    # every grid point and seed: kd1 λ=0.5 (6 s) and λ=1 (6 and 7 s), each with its share
    assert rows["kd1"][7] == f"{6 + 6 + 7 + 3 * share:.0f}"
    # Pareto: sft cheapest, kd2 better than sft, kd1 best: all on the front here
    assert [rows[m][8] for m in ("sft", "kd1", "kd2")] == ["yes", "yes", "yes"]
    assert (study.out / "figures" / "cost_sst2.png").is_file()
    assert "![SST-2: quality vs training cost](figures/cost_sst2.png)" in text


def test_cost_pareto_front_drops_a_dominated_method(study: SimpleNamespace, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # kd2 made slower than kd1 (100 s of training): kd1 is cheaper and better, so kd2 leaves the front.
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    with sqlite3.connect(out / "registry.sqlite") as db:
        rid = "kd2-sst2-s1-lam0.5-seed42"
        metrics = json.loads(db.execute("SELECT metrics FROM runs WHERE id = ?", (rid,)).fetchone()[0])
        slow = json.dumps({**metrics, "train_runtime": 100.0})
        db.execute("UPDATE runs SET metrics = ? WHERE id = ?", (slow, rid))
    text = _fast_report(out, monkeypatch)
    rows = {r[1]: r for r in _table_rows(text.split("## Cost", 1)[1], "### SST-2")}
    assert [rows[m][8] for m in ("sft", "kd1", "kd2")] == ["yes", "yes", ""]
    assert "live teacher / rollouts" not in text  # no method recorded them


def test_cost_table_shows_live_teacher_and_rollout_time_when_recorded(
        study: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(study.out, out)
    with sqlite3.connect(out / "registry.sqlite") as db:
        for rid, seconds in (("kd1-sst2-s1-lam1-seed42", 1.0), ("kd1-sst2-s1-lam1-seed7", 2.0)):
            metrics = json.loads(db.execute("SELECT metrics FROM runs WHERE id = ?", (rid,)).fetchone()[0])
            metrics.update(teacher_seconds=seconds, teacher_tokens=100, rollout_seconds=0.0,
                           rollout_tokens=50)
            db.execute("UPDATE runs SET metrics = ? WHERE id = ?", (json.dumps(metrics), rid))
    text = _fast_report(out, monkeypatch)
    rows = {r[1]: r for r in _table_rows(text.split("## Cost", 1)[1], "### SST-2")}
    assert rows["kd1"][6] == "1.5 / 0.0" and rows["sft"][6] == "– / –"
    # FLOPs add 2 N per rollout token; the live teacher's need its size (bench.json: 135M parameters)
    flops = (4 * 2000 + 2 * 1000) * TRAIN_TOKENS + 2 * 2000 * 50 + 2 * 135_000_000 * 100
    assert rows["kd1"][7] == f"{flops:.3g}"


def test_diagnostics_section(study: SimpleNamespace) -> None:
    text = (study.out / "report.md").read_text()
    section = text.split("## Diagnostics", 1)[1].split("\n## ", 1)[0]
    rows = {r[1]: r for r in _table_rows(section, "### SST-2")}
    # Agreement with the teacher (17 of 20 right; a student with n right agrees on its n right answers
    # and on the teacher's 3 wrong ones): n + 3 of 20.
    agree = {n: 100 * (n + 3) / 20 for n in (8, 9, 13, 18, 19)}
    assert rows["sft"][2:6] == ["2", _cell([agree[8], agree[9]]), "0.575 ± 0.035", _cell([22.0, 21.0])]
    kl = [0.05 * (20 - n) for n in (18, 19)]
    assert rows["kd1"][4] == f"{statistics.fmean(kl):.3f} ± {statistics.stdev(kl):.3f}"
    assert rows["kd1"][5] == _cell([12.0, 11.0]) and rows["kd2"][2:4] == ["1", _cell([agree[13]])]
    squad = {r[1]: r for r in _table_rows(section, "### SQuAD")}
    assert len(squad["kd1"]) == 5  # no ECE column for generation
    # tail mass of the SST-2 cache, hand-computed from the full distributions it was written from
    mass = _table_rows(section, "Teacher caches")
    assert mass[0][:2] == ["SST-2", "4"] and int(mass[0][2]) > 0
    for col, t in ((3, 1.0), (4, 2.0)):
        assert float(mass[0][col]) == pytest.approx(100 * study.expected["tail_mass"][t], abs=0.2)


def test_report_names_the_chosen_run_and_every_method(study: SimpleNamespace) -> None:
    text = (study.out / "report.md").read_text()
    chosen = {r[0]: r for r in _table_rows(text, "## Chosen settings")}
    # kd1's λ=1 run has the higher selection accuracy (it is chosen although λ=0.5 was also trained)
    assert chosen["kd1-sst2-s1"][1:] == ["`kd1-sst2-s1-lam1-seed42`", "highest selection-split accuracy"]
    assert chosen["kd1-squad-s1"][1] == "`kd1-squad-s1-lam1-seed42`"
    # every method has its row in the results, Δ, cost and diagnostics tables, with its seed count
    results = {r[1]: r for r in _table_rows(text, "### SST-2 (accuracy") if r[0] == "s1"}
    assert {m: results[m][-1] for m in ("sft", "kd1", "kd2")} == {"sft": "2", "kd1": "2", "kd2": "1"}
    cost = {r[1]: r[2] for r in _table_rows(text.split("## Cost", 1)[1], "### SST-2")}
    diag = {r[1]: r[2] for r in _table_rows(text.split("## Diagnostics", 1)[1], "### SST-2")}
    assert cost == diag == {"sft": "2", "kd1": "2", "kd2": "1"}
