"""`executor.workers` / `--workers`: the extra sweep processes' command, threads and GPUs. A study shared by
two workers is checked end to end in tests/test_study.py (the smoke study is finished by two workers)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdlab import local_workers
from kdlab.config import ConfigError, parse_config, preset_text
from kdlab.ray_executor import executor_settings


def _study(device: str = "auto", data_dir: str | None = "/data") -> SimpleNamespace:
    return SimpleNamespace(out=Path("/runs/x"), data_dir=data_dir, config=SimpleNamespace(device=device))


def test_an_extra_worker_runs_the_same_study_with_one_worker() -> None:
    cmd = local_workers.worker_command(_study())
    # `--workers 1`: a worker that read executor.workers from study.yaml would start workers of its own.
    assert cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--out") + 1] == "/runs/x" and cmd[cmd.index("--data-dir") + 1] == "/data"
    assert cmd[cmd.index("--executor") + 1] == "local" and "sweep" in cmd
    assert "--data-dir" not in local_workers.worker_command(_study(data_dir=None))


def test_each_worker_gets_its_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_workers, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert local_workers.threads_per_worker(2) == 8
    assert local_workers.threads_per_worker(3) == 5
    assert local_workers.threads_per_worker(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert local_workers.threads_per_worker(2) == 3


def test_extra_workers_take_the_visible_gpus_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    study = _study()
    assert [local_workers.worker_gpu(study, i) for i in (1, 2, 3)] == ["1", "2", "0"]  # 0: this process's
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [local_workers.worker_gpu(study, i) for i in (1, 2)] == ["6", "4"]
    assert local_workers.worker_gpu(_study(device="cpu"), 1) is None  # a CPU study hides nothing


def test_workers_come_from_the_config_or_the_command_line() -> None:
    data = yaml.safe_load(preset_text("smoke"))
    data["executor"] = {"workers": 3}
    config = parse_config(data)
    assert executor_settings(config).workers == 3
    assert executor_settings(config, workers=1).workers == 1
    data["executor"] = {"workers": 0}
    with pytest.raises(ConfigError, match="executor.workers"):
        parse_config(data)
