"""A kdlab process freezes its import-time objects out of the collector's view before its first run (the CLI,
a Ray worker); its runs' own objects, and a Python API caller's, stay collectable."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdlab import heap, ray_executor
from kdlab.cli import main
from kdlab.distributed import Ranks
from kdlab.registry import Registry, RunSpec
from kdlab.runner import Runner

IMPORTS = 100_000  # torch, transformers and peft leave about 450 000 objects


class _Node:
    pass


def _cycle() -> weakref.ref:
    """A weak reference to an object in a reference cycle, nothing else holding it: only the collector frees
    it."""
    node = _Node()
    node.me = node
    return weakref.ref(node)


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a fresh one: nothing frozen yet (the suite froze its imports at the start)."""
    gc.unfreeze()
    monkeypatch.setattr(heap, "_frozen", False)
    yield
    heap.freeze_imports()


def _spec(seed: int, output_dir: str = "") -> RunSpec:
    return RunSpec(f"sft-sst2-s1-seed{seed}", kind="student", task="sst2", method="sft", student="s1",
                   stage="grid", seed=seed, output_dir=output_dir)


def test_the_imports_are_frozen_once_and_later_objects_stay_collectable(fresh_process: None) -> None:
    heap.freeze_imports()
    count = gc.get_freeze_count()
    assert count > IMPORTS
    later = _cycle()
    heap.freeze_imports()  # once per process: nothing more is frozen
    assert gc.get_freeze_count() == count
    gc.collect()
    assert later() is None


def test_a_study_command_freezes_before_its_imports(fresh_process: None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "study.yaml").write_text("teacher: {model: tiny-llama}\nseeds: [one]\n")
    assert main(["sweep", str(tmp_path / "study.yaml")]) == 2  # refused, after the freeze
    assert "seeds" in capsys.readouterr().err
    assert gc.get_freeze_count() > IMPORTS


def test_a_ray_task_freezes_before_its_run(fresh_process: None, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def run_job(job) -> dict:
        seen["frozen"] = gc.get_freeze_count()
        return {}

    monkeypatch.setattr("kdlab.job.run_job", run_job)
    job = SimpleNamespace(spec=_spec(1, str(tmp_path / "run")))
    (tmp_path / "run").mkdir()
    ray_executor._train_in_worker(job, "submission-1")
    assert seen["frozen"] > IMPORTS


def test_the_python_api_leaves_the_callers_objects_collectable(fresh_process: None, tmp_path: Path) -> None:
    """A notebook's own objects, alive when it runs a study through the API, are not frozen: deleted later,
    they are freed (a frozen model in a reference cycle would hold its memory for good)."""
    notebook = _Node()
    notebook.me = notebook
    kept = weakref.ref(notebook)
    seen = {}

    def body() -> dict:
        seen["run"] = _cycle()
        return {}

    runner = Runner(Registry(tmp_path / "registry.sqlite"), Ranks(), tmp_path)
    assert runner.execute(_spec(1), body).status == "done"
    assert seen["run"]() is None  # the runner collected the run's garbage
    assert gc.get_freeze_count() == 0
    del notebook
    gc.collect()
    assert kept() is None
