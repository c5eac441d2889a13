"""Tests for the study report (kdlab.report, kdlab.stats, kdlab.figures) on a fake study folder: no models."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kdlab import report as report_mod
from kdlab.config import parse_config
from kdlab.figures import style_font_sizes
from kdlab.registry import Registry, RunSpec
from kdlab.report import (
    chosen_groups,
    load_outputs,
    per_example_scores,
    tex_escape,
    write_report,
    write_results,
)
from kdlab.stats import mean_std, paired_bootstrap, pareto_front
from kdlab.tasks import get_task

OWNER = "test-host:1"
KD1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 32}
# Correct eval answers per run (out of the 20 examples of each tiny eval split).
CORRECT = {
    "sft": {42: 10, 7: 12},
    "kd1-0.5": {42: 11},
    "kd1-1": {42: 18, 7: 19},
    "kd2": {42: 13},
    "teacher-zero-shot": 9,
    "teacher": 17,
}
N_RUNS = 4 + 2 * 7  # teachers + per task (sft x2, kd1 x3, kd2, one failed kd2 seed)


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
    ext = "json" if task_obj.generative else "jsonl"
    for split in ("eval", "selection"):
        task_obj.write_predictions(predictions, folder / f"predictions_{split}.{ext}")


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
    config = parse_config({
        "name": "tiny_study", "output_dir": str(out), "data_dir": str(data_dir),
        "teacher": {"model": "tiny-teacher"},
        "students": [{"name": "s1", "derive": {"num_layers": 2}}],
        "tasks": {"sst2": {"selection_size": 4, "eval_size": 20},
                  "squad": {"selection_size": 4, "eval_size": 20}},
        "methods": {"sft": {}, "kd1": {"lambda": [0.5, 1.0]}, "kd2": {"lambda": 0.5}},
        "seeds": [42, 7],
    })
    out.mkdir(parents=True)
    (out / "study.yaml").write_text(config.to_yaml())
    reg = Registry(out / "registry.sqlite")
    expected: dict[str, Any] = {"metrics": {}}

    def finish(spec: RunSpec, metrics: dict[str, Any]) -> None:
        reg.add(spec)
        assert reg.claim(spec.id, OWNER)
        reg.finish(spec.id, metrics, 12.5, OWNER)
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
                           output_dir=str(out / "teacher" / task)), score(CORRECT[name], folder))

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
            metrics.update(train_runtime=3.0, steps=8, train_examples=64, trainable_parameters=1000,
                           parameters=2000)
            logs = _log_history(method != "sft", 2.0 + seed / 100)
            (folder / "log_history.json").write_text(json.dumps(logs))
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
    assert by[("s1", "sft")][3] == _cell(sft) and by[("s1", "sft")][4] == "2"
    assert by[("s1", "kd1")][3] == f"**{_cell(kd1)}**"  # the best student, bold
    assert by[("s1", "kd1")][2] == "λ=1, T=2, forward_kl"
    assert by[("s1", "kd2")][3] == _cell([m["kd2-sst2-s1-lam0.5-seed42"]["eval"]["accuracy"]])
    assert by[("s1", "kd2")][4] == "1"  # the failed seed is not counted
    assert "**" not in " ".join(by[("teacher", "adapted")])  # teachers are never bold
    squad = {(r[0], r[1]): r for r in _table_rows(text, "## SQuAD")}
    for col, metric in ((3, "exact_match"), (4, "f1")):
        values = [m[f"kd1-squad-s1-lam1-seed{s}"]["eval"][metric] for s in (42, 7)]
        assert squad[("s1", "kd1")][col] == f"**{_cell(values)}**"
    # Δ vs SFT table: kd1 is clearly better than SFT on SST-2.
    delta = {(r[0], r[1]): r for r in _table_rows(text, "### SST-2: Δ vs SFT")}
    cell = delta[("s1", "kd1")][3]
    d, lo, hi = (float(x) for x in re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", cell).groups())
    assert d == pytest.approx(statistics.fmean(kd1) - statistics.fmean(sft), abs=0.05)
    assert lo > 0 and hi >= d
    assert "p<0.001" in cell or float(cell.split("p=")[1]) < 0.05
    assert delta[("s1", "kd1")][2] == "2/2"


def test_summary_tex_booktabs_and_escaping(study: SimpleNamespace) -> None:
    tex = (study.out / "summary.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 4  # results + Δ, per task
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
        scores = per_example_scores(task, preds, examples)
        for metric, value in t.score(preds, examples).items():
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

    monkeypatch.setattr(report_mod, "training_figure", boom)
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
