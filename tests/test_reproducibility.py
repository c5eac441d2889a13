"""A study's numbers follow from its config alone: two fresh processes give bit-identical weights, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.config import preset_text
from kdlab.registry import Registry
from kdlab.seeding import stage_seed

# Fields of a run's metrics that measure time, not results.
TIMING_KEYS = {"seconds", "train_runtime", "student_seconds", "teacher_seconds", "rollout_seconds"}


def _tiny_study(path: Path, *, transfer: bool) -> Path:
    """The smoke study with a LoRA teacher (its adapters and dropout draw random numbers), one seed."""
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["finetune"] = "lora"
    data["teacher"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    data["methods"]["kd1"]["lambda"] = 0.5
    data["seeds"] = [7]
    data["bench"] = {"enabled": False}
    if transfer:
        data["tasks"]["sst2"]["transfer_size"] = 8
    path.write_text(yaml.safe_dump(data))
    return path


def _run(config: Path, outs: list[Path], data_dir: Path) -> None:
    """One `kdlab run` process per folder, all at once (one torch thread each: on two cores they take the
    time of one, and processes running side by side must not disturb each other's numbers either)."""
    env = dict(os.environ, PYTHONHASHSEED="random")  # nothing may depend on the process's hash seed
    procs = []
    for out in outs:
        cmd = [sys.executable, "-m", "kdlab.cli", "run", str(config), "--out", str(out),
               "--data-dir", str(data_dir)]
        log = out.with_suffix(".log")
        procs.append((subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                       cwd=out.parent), log))
    for proc, log in procs:
        assert proc.wait(timeout=900) == 0, log.read_text()[-5000:]


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    return value


def _weight_files(out: Path) -> dict[str, bytes]:
    files = {}
    for pattern in ("**/*.safetensors", "**/*.npy", "**/answers.jsonl", "**/predictions_*"):
        for p in out.glob(pattern):
            files[p.relative_to(out).as_posix()] = p.read_bytes()
    return files


def test_same_config_gives_bit_identical_study_in_two_processes(tiny_data_dir: Path, tmp_path: Path) -> None:
    config = _tiny_study(tmp_path / "study.yaml", transfer=True)
    outs = [tmp_path / "a", tmp_path / "b"]
    _run(config, outs, tiny_data_dir)
    first, second = (_weight_files(out) for out in outs)
    assert any("teacher/" in name for name in first), sorted(first)
    assert any(name.startswith("runs/") and name.endswith(".safetensors") for name in first)
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"files differ between the two processes: {differing}"
    runs = [{r.id: (r.seed, _strip_timing(r.metrics)) for r in Registry(out / "registry.sqlite").runs()}
            for out in outs]
    assert runs[0] == runs[1]
    assert {r.split("-")[0] for r in runs[0]} >= {"teacher", "cache", "sft", "kd1", "kd2", "kd3"}
    # KD3's default map pairs the derived student's blocks (teacher blocks 0 and 3) with their sources.
    kd3 = next(r for r in Registry(outs[0] / "registry.sqlite").runs() if r.method == "kd3")
    assert kd3.params["layer_map"] == "auto" and kd3.params["layer_pairs"] == [[1, 1], [2, 4]]
    # The SST-2 transfer set (8 inputs, teacher-labelled) trains the KD runs, never SFT.
    transfer = json.loads((outs[0] / "data" / "sst2.json").read_text())["transfer"]
    manifest = json.loads((outs[0] / "teacher_cache" / "sst2" / "manifest.json").read_text())
    kept = manifest["answers"]["transfer"]
    assert len(transfer) == 8 and kept["total"] == 8 and kept["kept"] == 8
    examples = {r.method: r.metrics["train_examples"] for r in Registry(outs[0] / "registry.sqlite").runs()
                if r.kind == "student" and r.task == "sst2"}
    assert examples["sft"] == 24 and examples["kd1"] == examples["kd2"] == examples["kd3"] == 24 + 8
    # The seeds of every stage are recorded for the report.
    provenance = json.loads((outs[0] / "provenance.json").read_text())
    assert provenance["seeds"]["teacher-sst2"] == 7 and provenance["seeds"]["bootstrap"] == 7
    assert provenance["deterministic"] is False
    assert set(provenance["data"]["sst2"]["files"]) == {"sst2/train.tsv", "sst2/validation.tsv"}


def test_stage_seeds_come_from_the_config() -> None:
    assert stage_seed([5, 6], 99, "data") == 99
    assert stage_seed([5, 6], 99, "teacher") == 5
    assert stage_seed([5, 6], 99, "student", run_seed=6) == 6
    with pytest.raises(ValueError, match="unknown stage"):
        stage_seed([5], 99, "nonsense")


def test_deterministic_option_turns_on_deterministic_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process (was a fresh one, 18 s of imports): torch's setting is restored after, and the environment
    variable is undone by monkeypatch. That a study's `deterministic: true` reaches training is checked in
    tests/test_catches_study.py."""
    from kdlab.config import parse_config
    from kdlab.seeding import configure_determinism

    data = yaml.safe_load(preset_text("smoke"))
    data["deterministic"] = True
    config = parse_config(data)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    assert not before[0]
    try:
        configure_determinism(config.deterministic)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]
