"""One run sharded across two CPU processes with FSDP2 (gloo), launched as a user would launch it.

accelerate 1.15 turns FSDP on only on accelerators (on CPUs it silently trains with DDP); kdlab lets a CPU
launch shard for real (`distributed.fsdp_on_cpu`), which is what lets these tests run without GPUs.

Four launches share the module (about 50 s on a 2-core CPU): a DDP reference, an FSDP study asked for
through the `training:` section (TrainingArguments `fsdp` / `fsdp_config`, full state dict checkpoints),
and an FSDP study from an accelerate config file (sharded checkpoints, sharded live teacher) that crashes
after a checkpoint and is launched again. Every launch trains the same runs, so their students must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_study import _mini_config, _tail
from transformers import AutoModelForCausalLM

from kdlab.registry import Registry, RunRecord

RUNS = ("kd3-sst2-s1-lam0.5-seed1", "sft-sst2-s1-seed1")
CRASH_STEP = 2

# Imported by every rank through the study's `plugins:`. While KDLAB_TEST_CRASH_AT is set, every rank dies
# right after writing that step's checkpoint, as a lost node takes the whole job down; KDLAB_TEST_STEPS
# names a file where rank 0 notes each optimizer step it starts ("<run> <global step before it>").
CRASH_PLUGIN = '''
import os

from kdlab import training

_save_checkpoint = training.KDTrainer._save_checkpoint
_training_step = training.KDTrainer.training_step


def _crash_after(self, model, trial):
    _save_checkpoint(self, model, trial)
    if str(self.state.global_step) == os.environ.get("KDLAB_TEST_CRASH_AT"):
        os._exit(3)


def _noted_step(self, *args, **kwargs):
    if self.args.process_index == 0 and os.environ.get("KDLAB_TEST_STEPS"):
        with open(os.environ["KDLAB_TEST_STEPS"], "a") as fh:
            fh.write(f"{self.args.run_name} {self.state.global_step}\\n")
    return _training_step(self, *args, **kwargs)


training.KDTrainer._save_checkpoint = _crash_after
training.KDTrainer.training_step = _noted_step
'''

ACCELERATE_FSDP = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "mixed_precision": "no",
    "use_cpu": True,
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_reshard_after_forward": True,
        "fsdp_cpu_ram_efficient_loading": False,
    },
}


@dataclass
class Launch:
    out: Path
    log: Path
    returncode: int

    def runs(self) -> dict[str, RunRecord]:
        return {r.id: r for r in Registry(self.out / "registry.sqlite").runs()}

    def weights(self, run: str, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
        return load_file(self.out / "runs" / run / "model" / name)


def _study(root: Path, device: str = "cpu", **training: object) -> Path:
    """Two runs (sft, and kd3: learned projections and teacher hidden states) with a live teacher, a LoRA
    student merged on save, 24 examples in batches of 4 per rank."""
    data = _mini_config(root / "out")
    data["device"] = device
    data["methods"] = {"sft": {}, "kd3": {"lambda": 0.5}}
    data["tasks"]["sst2"].update(train_size=24, selection_size=8, eval_size=8)
    data["training"].update(batch_size=4, epochs=1, **training)
    data["cache"] = {"mode": "online"}
    data["plugins"] = ["kdlab_test_crash"]
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    (root / "kdlab_test_crash.py").write_text(CRASH_PLUGIN)
    return config


def _launch(root: Path, launcher: list[str], config: Path, data_dir: Path, name: str,
            **env: str) -> Launch:
    log = root / f"{name}.log"
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])  # the crash plugin's folder
    environ = dict(os.environ, PYTHONPATH=path, **env)
    # FSDP2 shards on CUDA whenever a GPU is visible: a CPU study hides them (docs/fsdp.md).
    if yaml.safe_load(config.read_text())["device"] == "cpu":
        environ["CUDA_VISIBLE_DEVICES"] = ""
    # `kdlab sweep`: every stage up to the student runs (the bench and report stages of a distributed
    # `kdlab run` are test_study's two-process launch).
    cmd = [*launcher, "-m", "kdlab.cli", "sweep", str(config), "--data-dir", str(data_dir)]
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=environ, cwd=root, timeout=600)
    return Launch(root / "out", log, proc.returncode)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _accelerate(config_file: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--main_process_port", str(port)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Launch:
    root = tmp_path_factory.mktemp("ddp")
    launch = _launch(root, _torchrun(), _study(root), tiny_data_dir, "ddp")
    assert launch.returncode == 0, _tail(launch.log)
    return launch


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Launch:
    root = tmp_path_factory.mktemp("fsdp")
    config = _study(root, fsdp="full_shard auto_wrap", fsdp_config={"version": 2})
    launch = _launch(root, _torchrun(), config, tiny_data_dir, "fsdp")
    assert launch.returncode == 0, _tail(launch.log)
    return launch


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        assert got[key].shape == value.shape, (what, key)
        # Same data, seed and steps; only the order of floating-point reductions differs.
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{what}: {key}")


def test_fsdp_study_trains_each_run_once_and_saves_full_students(fsdp: Launch, ddp: Launch) -> None:
    """`training: {fsdp: ..., fsdp_config: {version: 2}}` under torchrun: every run sharded over both ranks,
    trained once, and saved whole by rank 0 with the weights DDP trains.

    Catches FSDP silently replaced by DDP, a student saved from one rank's shard (missing or flattened
    tensors), the untrained weights saved instead of the gathered ones, and a gather that deadlocks."""
    text = fsdp.log.read_text()
    runs = fsdp.runs()
    assert set(runs) == {"teacher-sst2-zero-shot", *RUNS}
    assert all(r.status == "done" and r.attempts == 1 for r in runs.values()), runs
    for rid in RUNS:
        assert f"[fsdp] {rid}: trained sharded over 2 ranks (FSDP2, checkpoints FULL_STATE_DICT)" in text
        metrics = runs[rid].metrics
        assert metrics["steps"] == -(-metrics["train_examples"] // 8), metrics  # batches split over ranks
        model_dir = fsdp.out / "runs" / rid / "model"
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        saved = fsdp.weights(rid)
        assert set(model.state_dict()) >= set(saved)
        _assert_same_weights(saved, ddp.weights(rid), rid)
        init = load_file(fsdp.out / "students" / "s1" / "init" / "model.safetensors")
        changed = [k for k in init if "q_proj" in k and not torch.equal(init[k], saved[k])]
        assert changed, "the saved student is the initial one"  # LoRA trained, then merged
    _assert_same_weights(fsdp.weights(RUNS[0], "kd3_projections.safetensors"),
                         ddp.weights(RUNS[0], "kd3_projections.safetensors"), "projections")
    assert "live teacher replicated" in text


def test_fsdp_run_resumes_from_its_sharded_checkpoint(tmp_path: Path, tiny_data_dir: Path,
                                                     ddp: Launch) -> None:
    """`accelerate launch --config_file fsdp.yaml` (SHARDED_STATE_DICT, live teacher sharded): the job dies
    on every rank right after the step-2 checkpoint; launched again, the run continues from that
    checkpoint and ends with the weights of the uninterrupted DDP run.

    Catches checkpoints written by rank 0 alone (the other shard lost), a resume that starts over or
    loads weights without the optimizer state, and a sharded teacher whose outputs differ."""
    accelerate_config = tmp_path / "fsdp.yaml"
    accelerate_config.write_text(yaml.safe_dump(ACCELERATE_FSDP))
    config = _study(tmp_path, save_steps=1, teacher_sharding="shard")
    launcher = _accelerate(accelerate_config, port=29000 + os.getpid() % 1000)
    env: dict[str, str] = {}

    crashed = _launch(tmp_path, launcher, config, tiny_data_dir, "crashed",
                      KDLAB_TEST_CRASH_AT=str(CRASH_STEP), **env)
    assert crashed.returncode != 0, _tail(crashed.log)
    first = RUNS[0]  # runs go in the order of the methods' names
    assert "live teacher sharded" in crashed.log.read_text()
    trainer = crashed.out / "runs" / first / "trainer"
    assert sorted(p.name for p in trainer.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, 3)]
    checkpoint = trainer / f"checkpoint-{CRASH_STEP}"
    # One shard file per rank for the weights and for the optimizer state, no kdlab trainable-only file.
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert len(list((checkpoint / "optimizer_0").glob("*.distcp"))) == 2
    assert not (checkpoint / "trainable.safetensors").exists()
    assert crashed.runs()[first].status == "running"  # its owner died

    steps = tmp_path / "steps.txt"
    resumed = _launch(tmp_path, launcher, config, tiny_data_dir, "resumed",
                      KDLAB_TEST_STEPS=str(steps), **env)
    assert resumed.returncode == 0, _tail(resumed.log)
    text = resumed.log.read_text()
    assert f"[resume] {first} from {checkpoint}" in text
    runs = resumed.runs()
    assert runs[first].status == "done" and runs[first].attempts == 2
    assert runs[RUNS[1]].status == "done" and runs[RUNS[1]].attempts == 1
    # The resumed launch took only the steps after the checkpoint; the other run, all of its steps.
    started: dict[str, list[int]] = {}
    for line in steps.read_text().splitlines():
        run, step = line.split()
        started.setdefault(run, []).append(int(step))
    assert started[first] == list(range(CRASH_STEP, runs[first].metrics["steps"])), started
    assert started[RUNS[1]] == list(range(runs[RUNS[1]].metrics["steps"])), started
    for rid in RUNS:
        _assert_same_weights(resumed.weights(rid), ddp.weights(rid), rid)
    _assert_same_weights(resumed.weights(first, "kd3_projections.safetensors"),
                         ddp.weights(first, "kd3_projections.safetensors"), "projections")



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp_on_gpus_through_accelerate(tmp_path: Path, tiny_data_dir: Path) -> None:
    """The same study on two GPUs, where accelerate enables FSDP itself (NCCL, no CPU adaptation)."""
    accelerate_config = tmp_path / "fsdp.yaml"
    accelerate_config.write_text(yaml.safe_dump(dict(ACCELERATE_FSDP, use_cpu=False)))
    config = _study(tmp_path, device="cuda", save_steps=1, teacher_sharding="shard")
    launcher = _accelerate(accelerate_config, port=29000 + os.getpid() % 1000)
    launch = _launch(tmp_path, launcher, config, tiny_data_dir, "gpu")
    assert launch.returncode == 0, _tail(launch.log)
    text = launch.log.read_text()
    runs = launch.runs()
    for rid in RUNS:
        assert runs[rid].status == "done" and runs[rid].attempts == 1
        assert f"[fsdp] {rid}: trained sharded over 2 ranks (FSDP2, checkpoints SHARDED_STATE_DICT)" in text
        checkpoint = launch.out / "runs" / rid / "trainer" / "checkpoint-1"
        assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
        model, info = AutoModelForCausalLM.from_pretrained(launch.out / "runs" / rid / "model",
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
