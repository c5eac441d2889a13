"""`kdlab status` shows each grid's choice as the sweep makes it: the one selection rule (the highest
selection-split metric), never the evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.registry import Registry, RunSpec


def test_status_chooses_on_the_selection_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(tmp_path / "registry.sqlite")
    # lam1 is better on the evaluation split, lam0.5 on the selection split: the sweep keeps lam0.5.
    for lam, selection, evaluation in ((0.5, 70.0, 60.0), (1.0, 65.0, 80.0)):
        spec = RunSpec(id=f"kd1-sst2-s1-lam{lam:g}-seed1", kind="student", task="sst2", method="kd1",
                       student="s1", stage="grid", params={"lam": lam}, seed=1, config_hash="h")
        registry.add(spec)
        assert registry.claim(spec.id)
        metrics = {"selection": {"accuracy": selection}, "eval": {"accuracy": evaluation}}
        registry.finish(spec.id, metrics, 1.0)
    assert main(["status", "--out", str(tmp_path), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert best == [{"task": "sst2", "method": "kd1", "student": "s1", "metric": "accuracy", "value": 60.0,
                     "selection": 70.0, "run": "kd1-sst2-s1-lam0.5-seed1"}]
    assert main(["status", "--out", str(tmp_path)]) == 0
    assert "highest selection-split metric" in capsys.readouterr().out
