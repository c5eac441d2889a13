"""The import-time objects of a process frozen out of the collector's view before its first run, the run's own
objects collected as before."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from kdlab import heap
from kdlab.distributed import Ranks
from kdlab.registry import Registry, RunSpec
from kdlab.runner import Runner


class _Node:
    pass


def test_a_run_starts_with_the_imports_frozen_and_its_own_cycles_are_collected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gc.unfreeze()  # as in a fresh process (another test may have frozen this one)
    monkeypatch.setattr(heap, "_frozen", False)
    seen = {}

    def body() -> dict:
        seen["frozen"] = gc.get_freeze_count()
        node = _Node()
        node.me = node  # a reference cycle: only the collector frees it
        seen["node"] = weakref.ref(node)
        return {}

    runner = Runner(Registry(tmp_path / "registry.sqlite"), Ranks(), tmp_path)
    spec = RunSpec("sft-sst2-s1-seed1", kind="student", task="sst2", method="sft", student="s1",
                   stage="grid", seed=1)
    assert runner.execute(spec, body).status == "done"
    # torch's, transformers' and peft's objects (about 450 000) were frozen before the body ran
    assert seen["frozen"] > 100_000
    assert seen["node"]() is None  # made after the freeze: the runner's collection freed it
    # once per process: a second run freezes nothing more (its objects stay collectable)
    count = gc.get_freeze_count()
    runner.execute(RunSpec("sft-sst2-s1-seed2", kind="student", task="sst2", method="sft", student="s1",
                           stage="grid", seed=2), body)
    assert gc.get_freeze_count() == count and seen["node"]() is None
