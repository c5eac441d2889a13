"""`--executor ray`: student runs as tasks on a Ray cluster, the driver the registry's only writer.

One local Ray cluster (2 CPUs, started in this process) serves the module. The Ray study of the first test
is compared with the same study run locally; the driver tests start a driver as a subprocess, refuse a
second one, kill the first mid-sweep and start it again; the worker test kills the Ray worker training a
student and checks the run is retried and resumes. The rest needs no cluster.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from kdlab import ray_executor
from kdlab.cli import main
from kdlab.config import ConfigError, load_preset, preset_text
from kdlab.registry import (
    Registry,
    RunSpec,
    check_local_sharing,
    filesystem_type,
    network_filesystem,
)
from kdlab.training import drop_incomplete_checkpoints

ray = pytest.importorskip("ray")

TIMEOUT = 300  # seconds for any one wait below (a few seconds each on an idle 2-core CPU)
# Columns of results.csv that measure time, not results.
VOLATILE = ("eval_seconds", "selection_seconds", "train_runtime", "wall_time")


def _config(out: Path, methods: dict, seeds: list[int], adapt: bool = False, **training) -> dict:
    """The smoke preset on SST-2 alone, no bench."""
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = adapt
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = methods
    data["seeds"] = seeds
    data["bench"] = {"enabled": False}
    data["training"].update(training)
    data["output_dir"] = str(out)
    return data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no log>"


def _until(what: str, check, timeout: float = TIMEOUT, log: Path | None = None):
    start = time.perf_counter()
    while not (value := check()):
        if time.perf_counter() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s" + (f"\n{_tail(log)}" if log else ""))
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster for the module; its address, for drivers in other processes. What `ray.init` leaves
    in this process (environment variables such as PYTHONBREAKPOINT, a SIGTERM handler) is undone after."""
    environ, sigterm = dict(os.environ), signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)
        signal.signal(signal.SIGTERM, sigterm)


# ---------------------------------------------------------------------------------------------------------
# the same study, locally and on Ray


SMOKE_METHODS = {"sft": {}, "kd1": {"lambda": [0.5, 1.0], "temperature": 2.0, "top_k": 8},
                 "kd2": {"lambda": 0.5}, "kd3": {"lambda": 0.5, "layer_map": "auto"}}


def test_ray_study_gives_the_local_results(cluster: str, tiny_data_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The smoke study (SST-2: every method, kd1's grid, one seed) through `--executor ray`: the same
    results.csv rows as the local executor (only the timings differ), the same training losses, every run
    done exactly once, each student run by one Ray task attempt. (A second seed, which runs after the
    grid's best setting is chosen, is the driven study's: `driven` below.)"""
    outs = {}
    for kind in ("local", "ray"):
        out = tmp_path / kind
        config = _write(tmp_path / f"{kind}.yaml", _config(out, SMOKE_METHODS, [1], adapt=True))
        start = time.perf_counter()
        argv = ["run", str(config), "--data-dir", str(tiny_data_dir), "--executor", kind]
        assert main(argv + (["--address", cluster] if kind == "ray" else [])) == 0
        print(f"{kind}: {time.perf_counter() - start:.1f}s")
        outs[kind] = out
    err = capsys.readouterr().err
    local, remote = (pd.read_csv(outs[k] / "results.csv").set_index("run") for k in ("local", "ray"))
    assert remote.index.is_unique and len(remote) == 8  # teacher x3 (zero-shot, adapted, cache) + 5 runs
    # Times (and the costs made of them: *_seconds, cost_*_s) differ between any two runs.
    volatile = [c for c in local.columns if c in VOLATILE or c.endswith(("_seconds", "_s"))]
    pd.testing.assert_frame_equal(local.drop(columns=volatile).sort_index(),
                                  remote.drop(columns=volatile).sort_index())
    assert (remote["status"] == "done").all() and (remote["attempts"] == 1).all()
    students = [r for r in remote.index if remote.loc[r, "kind"] == "student"]
    assert len(students) == 5 and set(remote.loc[students, "method"]) == set(SMOKE_METHODS)
    for rid in students:
        losses = [[(e.get("step"), e.get("loss")) for e in json.loads((outs[k] / "runs" / rid /
                                                                       "log_history.json").read_text())]
                  for k in ("local", "ray")]
        assert losses[0] == losses[1] and any(loss is not None for _, loss in losses[0]), rid
        task = ray_executor.read_task_record(outs["ray"] / "runs" / rid)
        assert task is not None and len(task["attempts"]) == 1, rid  # trained in a Ray worker, once
        assert task["attempts"][0]["pid"] != os.getpid()
        assert ray_executor.read_task_record(outs["local"] / "runs" / rid) is None
    # one status line per finished run, with the cluster's totals
    assert "[done] sft-sst2-s1-seed1: " in err and "ray: " in err and "1 node(s), CPU " in err
    registry = Registry(outs["ray"] / "registry.sqlite", readonly=True)
    assert registry.live_driver() is None  # the driver gave the study up when it finished
    view = registry.note("ray")
    assert set(view["runs"]) == set(students) and {v["state"] for v in view["runs"].values()} == {"done"}
    assert Registry(outs["local"] / "registry.sqlite", readonly=True).note("ray") is None


# ---------------------------------------------------------------------------------------------------------
# the driver: a second one refused, a killed one started again


@dataclass
class DrivenStudy:
    out: Path
    before_kill: dict  # registry rows when the first driver was killed
    second_code: int  # exit code of the second driver, started while the first lived
    second_err: str
    status_while_running: str
    first_pid: int
    restart_code: int


@pytest.fixture(scope="module")
def driven(cluster: str, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DrivenStudy:
    root = tmp_path_factory.mktemp("driven")
    out = root / "out"
    # Two seeds, forty epochs (a second or so a run; the driver looks for started runs every 0.5 s): the first
    # seed's runs show as running, and are still in flight when the fixture kills the driver.
    config = _write(root / "study.yaml", _config(out, {"sft": {}, "kd1": {"lambda": [0.5, 1.0], "top_k": 8}},
                                                 [1, 2], epochs=40, logging_steps=20))
    argv = ["sweep", str(config), "--data-dir", str(tiny_data_dir), "--executor", "ray", "--address", cluster]
    log = root / "driver.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "kdlab.cli", *argv], stdout=fh,
                                stderr=subprocess.STDOUT, env=dict(os.environ), cwd=root)
        try:
            path = out / "registry.sqlite"
            _until("the driver's registry", path.is_file, log=log)
            registry = Registry(path, readonly=True)

            def mid_sweep() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"the driver exited ({proc.returncode}) before the kill:\n{_tail(log)}")
                runs = registry.runs(kind="student")
                # running in the registry (claimed) and in Ray's view (a worker started it)
                view = (registry.note("ray") or {}).get("runs", {}).values()
                return any(r.status == "done" for r in runs) and any(r.status == "running" for r in runs) \
                    and any(v.get("state") == "running" for v in view)

            _until("a student run done and another one running on a worker", mid_sweep, log=log)

            def status_with_a_run_on_a_worker() -> str | None:
                # Ray's view can be between runs (one done, the next still pending) when status reads it.
                if proc.poll() is not None:
                    pytest.fail(f"the driver exited ({proc.returncode}) before the kill:\n{_tail(log)}")
                text = io.StringIO()
                with contextlib.redirect_stdout(text):
                    assert main(["status", str(out)]) == 0
                return text.getvalue() if _run_on_a_worker(text.getvalue()) else None

            status = _until("status showing a run on a worker", status_with_a_run_on_a_worker, log=log)
            # In this process (another pid than the first driver's): quick, so the kill lands mid-sweep.
            second_err = io.StringIO()
            with contextlib.redirect_stderr(second_err):
                second_code = main(argv)
            before = {r.id: r for r in registry.runs()}
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    restart = main(argv)
    return DrivenStudy(out, before, second_code, second_err.getvalue(), status, proc.pid, restart)


def _run_on_a_worker(status: str) -> bool:
    """A run in flight on a node, as the worker reported it (host, ip, pid, attempt)."""
    return any(line.strip().startswith("running ") and " on " in line and "attempt 1" in line
               for line in status.splitlines())


def test_second_driver_is_refused_naming_the_first(driven: DrivenStudy) -> None:
    assert driven.second_code == 2, driven.second_err
    assert "already has a driver" in driven.second_err
    assert f":{driven.first_pid} (started" in driven.second_err  # host:pid of the first driver
    # the second driver took nothing: every run in flight belonged to the first
    running = [r for r in driven.before_kill.values() if r.status == "running"]
    assert running and all(r.owner.endswith(f":{driven.first_pid}") for r in running)


def test_status_shows_rays_view_while_the_driver_runs(driven: DrivenStudy) -> None:
    text = driven.status_while_running
    assert "ray: driver " in text and f":{driven.first_pid} driving" in text, text
    assert "CPU " in text and " running" in text
    assert _run_on_a_worker(text), text


def test_killed_driver_is_restarted_without_redoing_finished_runs(driven: DrivenStudy) -> None:
    assert driven.restart_code == 0
    before = driven.before_kill
    after = {r.id: r for r in Registry(driven.out / "registry.sqlite").runs()}
    done_before = {i for i, r in before.items() if r.status == "done"}
    running_before = {i for i, r in before.items() if r.status == "running"}
    assert any(before[i].kind == "student" for i in done_before) and running_before
    assert len([r for r in after.values() if r.kind == "student"]) == 5  # kd1 grid 2 + its best + sft 2
    for rid, r in after.items():
        assert r.status == "done", rid
        if rid in done_before:  # finished before the kill: kept, not run again
            assert r.attempts == 1 and r.finished_at == before[rid].finished_at, rid
        elif rid in running_before:  # in flight when the driver died: reclaimed and run once more
            assert r.attempts == 2, rid
        else:
            assert r.attempts == 1, rid
    registry = Registry(driven.out / "registry.sqlite", readonly=True)
    assert registry.live_driver() is None


# ---------------------------------------------------------------------------------------------------------
# a worker killed mid-training


def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(
    cluster: str, tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    steps, every = 60, 20
    data = _config(out, {"sft": {}}, [1], max_steps=steps, save_steps=every, batch_size=2, logging_steps=5)
    config = _write(tmp_path / "study.yaml", data)
    rid = "sft-sst2-s1-seed1"
    folder = out / "runs" / rid
    codes: list[int] = []
    argv = ["sweep", str(config), "--data-dir", str(tiny_data_dir), "--executor", "ray", "--address", cluster]
    driver = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    driver.start()

    def first_checkpoint() -> Path | None:
        if not driver.is_alive():
            pytest.fail(f"the driver ended before the kill: {capsys.readouterr().err[-3000:]}")
        done = sorted(folder.glob("trainer/checkpoint-*/trainer_state.json"))
        return done[0].parent if done else None

    checkpoint = _until("a complete checkpoint", first_checkpoint)
    task = ray_executor.read_task_record(folder)
    assert task is not None and len(task["attempts"]) == 1
    pid = task["attempts"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    assert not (folder / "trainer" / f"checkpoint-{steps}").exists()  # killed mid-training
    driver.join(TIMEOUT)
    assert not driver.is_alive() and codes == [0], capsys.readouterr().err[-3000:]

    run = Registry(out / "registry.sqlite").get(rid)
    assert run.status == "done" and run.attempts == 1  # one claim by the driver; Ray retried within it
    assert run.metrics["steps"] == steps
    task = ray_executor.read_task_record(folder)
    first, second = task["attempts"]
    assert first["pid"] == pid and second["pid"] != pid
    assert first["resume_from"] is None and first["dropped"] == []
    assert second["resume_from"] is not None
    assert int(Path(second["resume_from"]).name.split("-")[1]) >= int(checkpoint.name.split("-")[1])
    # The second attempt went on from its checkpoint: the checkpoints up to it were written before the
    # kill and never again (a restart from scratch would have rewritten them), the later ones after it.
    resumed = int(Path(second["resume_from"]).name.split("-")[1])
    for step in range(every, steps + 1, every):
        written = (folder / "trainer" / f"checkpoint-{step}" / "trainer_state.json").stat().st_mtime
        assert (written < killed) == (step <= resumed), (step, resumed)
    logged = [e["step"] for e in json.loads((folder / "log_history.json").read_text()) if "loss" in e]
    assert logged == sorted(set(logged)) and logged[-1] == steps  # one history, each step logged once
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"done     {rid} after 2 attempts" in text, text


def test_a_ray_task_hides_transformers_loading_bars(cluster: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's output is forwarded to the driver's terminal: there, as under a `kdlab` command, no bar for
    each checkpoint the run loads (cli._library_bars)."""
    import transformers.utils.logging

    transformers.utils.logging.enable_progress_bar()  # as a fresh worker has it
    seen = {}

    def run_job(job) -> dict:
        seen["bar shown"] = not transformers.utils.logging.tqdm(range(1), desc="Loading weights").disable
        return {}

    monkeypatch.setattr("kdlab.job.run_job", run_job)
    spec = RunSpec("sft-sst2-s1-seed1", kind="student", task="sst2", method="sft", student="s1", stage="grid",
                   seed=1, output_dir=str(tmp_path / "run"))
    try:
        ray_executor._train_in_worker(SimpleNamespace(spec=spec), "submission-1")
    finally:
        transformers.utils.logging.set_tqdm_hook(None)
    assert seen == {"bar shown": False}


# ---------------------------------------------------------------------------------------------------------
# no cluster needed


def test_without_ray_the_executor_says_how_to_install_it(tiny_data_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    data = _config(out, {"sft": {}}, [1])
    for argv in (["--executor", "ray"], []):
        if not argv:
            data["executor"] = {"kind": "ray"}  # the config asks for it
        config = _write(tmp_path / "study.yaml", data)
        assert main(["sweep", str(config), "--data-dir", str(tiny_data_dir), *argv]) == 2
        assert "pip install 'kdlab[ray]'" in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_status_shows_a_run_running_as_soon_as_a_worker_starts_it(tmp_path: Path) -> None:
    """The driver writes Ray's view when it sees a worker start a run, not only every VIEW_EVERY seconds:
    a run shorter than that would go from pending to done without `kdlab status` ever showing it running."""
    from kdlab.files import atomic_write_json

    rid = "sft-sst2-s1-seed1"
    folder = tmp_path / "runs" / rid
    spec = RunSpec(id=rid, kind="student", task="sst2", method="sft", student="s1", stage="grid", params={},
                   seed=1, config_hash="h", output_dir=str(folder))
    registry = Registry(tmp_path / "registry.sqlite")
    executor = object.__new__(ray_executor.RayExecutor)  # its state, with a Ray where no task ends
    now = time.time()
    executor.__dict__.update(
        ray=SimpleNamespace(wait=lambda refs, num_returns, timeout: ([], refs)), registry=registry,
        owner="driver-host:1", settings=SimpleNamespace(address="auto"), cluster={}, _cluster_at=now,
        _last_view=now,  # the view was written when the run was submitted, just now
        tasks={rid: ray_executor._Task(spec, "ref", "submission-1", now)},
        view={rid: {"state": "pending", "attempts": 0, "submitted": now}},
    )
    executor.wait(0.01)
    assert registry.note("ray") is None  # nothing new: the view is not rewritten before VIEW_EVERY
    atomic_write_json(folder / ray_executor.TASK_RECORD, {"submission": "submission-1", "attempts": [
        {"node": "n1", "host": "worker-host", "ip": "10.0.0.2", "pid": 4242, "started": now}]})
    executor.wait(0.01)
    lines = ray_executor.status_lines(registry)
    assert any(line.strip().startswith(f"running  {rid} on worker-host") and "attempt 1" in line
               for line in lines), lines
    assert _run_on_a_worker("\n".join(lines))
    atomic_write_json(folder / ray_executor.TASK_RECORD, {"submission": "submission-1", "attempts": [
        {"node": "n1", "host": "worker-host", "ip": "10.0.0.2", "pid": 4242, "started": now},
        {"node": "n2", "host": "other-host", "ip": "10.0.0.3", "pid": 77, "started": now + 1}]})
    executor.wait(0.01)  # a retry on another node: shown at once too
    lines = ray_executor.status_lines(registry)
    assert any(f"running  {rid} on other-host" in line and "attempt 2, retried 1x" in line
               for line in lines), lines


def test_executor_settings_config_and_flags() -> None:
    config = load_preset("smoke", ["executor.kind=ray", "executor.num_gpus=1", "executor.memory_gb=24"])
    assert config.executor.kind == "ray" and config.executor.num_gpus == 1
    assert config.executor.max_retries == 3
    settings = ray_executor.executor_settings(config, None, "ray://head:10001")
    assert settings.kind == "ray" and settings.address == "ray://head:10001" and settings.memory_gb == 24
    assert ray_executor.executor_settings(config, "local", None).kind == "local"
    with pytest.raises(ConfigError, match="executor.num_cpu"):
        load_preset("smoke", ["executor.num_cpu=2"])  # strict: a typo is refused
    with pytest.raises(ConfigError, match="executor.kind"):
        load_preset("smoke", ["executor.kind=slurm"])


MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export/home /home nfs4 rw,vers=4.2 0 0
/dev/sdb1 /home/alice/scratch xfs rw 0 0
lustre@tcp:/fs /lus/my\\040project lustre rw 0 0
"""


def test_filesystem_type_reads_the_mounts_table(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert filesystem_type("/home/bob/study", mounts) == "nfs4"
    assert filesystem_type("/home/alice/scratch/study", mounts) == "xfs"  # the deepest mount point wins
    assert filesystem_type("/home", mounts) == "nfs4"
    assert filesystem_type("/homestead/x", mounts) == "ext4"  # a prefix of a name is not a parent
    assert filesystem_type("/lus/my project/runs", mounts) == "lustre"  # \040 is a space
    assert network_filesystem("/home/bob/study", mounts) == "nfs4"
    assert network_filesystem("/lus/my project/runs", mounts) == "lustre"
    assert network_filesystem("/home/alice/scratch/study", mounts) is None
    assert network_filesystem("/tmp/x", mounts) is None
    assert filesystem_type("/tmp", tmp_path / "absent") is None


def test_half_written_checkpoints_are_dropped_before_a_retry(tmp_path: Path) -> None:
    trainer = tmp_path / "trainer"
    for step, state in ((20, "{}"), (40, None), (60, '{"glob')):  # whole, killed early, killed mid-json
        (trainer / f"checkpoint-{step}").mkdir(parents=True)
        (trainer / f"checkpoint-{step}" / "model.safetensors").write_text("x")
        if state is not None:
            (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert drop_incomplete_checkpoints(trainer) == ["checkpoint-40", "checkpoint-60"]
    assert [p.name for p in trainer.iterdir()] == ["checkpoint-20"]
    assert drop_incomplete_checkpoints(tmp_path / "absent") == []


def _held_by(registry: Registry, run: str, owner: str) -> None:
    registry.add(RunSpec(id=run, kind="student", task="sst2", method="sft", student="s1", stage="grid"))
    assert registry.claim(run, owner=owner)


def test_registry_used_by_another_host_is_refused_for_the_local_executor(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    registry = Registry(out / "registry.sqlite")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n")
    assert check_local_sharing(registry, mounts) == (
        f"{registry.path} lies on nfs4: fine for processes on this host; to spread a study over several "
        "hosts use `--executor ray`")
    _held_by(registry, "sft-sst2-s1-seed1", "gpu-node-7:4242")  # a live heartbeat from another host
    with pytest.raises(Exception, match=r"lies on nfs4\) is in use by another host now: gpu-node-7 .*"
                                        r"--executor ray"):
        check_local_sharing(registry, mounts)
    monkeypatch.setenv("KDLAB_ALLOW_SHARED_REGISTRY", "1")
    assert check_local_sharing(registry, mounts) is None  # the user vouches for the file system
    monkeypatch.delenv("KDLAB_ALLOW_SHARED_REGISTRY")
    # the command line refuses before any work, naming the other host
    config = _write(tmp_path / "study.yaml", _config(out, {"sft": {}}, [1]))
    assert main(["sweep", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "gpu-node-7 (running sft-sst2-s1-seed1)" in err and "--executor ray" in err
    assert not (out / "study.yaml").exists()
    # the other host's run went stale (no heartbeat for longer than stale_after): this host may go on
    assert check_local_sharing(Registry(out / "registry.sqlite", stale_after=0.0), mounts) is not None


def test_one_driver_per_study(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry.sqlite", stale_after=60)
    me = f"{registry.hostname}:{os.getpid()}"
    assert registry.claim_driver({"address": "auto"}, me) is None
    assert registry.claim_driver({}, me) is None  # the same process again: still its driver
    held = registry.claim_driver({}, "other-host:1")
    assert held["owner"] == me and held["address"] == "auto"
    assert registry.live_driver()["owner"] == me
    with pytest.raises(Exception, match=rf"already has a driver: {me} \(started .*Ray address auto"):
        ray_executor.refuse_second_driver(registry, "other-host:1")
    ray_executor.refuse_second_driver(registry, me)  # itself: not refused
    assert not registry.release_driver("other-host:1") and registry.release_driver(me)
    assert registry.live_driver() is None
    # a driver whose process is gone is replaced: same host by its pid, another host by its heartbeat
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    assert registry.claim_driver({}, f"{registry.hostname}:{dead}") is None
    assert registry.claim_driver({}, me) is None
    assert registry.claim_driver({}, "far-host:7") is not None  # this host's live driver keeps it
    assert registry.release_driver(me) and registry.claim_driver({}, "far-host:7") is None
    assert registry.claim_driver({}, me) is not None  # another host's driver with a fresh heartbeat
    stale = Registry(tmp_path / "registry.sqlite", stale_after=0.0)
    assert stale.claim_driver({}, me) is None  # its heartbeat is older than stale_after: replaced
