"""Tests for kdlab.bench: pure helpers, bench_models on tiny models, bench.json from a study's registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdlab.bench import (
    BenchEntry,
    MemoryMeter,
    bench_models,
    disk_bytes,
    percentile,
    study_entries,
    time_calls,
    write_bench,
)
from kdlab.config import parse_config
from kdlab.layout import Layout
from kdlab.models import folder_size_bytes, load_model, load_tokenizer
from kdlab.registry import Registry, RunSpec
from kdlab.resolve import resolve_config
from kdlab.tasks import SquadSettings, SquadTask, SST2Settings, SST2Task
from kdlab.tasks.base import Example
from kdlab.tiny import write_tiny_llama

MODEL_KEYS = {"role", "run", "method", "task", "parameters", "trainable_parameters", "disk_bytes", "tasks"}
TASK_KEYS = {"latency_ms_p50", "latency_ms_p95", "examples_per_s", "tokens_per_s", "peak_memory_bytes"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench-models")
    return write_tiny_llama(root / "teacher", num_layers=4), write_tiny_llama(root / "student", num_layers=2)


def sst2_examples(n: int) -> list[Example]:
    words = ["a charming and moving film", "a dull and boring mess", "great fun with a happy story",
             "the worst film , terrible jokes"]
    return [Example(id=f"validation-{i}", fields={"sentence": words[i % 4]}, label=i % 2) for i in range(n)]


def squad_examples(n: int) -> list[Example]:
    context = "Paris is the capital of France and its largest city on the river Seine."
    return [Example(id=f"q{i}", fields={"context": context, "question": "What is the capital of France?",
                                        "title": "France"}, answers=("Paris",)) for i in range(n)]


def tiny_tasks() -> dict:
    return {"sst2": (SST2Task(SST2Settings(max_length=96)), sst2_examples(4)),
            "squad": (SquadTask(SquadSettings(max_length=96, max_new_tokens=4)), squad_examples(2))}


# ---------------------------------------------------------------------------------------------------------
# helpers


def test_percentile_on_known_data() -> None:
    data = [4.0, 1.0, 3.0, 2.0]
    assert percentile(data, 50) == pytest.approx(2.5)
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    rng = np.random.default_rng(0)
    values = rng.exponential(size=101).tolist()
    for q in (1, 25, 50, 90, 95, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_time_calls_warms_up_then_times_each_call() -> None:
    calls: list[int] = []
    syncs: list[int] = []
    times = time_calls(lambda: calls.append(1), warmup=2, repeats=3, sync=lambda: syncs.append(1))
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 0 for t in times)
    assert len(syncs) == 4  # once after warm-up, once per timed call
    with pytest.raises(ValueError):
        time_calls(lambda: None, warmup=0, repeats=0)


def test_disk_bytes_leaves_training_only_files_out(tmp_path: Path, tiny_models: tuple[Path, Path]) -> None:
    folder = shutil.copytree(tiny_models[1], tmp_path / "model")
    before = disk_bytes(folder)
    assert before == folder_size_bytes(folder)
    (folder / "kd3_projections.safetensors").write_bytes(b"x" * 1000)
    assert disk_bytes(folder) == before


def test_memory_meter_cpu_sees_an_allocation() -> None:
    meter = MemoryMeter("cpu")
    meter.set_baseline()
    with meter.section():
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        meter.sample()
    del block
    assert meter.peak_bytes >= 32 << 20


# ---------------------------------------------------------------------------------------------------------
# bench_models


def test_bench_models_on_tiny_models(tiny_models: tuple[Path, Path]) -> None:
    teacher, student = tiny_models
    tokenizer = load_tokenizer(str(teacher))
    entries = [
        BenchEntry("teacher-base", str(teacher), "teacher", "teacher", None),
        BenchEntry("sft-sst2-s1", str(student), "student", "sft", "sst2", run="sft-sst2-s1-seed1",
                   trainable_parameters=123),
    ]
    result = bench_models(entries, tiny_tasks(), tokenizer, device="cpu", dtype="float32", batch_size=2,
                          warmup=1, repeats=2)
    assert set(result) == {"device", "dtype", "models"}
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert list(result["models"]) == ["teacher-base", "sft-sst2-s1"]
    json.dumps(result)  # plain JSON types only

    for label, path in (("teacher-base", teacher), ("sft-sst2-s1", student)):
        info = result["models"][label]
        assert set(info) == MODEL_KEYS
        model = load_model(str(path))
        assert info["parameters"] == sum(p.numel() for p in model.parameters())
        assert info["disk_bytes"] == folder_size_bytes(path)
        for stats in info["tasks"].values():
            assert set(stats) == TASK_KEYS
            assert stats["latency_ms_p50"] > 0
            assert stats["latency_ms_p95"] >= stats["latency_ms_p50"]
            assert stats["examples_per_s"] > 0 and stats["tokens_per_s"] > 0
            assert isinstance(stats["peak_memory_bytes"], int) and stats["peak_memory_bytes"] >= 0

    base = result["models"]["teacher-base"]
    assert set(base["tasks"]) == {"sst2", "squad"}  # the base teacher runs every task
    assert base["trainable_parameters"] == base["parameters"]
    assert base["role"] == "teacher" and base["run"] is None and base["task"] is None
    st = result["models"]["sft-sst2-s1"]
    assert set(st["tasks"]) == {"sst2"}  # a student only its own task
    assert st["trainable_parameters"] == 123  # from the run's metrics
    assert st["run"] == "sft-sst2-s1-seed1" and st["method"] == "sft" and st["task"] == "sst2"


def test_bench_models_refuses_an_unknown_task(tiny_models: tuple[Path, Path]) -> None:
    tokenizer = load_tokenizer(str(tiny_models[0]))
    entries = [BenchEntry("x", str(tiny_models[1]), "student", "sft", "squad")]
    tasks = {"sst2": tiny_tasks()["sst2"]}
    with pytest.raises(ValueError, match="squad"):
        bench_models(entries, tasks, tokenizer, device="cpu", dtype="float32", batch_size=2, warmup=0,
                     repeats=1)


# ---------------------------------------------------------------------------------------------------------
# a study's models -> bench.json


class FakeStudy:
    """The parts of `Study` that write_bench reads, over a real registry and real model folders."""

    def __init__(self, out: Path, teacher: Path):
        self.out = out
        self.layout = Layout(out)
        self.config = resolve_config(parse_config({
            "device": "cpu",
            "teacher": {"model": str(teacher), "adapt": True},
            "students": [{"name": "s1", "model": str(teacher)}],
            "tasks": {"sst2": {"train_size": 4, "selection_size": 2, "eval_size": 4, "max_length": 96}},
            "methods": {"sft": {}, "kd1": {"lambda": [0.5, 1.0]}},
            "evaluation": {"batch_size": 2, "dtype": "float32"},
            "seeds": [2, 1],
        }))
        self.registry = Registry(out / "registry.sqlite")
        self.tokenizer = load_tokenizer(str(teacher))
        self.device = torch.device("cpu")
        self.base_teacher_path = str(teacher)

    def teacher_path(self, task: str) -> str:
        return str(self.out / "teacher" / task)

    def data(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(task=SST2Task(SST2Settings(max_length=96)), eval=sst2_examples(6))

    def add_run(self, spec: RunSpec, metrics: dict, model: Path | None) -> None:
        self.registry.add(spec)
        assert self.registry.claim(spec.id)
        self.registry.finish(spec.id, metrics, 1.0)
        if model is not None:
            shutil.copytree(model, Path(spec.output_dir) / ("" if spec.kind == "teacher" else "model"))


@pytest.fixture
def fake_study(tmp_path: Path, tiny_models: tuple[Path, Path]) -> FakeStudy:
    teacher, student = tiny_models
    study = FakeStudy(tmp_path / "out", teacher)
    study.add_run(RunSpec(id="teacher-sst2", kind="teacher", task="sst2", method="teacher", student="teacher",
                          stage="teacher", output_dir=study.teacher_path("sst2")), {}, teacher)

    def student_run(rid: str, method: str, params: dict, seed: int, stage: str, model: Path | None) -> None:
        study.add_run(RunSpec(id=rid, kind="student", task="sst2", method=method, student="s1", stage=stage,
                              params=params, seed=seed, output_dir=str(study.out / "runs" / rid)),
                      {"trainable_parameters": 1000 + seed}, model)

    student_run("sft-sst2-s1-seed2", "sft", {}, 2, "grid", student)
    student_run("sft-sst2-s1-seed1", "sft", {}, 1, "final", student)
    student_run("kd1-sst2-s1-lam0.5-seed2", "kd1", {"lam": 0.5}, 2, "grid", student)
    student_run("kd1-sst2-s1-lam1-seed2", "kd1", {"lam": 1.0}, 2, "grid", student)
    student_run("kd1-sst2-s1-lam0.5-seed1", "kd1", {"lam": 0.5}, 1, "final", student)
    (study.out / "selection.json").write_text(json.dumps(
        {"kd1-sst2-s1": {"chosen": {"lam": 0.5}, "run": "kd1-sst2-s1-lam0.5-seed2"}}))
    return study


def test_study_entries_pick_the_chosen_first_seed_runs(fake_study: FakeStudy) -> None:
    entries = {e.label: e for e in study_entries(fake_study)}
    assert list(entries) == ["teacher-base", "teacher-sst2", "sft-sst2-s1", "kd1-sst2-s1"]
    assert entries["teacher-base"].task is None and entries["teacher-base"].run is None
    assert entries["teacher-base"].method == "teacher-zero-shot"
    assert entries["teacher-sst2"].method == "teacher"
    assert entries["teacher-sst2"].run == "teacher-sst2" and entries["teacher-sst2"].task == "sst2"
    # The chosen setting's first-seed (grid) run, decided by report.chosen_groups as in the tables; not simply
    # the smallest seed (here the grid ran on seed 2).
    assert entries["kd1-sst2-s1"].run == "kd1-sst2-s1-lam0.5-seed2"
    assert entries["sft-sst2-s1"].run == "sft-sst2-s1-seed2"
    assert entries["sft-sst2-s1"].trainable_parameters == 1002
    assert entries["kd1-sst2-s1"].path == str(fake_study.out / "runs" / "kd1-sst2-s1-lam0.5-seed2" / "model")


def test_write_bench_writes_the_documented_json(fake_study: FakeStudy) -> None:
    path = write_bench(fake_study, examples=3, warmup=1, repeats=1)
    assert path == fake_study.out / "bench.json"
    data = json.loads(path.read_text())
    assert {"device", "dtype", "models"} <= set(data)
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["settings"]["examples_per_task"] == {"sst2": 3}
    assert set(data["models"]) == {"teacher-base", "teacher-sst2", "sft-sst2-s1", "kd1-sst2-s1"}
    for label, info in data["models"].items():
        assert set(info) == MODEL_KEYS, label
        assert info["role"] in ("teacher", "student")
        assert isinstance(info["parameters"], int) and isinstance(info["disk_bytes"], int)
        assert set(info["tasks"]) == {"sst2"}
        for stats in info["tasks"].values():
            assert set(stats) == TASK_KEYS
            assert stats["latency_ms_p95"] >= stats["latency_ms_p50"] > 0
    assert data["models"]["kd1-sst2-s1"]["run"] == "kd1-sst2-s1-lam0.5-seed2"
    assert data["models"]["kd1-sst2-s1"]["trainable_parameters"] == 1002
    assert data["models"]["teacher-sst2"]["role"] == "teacher"
    assert not list(fake_study.out.glob("*.tmp"))


def test_write_bench_skips_a_run_whose_model_is_gone(fake_study: FakeStudy,
                                                     kdlab_messages: list[str]) -> None:
    shutil.rmtree(fake_study.out / "runs" / "sft-sst2-s1-seed2" / "model")
    labels = [e.label for e in study_entries(fake_study)]
    assert "sft-sst2-s1" not in labels
    assert any("sft-sst2-s1" in m and "skipped" in m for m in kdlab_messages)
