"""The whole study recipe on tiny models and the synthetic data folder.

One smoke study is shared by the tests of this module (it is the expensive part): it is started as a
`kdlab run --preset smoke` subprocess, SIGKILLed once the first student run is done, and finished in
process. The end-to-end checks, the kill/resume checks and the no-op re-run all read that one study.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

import kdlab.stages.sweep
from kdlab.cli import main
from kdlab.config import parse_config, preset_text
from kdlab.registry import Registry, RunRecord, default_owner
from kdlab.study import Study
from kdlab.tasks import get_task

KILL_TIMEOUT = 240  # seconds to reach the first finished student run (about 15 s on an idle 2-core CPU)
WORKER_TIMEOUT = 120  # seconds for the resumed study's second worker to take a run (about 6 s idle)




@dataclass
class SmokeStudy:
    out: Path
    data_dir: Path
    before_kill: dict[str, RunRecord]  # registry rows at the moment of the kill
    seconds_to_kill: float
    seconds_to_finish: float

    def registry(self) -> Registry:
        return Registry(self.out / "registry.sqlite")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no log>"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> SmokeStudy:
    root = tmp_path_factory.mktemp("smoke")
    out = root / "out"
    log = root / "killed_run.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdlab.cli", "run", "--preset", "smoke", "--out", str(out),
             "--data-dir", str(tiny_data_dir)],
            stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=root,
        )
        try:
            registry = None
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the study exited ({proc.returncode}) before the kill:\n{_tail(log)}")
                if time.perf_counter() - start > KILL_TIMEOUT:
                    pytest.fail(f"no student run finished within {KILL_TIMEOUT}s:\n{_tail(log)}")
                if registry is None and (out / "registry.sqlite").is_file():
                    registry = Registry(out / "registry.sqlite")
                # Kill once a student run is done and the next one has started, so that the kill lands
                # mid-run and the resumed study must reclaim a run whose owner died.
                if registry is not None and registry.runs(kind="student", status="done") \
                        and registry.runs(kind="student", status="running"):
                    break
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.perf_counter()
    before = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    # Finished with two sweep workers (this process and one `kdlab sweep` it starts): the rest of the runs
    # are shared between them. A tiny run takes a fraction of a second, less than the second worker needs
    # to start, so this process's first run waits until the other worker holds one of its own.
    real = kdlab.stages.sweep.run_job
    registry = Registry(out / "registry.sqlite")
    mine = {None, default_owner(), *(r.owner for r in before.values())}  # and the killed process's

    def after_the_other_worker_starts(*args, **kwargs):
        start = time.perf_counter()
        while not any(r.owner not in mine for r in registry.runs(kind="student")):
            if time.perf_counter() - start > WORKER_TIMEOUT:
                pytest.fail(f"the second worker took no run:\n{_tail(out / 'logs' / 'sweep-worker-1.log')}")
            time.sleep(0.05)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kdlab.stages.sweep, "run_job", after_the_other_worker_starts)
        code = main(["run", "--preset", "smoke", "--out", str(out), "--data-dir", str(tiny_data_dir),
                     "--workers", "2"])
    assert code == 0
    return SmokeStudy(out, tiny_data_dir, before, killed_at - start, time.perf_counter() - killed_at)


def _expected_student_runs() -> set[str]:
    ids = set()
    for task in ("sst2", "squad"):
        ids |= {f"sft-{task}-s1-seed1", f"sft-{task}-s1-seed2",
                f"kd1-{task}-s1-lam0.5-seed1", f"kd1-{task}-s1-lam1-seed1",
                f"kd2-{task}-s1-lam0.5-seed1", f"kd2-{task}-s1-lam0.5-seed2",
                f"kd3-{task}-s1-lam0.5-seed1", f"kd3-{task}-s1-lam0.5-seed2"}
    return ids


def test_smoke_study_end_to_end(smoke: SmokeStudy) -> None:
    print(f"smoke study: {smoke.seconds_to_kill:.1f}s to the kill (subprocess), "
          f"{smoke.seconds_to_finish:.1f}s to finish in process")
    runs = {r.id: r for r in smoke.registry().runs()}
    assert all(r.status == "done" for r in runs.values()), {i: r.status for i, r in runs.items()}
    teacher = {i for i, r in runs.items() if r.kind == "teacher"}
    assert teacher == {"teacher-sst2-zero-shot", "teacher-sst2", "teacher-squad-zero-shot", "teacher-squad",
                       "cache-sst2", "cache-squad"}
    assert runs["cache-sst2"].metrics["cache"]["topk_bytes_per_token"] <= 128
    students = {i: r for i, r in runs.items() if r.kind == "student"}
    # The runs left at the kill were shared by the two workers of the resumed study, each run done once.
    left = {i for i in students if i not in smoke.before_kill or smoke.before_kill[i].status != "done"}
    resumed = {students[i].owner for i in left}
    assert len(resumed) == 2, resumed
    assert (smoke.out / "logs" / "sweep-worker-1.log").is_file()
    # kd1 has a two-point grid on seed 1; its best point is run again on seed 2 (whichever it is).
    kd1_final = {i for i in students if i.startswith("kd1-") and i.endswith("-seed2")}
    assert len(kd1_final) == 2
    assert set(students) - kd1_final == _expected_student_runs()
    assert {(r.method, r.task) for r in students.values()} == {
        (m, t) for m in ("sft", "kd1", "kd2", "kd3") for t in ("sst2", "squad")}
    for r in students.values():
        assert r.metrics is not None and "eval" in r.metrics
        # Only kd1 has several settings to choose from: the others skip the selection split.
        assert ("selection" in r.metrics) == (r.method == "kd1")
    # Every recorded eval metric is what its predictions file scores against the data's eval examples.
    for r in students.values():
        task = get_task(r.task)
        eval_ids = set(json.loads((smoke.out / "data" / f"{r.task}.json").read_text())["eval"])
        reference = smoke.data_dir / {"sst2": "sst2/validation.tsv", "squad": "squad/dev-v1.1.json"}[r.task]
        examples = [ex for ex in task.read_references(reference) if ex.id in eval_ids]
        assert len(examples) == len(eval_ids)
        predictions = task.read_predictions(Path(r.output_dir) / task.predictions_file("eval"))
        scored = task.score(predictions, examples)
        for metric, value in scored.items():
            assert r.metrics["eval"][metric] == pytest.approx(value, abs=1e-6), (r.id, metric)

    out = smoke.out
    assert (out / "results.csv").is_file()
    summary, report = (out / "summary.md").read_text(), (out / "report.md").read_text()
    for method in ("sft", "kd1", "kd2", "kd3"):
        assert method in summary.lower(), method
    assert "summary.md" in report
    assert (out / "study.yaml").is_file()
    for rid, r in students.items():
        folder = out / "runs" / rid
        assert Path(r.output_dir) == folder
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        assert model.config.num_hidden_layers == 2  # the derived student
        assert not (folder / "model" / "adapter_config.json").exists()  # LoRA merged (save: merged)
        assert (folder / "model" / "kd3_projections.safetensors").is_file() == (r.method == "kd3")
        assert list(folder.glob("predictions_eval.*"))
        assert bool(list(folder.glob("predictions_selection.*"))) == (r.method == "kd1")
    assert AutoModelForCausalLM.from_pretrained(out / "teacher" / "sst2").config.num_hidden_layers == 4
    for task in ("sst2", "squad"):
        assert (out / "teacher_cache" / task / "manifest.json").is_file()


def test_killed_study_resumes_running_each_run_once(smoke: SmokeStudy) -> None:
    before = smoke.before_kill
    done_before = {i for i, r in before.items() if r.status == "done"}
    assert any(before[i].kind == "student" for i in done_before)
    after = {r.id: r for r in smoke.registry().runs()}
    assert set(before) <= set(after) and set(after) - done_before  # the kill did interrupt the study
    interrupted = [i for i, r in before.items() if r.status == "running"]
    print(f"killed with {len(done_before)} runs done, running: {interrupted}")
    for rid, r in after.items():
        assert r.status == "done", rid
        if rid in done_before:  # finished before the kill: not run again
            assert r.attempts == 1 and r.finished_at == before[rid].finished_at, rid
        elif rid in before and before[rid].status == "running":  # killed mid-run: redone once
            assert r.attempts == 2, rid
        else:
            assert r.attempts == 1, rid
    assert not list((smoke.out / "students" / "s1").glob("*.partial"))


def test_rerun_does_no_training(smoke: SmokeStudy, no_training: None) -> None:
    before = {r.id: (r.status, r.attempts, r.finished_at, r.metrics) for r in smoke.registry().runs()}
    start = time.perf_counter()
    study = Study(parse_config(yaml.safe_load(preset_text("smoke"))), output_dir=smoke.out,
                  data_dir=smoke.data_dir)
    results = study.run()
    seconds = time.perf_counter() - start
    print(f"no-op re-run: {seconds:.1f}s")
    assert not study.failed
    assert set(results["run"]) == {r.id for r in smoke.registry().runs()}  # the Python API's results table
    assert (results["status"] == "done").all()
    after = {r.id: (r.status, r.attempts, r.finished_at, r.metrics) for r in smoke.registry().runs()}
    assert after == before


def _mini_config(out: Path):
    """The smoke preset cut down to one task, one method, one seed and an unadapted teacher."""
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}}
    data["seeds"] = [1]
    data["output_dir"] = str(out)
    return data


def test_failed_run_is_recorded_and_redone(tiny_data_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(_mini_config(out)))
    real = kdlab.stages.sweep.run_job

    def broken(job, ranks=None, **held):
        raise RuntimeError("boom: simulated crash")

    monkeypatch.setattr(kdlab.stages.sweep, "run_job", broken)
    argv = ["run", str(config), "--data-dir", str(tiny_data_dir)]
    assert main(argv) == 1  # the study finishes what it can and reports the failure
    registry = Registry(out / "registry.sqlite")
    run = registry.get("sft-sst2-s1-seed1")
    assert run is not None and run.status == "failed" and run.attempts == 1
    assert "boom: simulated crash" in (run.error or "")
    assert registry.get("teacher-sst2-zero-shot").status == "done"
    err = capsys.readouterr().err
    assert "sft-sst2-s1-seed1" in err  # status on stderr
    # where the time went, stage by stage
    line = next(x for x in err.splitlines() if "[study] time by stage:" in x)
    stages = [part.split()[0] for part in line.split("time by stage: ")[1].split(", ")]
    assert stages == ["data", "teacher", "students", "cache", "sweep", "benchmarks", "bench", "report"]

    monkeypatch.setattr(kdlab.stages.sweep, "run_job", real)
    assert main(argv) == 0
    run = registry.get("sft-sst2-s1-seed1")
    assert run.status == "done" and run.attempts == 2 and run.error is None
    assert registry.get("teacher-sst2-zero-shot").attempts == 1  # not redone
    assert AutoModelForCausalLM.from_pretrained(out / "runs" / "sft-sst2-s1-seed1" / "model")


def test_two_sweeps_share_the_study(tiny_data_dir: Path, tmp_path: Path) -> None:
    """Two `kdlab sweep` processes on one --out: every run (teacher, cache, students) is done exactly once.

    Catches claims that are not transactional, a cache or derived student built twice at once, and a
    grid whose best setting is chosen before the other process finished its grid runs."""
    out = tmp_path / "out"
    data = _mini_config(out)
    data["teacher"]["adapt"] = True
    # (KD3 was here too: the smoke study covers its path; it added two runs and nothing to the sharing.)
    data["methods"] = {"sft": {}, "kd1": {"lambda": [0.5, 1.0], "top_k": 8}}
    data["seeds"] = [1, 2]
    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "kdlab.cli", "sweep", str(config), "--data-dir", str(tiny_data_dir)]
    logs = [tmp_path / f"sweep{i}.log" for i in range(2)]
    procs = [subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ),
                              cwd=tmp_path) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=600) == 0, _tail(log)
    runs = Registry(out / "registry.sqlite").runs()
    ids = {r.id for r in runs}
    assert {"teacher-sst2", "cache-sst2", "sft-sst2-s1-seed1", "sft-sst2-s1-seed2"} <= ids
    # the best kd1 setting also ran on the second seed, after both grid runs had finished
    assert any(r.id.startswith("kd1-sst2-s1-") and r.seed == 2 for r in runs)
    assert all(r.status == "done" for r in runs), [(r.id, r.status) for r in runs]
    assert all(r.attempts == 1 for r in runs), [(r.id, r.attempts) for r in runs]


# Imported by every rank of the `device: cpu` launch (a `plugins:` entry): torch reports a GPU, and any
# initialisation of CUDA raises, so code that would pick or touch the GPU despite `device: cpu` fails the run
# on any machine. The optimizer's own graph-capture check (torch.optim, every step, whenever an accelerator
# is visible) is answered with an idle stream: it is torch's, not a choice kdlab or the Trainer makes.
CUDA_TRIPWIRE = """
import torch

def _tripwire(name):  # one function per name: torch._dynamo refuses one object under two torch names
    def touched(*args, **kwargs):
        raise RuntimeError(f"CUDA used in a `device: cpu` study (torch.cuda.{name})")
    return touched

class _IdleStream:
    def is_capturing(self):
        return False

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
for _name in ("_lazy_init", "init", "set_device", "current_device", "get_device_name",
              "get_device_properties", "synchronize", "mem_get_info", "get_rng_state", "get_rng_state_all",
              "is_bf16_supported"):
    setattr(torch.cuda, _name, _tripwire(_name))
torch.accelerator.is_available = lambda: True
torch.accelerator.device_count = lambda: 1
torch.accelerator.current_accelerator = lambda check_available=False: torch.device("cuda")
torch.accelerator.current_stream = lambda device=None: _IdleStream()
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_two_process_launch_trains_each_run_once_across_ranks(tiny_data_dir: Path, tmp_path: Path,
                                                              device: str) -> None:
    """`torchrun --nproc_per_node 2 -m kdlab.cli run`: one study, two ranks. Each run happens once, with its
    batches sharded across the ranks (fewer optimizer steps than one process takes).

    `device: cpu`: gloo, and no rank may use CUDA, even where torch sees a GPU (the tripwire above; the GPUs
    are also hidden from the launch, as torch's optimizer queries the current CUDA stream in any process that
    sees one). `device: cuda`: NCCL, one GPU per rank; skipped with fewer than two GPUs.

    Catches ranks that claim different runs (a deadlock in the DDP collectives), a non-leader writing the
    registry, and a rank skipping a training run the others entered."""
    import torch

    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (one per rank)")
    out = tmp_path / "out"
    data = _mini_config(out)
    data["device"] = device
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "top_k": 8}}
    data["tasks"]["sst2"].update(train_size=24, selection_size=8, eval_size=8)
    data["training"].update(batch_size=4, epochs=1)
    env = dict(os.environ)
    if device == "cpu":
        tripwire = tmp_path / "cuda_tripwire.py"
        tripwire.write_text(CUDA_TRIPWIRE)
        data["plugins"] = [str(tripwire)]
        env["CUDA_VISIBLE_DEVICES"] = ""
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(data))
    log = tmp_path / "ddp.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdlab.cli", "run", str(config), "--data-dir", str(tiny_data_dir)]
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, _tail(log)
    assert "CUDA used" not in log.read_text()
    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    assert set(runs) == {"teacher-sst2-zero-shot", "cache-sst2", "sft-sst2-s1-seed1",
                         "kd1-sst2-s1-lam0.5-seed1"}
    assert all(r.status == "done" and r.attempts == 1 for r in runs.values())
    for rid in ("sft-sst2-s1-seed1", "kd1-sst2-s1-lam0.5-seed1"):
        metrics = runs[rid].metrics
        # 24 examples (fewer if some were too long), batch 4 per rank, 2 ranks: half the steps of 1 process
        assert metrics["steps"] == -(-metrics["train_examples"] // 8), metrics
        assert AutoModelForCausalLM.from_pretrained(out / "runs" / rid / "model")
    assert "[done] sft-sst2-s1-seed1" in log.read_text()


def test_changed_settings_under_a_finished_run_need_force(tiny_data_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    data = _mini_config(out)
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(data))
    argv = ["sweep", str(config), "--data-dir", str(tiny_data_dir)]  # the check is the sweep's: no report
    assert main(argv) == 0
    data["training"]["learning_rate"] = 0.0005  # the finished SFT run no longer matches the study
    config.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sft-sst2-s1-seed1" in err and "--force" in err
    # refused up front (kdlab.preflight), before the changed config was written over the study's
    assert yaml.safe_load((out / "study.yaml").read_text())["training"]["learning_rate"] == 0.001
    registry = Registry(out / "registry.sqlite")
    before = registry.get("sft-sst2-s1-seed1")
    assert before.status == "done" and before.attempts == 1  # refused: the old result is untouched
    assert main([*argv, "--force"]) == 0
    after = registry.get("sft-sst2-s1-seed1")
    assert after.status == "done" and after.finished_at > before.finished_at
    assert after.config_hash != before.config_hash


def test_student_with_another_vocabulary_is_refused_at_start(tiny_data_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer

    other = tmp_path / "other-student"
    tokenizer = build_tiny_tokenizer(vocab_size=300)  # not the teacher's 512-token vocabulary
    build_tiny_llama(tokenizer, num_layers=2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    data = _mini_config(out)
    data["students"] = [{"name": "s9", "model": str(other)}]
    data["methods"] = {"sft": {}, "gkd": {"lambda": 0.5, "seq_kd": True}}  # no cross-tokenizer form
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "students.s9" in err and "methods.gkd" in err and "seq_kd" in err
    assert not out.exists()  # refused before any work: nothing trained, nothing written


def test_vllm_backend_without_vllm_is_refused_before_any_work(tiny_data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluation.backend: vllm` on a machine without vLLM: exit 2 naming the field and the install command,
    and no study folder (not an ImportError after the teacher stages)."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    out = tmp_path / "out"
    data = _mini_config(out)
    data["evaluation"] = {"backend": "vllm"}
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.backend" in err and "kdlab[vllm]" in err
    assert not out.exists()


@pytest.mark.parametrize(("device", "hidden"), [("cpu", True), ("auto", False)])
def test_a_cpu_study_hides_the_gpus_from_its_process(device: str, hidden: bool, tiny_data_dir: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`device: cpu` through the CLI sets CUDA_VISIBLE_DEVICES="" before torch starts CUDA (torch itself
    reaches for a visible GPU otherwise); any other device leaves the user's choice of GPUs alone."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    data = _mini_config(tmp_path / "out")
    data["device"] = device
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir), "--dry-run"]) == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ("" if hidden else "0,1")


def test_vllm_backend_reaches_every_generation_of_a_study(tiny_data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluation.backend: vllm` (vLLM replaced by a stand-in that records its engines): the teacher's
    zero-shot and adapted evaluations, the cache's teacher answers (KD2) and a merged student's evaluation all
    generate through it, each from the folder holding those weights."""
    from vllm_standin import VLLMStandIn

    standin = VLLMStandIn(answer=lambda ids: " the answer\n")  # vLLM's documented keyword arguments only
    monkeypatch.setitem(sys.modules, "vllm", standin.module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a, _real=importlib.util.find_spec:
                        object() if name == "vllm" else _real(name, *a))
    out = tmp_path / "out"
    data = yaml.safe_load(preset_text("smoke"))
    data.update(output_dir=str(out), seeds=[1], methods={"kd2": {"lambda": 0.5}})
    data["tasks"] = {"squad": data["tasks"]["squad"]}
    data["students"][0]["save"] = "merged"
    data["evaluation"]["backend"] = "vllm"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(config), "--data-dir", str(tiny_data_dir)]) == 0  # every generation but bench's
    engines = [engine["model"] for engine in standin.engines]
    teacher = str(out / "teacher" / "squad")
    student = str(out / "runs" / "kd2-squad-s1-lam0.5-seed1" / "model")
    assert engines.count(teacher) == 3  # adapted teacher: selection + eval, then the cache's answers
    assert engines.count(student) == 1  # the student has one setting: evaluated on eval only
    assert len(engines) == 6 and len(set(engines)) == 3  # and the base teacher's zero-shot selection + eval
    answers = Registry(out / "registry.sqlite").get("cache-squad").metrics["cache"]["answers"]
    assert answers["total"] > 0 and answers["empty"] == 0  # every stand-in answer was " the answer"
