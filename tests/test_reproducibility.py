"""A study's numbers follow from its config alone: two fresh processes give bit-identical weights, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.config import preset_text
from kdlab.registry import Registry
from kdlab.seeding import stage_seed

# Fields of a run's metrics that measure time, not results.
TIMING_KEYS = {"seconds", "train_runtime"}


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


def _run(config: Path, out: Path, data_dir: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="random")  # nothing may depend on the process's hash seed
    cmd = [sys.executable, "-m", "kdlab.cli", "run", str(config), "--out", str(out),
           "--data-dir", str(data_dir)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=out.parent, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


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
    for out in outs:
        _run(config, out, tiny_data_dir)
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


def test_deterministic_option_turns_on_deterministic_kernels() -> None:
    # In a fresh process: the setting is global to torch and must not leak into other tests.
    code = (
        "import os, torch\n"
        "from kdlab.config import parse_config, preset_text\n"
        "import yaml\n"
        "data = yaml.safe_load(preset_text('smoke')); data['deterministic'] = True\n"
        "config = parse_config(data)\n"
        "from kdlab.seeding import configure_determinism\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "configure_determinism(config.deterministic)\n"
        "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", ":4096:8"]
