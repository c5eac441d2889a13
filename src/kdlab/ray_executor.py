"""The sweep's student runs as tasks on a Ray cluster (`kdlab sweep --executor ray`).

One process, the driver, owns the study: it alone reads and writes the registry (SQLite must not be shared
across hosts), runs the teacher stages and caches, claims each student run and hands it to Ray as a task
with the resources the config asks (`executor:`), and records what comes back. A task receives the run's
`Job` (plain, frozen data: spec, settings, paths) and calls the same `run_job` a local sweep calls; it never
builds a `Study` or opens the registry. Results and models land in the study folder, which every node must
mount at the same path (docs/cluster.md says why). Ray schedules the tasks over the cluster and runs one
again when its worker or node dies (`max_retries`); the run then resumes from its last checkpoint
(`training.save_steps`).

A study has at most one live driver: the registry's `driver` note (host:pid, heartbeat) refuses a second.
A killed driver leaves its runs `running` under a dead owner: the next driver reclaims them, finished runs
stay finished. The driver keeps Ray's view of its runs (pending, running on which node, retried) in the
registry's `ray` note for `kdlab status`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.config import ConfigError, ExecutorSettings, StudyConfig
from kdlab.errors import RegistryError
from kdlab.files import atomic_write_json
from kdlab.job import Job, with_absolute_paths
from kdlab.layout import Layout
from kdlab.registry import Registry, RunRecord, RunSpec, check_local_sharing, default_owner

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView

log = logging.getLogger("kdlab")

INSTALL_HINT = "pip install 'kdlab[ray]'"
TASK_RECORD = "ray_task.json"  # in a run's folder: each attempt of its Ray task (node, pid, resumed from)
VIEW_EVERY = 2.0  # seconds between refreshes of the `ray` note while runs are in flight
POLL_EVERY = 0.5  # seconds between looks at which submitted runs a worker has started
BEAT_EVERY = 30.0  # seconds between heartbeats of the driver and its runs (stale after 600 s elsewhere)


def require_ray() -> Any:
    """The `ray` module, or a ConfigError saying how to install it (Ray is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"--executor ray needs Ray, an optional extra of kdlab: {INSTALL_HINT} (or pip install "
            "'ray>=2.9'), on the driver and on every node of the cluster"
        ) from None
    return ray


def executor_settings(
    config: StudyConfig, kind: str | None = None, address: str | None = None, workers: int | None = None
) -> ExecutorSettings:
    """The config's `executor:` with the command line's --executor / --address / --workers on top."""
    settings = config.executor
    if workers is not None:
        settings = settings.model_copy(update={"workers": workers})
    if kind is not None:
        settings = settings.model_copy(update={"kind": kind})
    if address is not None:
        settings = settings.model_copy(update={"address": address})
    if settings.kind == "ray":
        require_ray()  # refused before any work when Ray is missing
    return settings


def describe_driver(note: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(note.get("started", now)))
    seen = now - note.get("heartbeat", now)
    address = note.get("address") or "default"
    return f"{note.get('owner')} (started {started}, last seen {seen:.0f}s ago, Ray address {address})"


def driver_taken(folder: Path, held: dict[str, Any]) -> RegistryError:
    """The refusal of a second driver, naming the first."""
    return RegistryError(
        f"{folder} already has a driver: {describe_driver(held)}. One driver schedules a study's runs on "
        f"Ray; wait for it (`kdlab status {folder}` shows its progress) or stop it first. A driver that died "
        "is replaced at once on the same host, after 600 s without heartbeat from another"
    )


def refuse_second_driver(registry: Registry, owner: str | None = None) -> None:
    """RegistryError naming the live driver of the study when it is another process than `owner`."""
    held = registry.live_driver()
    if held and held.get("owner") != (owner or default_owner()):
        raise driver_taken(registry.path.parent, held)


def precheck(out: Path, settings: ExecutorSettings) -> None:
    """Before a command touches the study folder: refuse a second Ray driver, or a local process on a
    registry that another host is using (`check_local_sharing`). Reads only."""
    path = Layout(Path(out)).registry
    if not path.is_file():
        return
    registry = Registry(path, readonly=True)
    if settings.kind == "ray":
        refuse_second_driver(registry)
    else:
        check_local_sharing(registry)


# ---------------------------------------------------------------------------------------------------------
# the driver


@dataclasses.dataclass
class _Task:
    spec: RunSpec
    ref: Any  # the Ray ObjectRef of its result
    submission: str  # tells this submission's attempts from older ones in ray_task.json
    submitted: float


@contextlib.contextmanager
def driving(study: StudyView, settings: ExecutorSettings) -> Iterator[RayExecutor | None]:
    """For the stages of one command: the study's Ray driver (claimed, connected; given up at the end), or
    None for the local executor after checking that no other host uses the registry."""
    if settings.kind != "ray":
        if study.ranks.leader:
            note = check_local_sharing(study.registry)
            if note:
                study.log(f"[registry] {note}")
        yield None
        return
    if study.ranks.size > 1:
        raise ConfigError("--executor ray: start the driver as one process (Ray places each run), not under "
                          "torchrun or accelerate launch")
    executor = RayExecutor(study, settings)
    interrupted = True
    try:
        yield executor
        interrupted = False
    finally:
        executor.close(interrupted=interrupted)


class RayExecutor:
    """Hands student runs to Ray and records them (`sweep.RunExecutor`): the registry's only writer."""

    def __init__(self, study: StudyView, settings: ExecutorSettings):
        self.ray = require_ray()
        self.study = study
        self.settings = settings
        self.registry = study.registry
        self.owner = default_owner()
        self.tasks: dict[str, _Task] = {}  # run id -> its task in flight
        self.view: dict[str, dict[str, Any]] = {}  # run id -> what the `ray` note says about it
        self.cluster: dict[str, Any] = {}
        self._cluster_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_view = 0.0
        held = self.registry.claim_driver({"address": settings.address, "executor": "ray"}, self.owner)
        if held is not None:
            raise driver_taken(study.out, held)
        self._connected_here = False
        try:
            if not self.ray.is_initialized():
                self.ray.init(address=settings.address, log_to_driver=True, configure_logging=False)
                self._connected_here = True
            self._remote = self.ray.remote(_train_in_worker)
        except BaseException:
            self.registry.release_driver(self.owner)
            raise
        self._beat = threading.Thread(target=self._beat_loop, daemon=True)
        self._beat.start()
        self._refresh_cluster()
        self.study.log(f"[ray] driving {study.out} on {self._cluster_text()} as {self.owner}")
        if self.cluster.get("GPU", [0, 0])[1] and not settings.num_gpus and study.config.device != "cpu":
            # Ray hides the GPUs from a task that asked for none: the runs would train on CPUs.
            log.warning("[ray] the cluster has GPUs but executor.num_gpus is 0: student runs get none "
                        "(set executor.num_gpus: 1)")
        self._write_view(force=True)

    # -- sweep.RunExecutor -------------------------------------------------------------------------------

    def run(self, job: Job) -> RunRecord | None:
        spec = job.spec
        if spec.id in self.tasks:
            return None
        decision = self.study.runner.begin(spec)
        if decision == "skip":
            return self.registry.get(spec.id)
        if decision == "busy":
            return None  # another process (a local sweep on this host) holds it: asked again after `wait`
        submission = uuid.uuid4().hex
        job = with_absolute_paths(job)  # every node mounts the study folder at the same path
        options: dict[str, Any] = {
            "num_cpus": self.settings.num_cpus,
            "num_gpus": self.settings.num_gpus,
            "max_retries": self.settings.max_retries,
            "retry_exceptions": False,  # an error of the run itself would fail again: recorded, not retried
            "name": spec.id,
        }
        if self.settings.memory_gb is not None:
            options["memory"] = int(self.settings.memory_gb * 2**30)
        ref = self._remote.options(**options).remote(job, submission)
        with self._lock:
            self.tasks[spec.id] = _Task(spec, ref, submission, time.time())
        self.view[spec.id] = {"state": "pending", "attempts": 0, "submitted": time.time()}
        self._write_view(force=True)
        return None

    def wait(self, timeout: float) -> None:
        """Until one task ends (recorded at once) or `timeout` seconds pass; refreshes Ray's view."""
        deadline = time.time() + timeout
        while True:
            refs = [t.ref for t in self.tasks.values()]
            if not refs:
                time.sleep(max(0.0, deadline - time.time()))  # only other processes' runs to wait for
                return
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=min(POLL_EVERY, timeout))
            started = self._poll_attempts()
            if ready:
                for task in [t for t in self.tasks.values() if t.ref in ready]:
                    self._finish(task)
                return
            self._write_view(force=started)  # `kdlab status` shows a run as running once a worker starts it
            if time.time() >= deadline:
                return

    # -- recording -----------------------------------------------------------------------------------------

    def _finish(self, task: _Task) -> None:
        from ray.exceptions import RayError, RayTaskError

        spec = task.spec
        error = None
        result: dict[str, Any] = {}
        try:
            result = self.ray.get(task.ref)
        except RayTaskError as e:  # the run raised: its own exception and the worker's traceback
            cause = e.cause if getattr(e, "cause", None) is not None else e
            error = (f"{type(cause).__name__}: {cause}", str(e))
        except RayError as e:  # the worker or node died more often than max_retries allows, or cancelled
            error = (f"{type(e).__name__}: {e}".splitlines()[0], str(e))
        with self._lock:
            del self.tasks[spec.id]
        entry = self.view.setdefault(spec.id, {})
        entry.update(state="failed" if error else "done", finished=time.time())
        if result.get("attempt"):
            entry["attempts"] = result["attempt"]
        self._refresh_cluster()
        self.study.runner.end(spec, result.get("metrics", {}), error, float(result.get("wall", 0.0)),
                              note=self._totals())
        self._write_view(force=True)

    def _poll_attempts(self) -> bool:
        """Which submitted runs a worker has started, where, and how often (each attempt writes its
        folder's ray_task.json before it trains); whether an attempt started since the last look."""
        started = False
        for run_id, task in list(self.tasks.items()):
            record = read_task_record(Path(task.spec.output_dir))
            if not record or record.get("submission") != task.submission:
                continue
            last = record["attempts"][-1]
            entry = self.view.setdefault(run_id, {})
            started |= entry.get("state") != "running" or entry.get("attempts") != len(record["attempts"])
            entry.update(state="running", attempts=len(record["attempts"]), node=last.get("node"),
                         host=last.get("host"), ip=last.get("ip"), pid=last.get("pid"),
                         started=last.get("started"))
        return started

    def _refresh_cluster(self) -> None:
        try:
            total = self.ray.cluster_resources()
            free = self.ray.available_resources()
            nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        except Exception:  # a transient GCS hiccup must not stop the sweep: keep the last numbers
            return
        self._cluster_at = time.time()
        used = {k: [round(total.get(k, 0) - free.get(k, 0), 2), round(total.get(k, 0), 2)]
                for k in ("CPU", "GPU")}
        self.cluster = {"nodes": nodes, **used}

    def _cluster_text(self) -> str:
        c = self.cluster
        if not c:
            return "the Ray cluster"
        return (f"{c['nodes']} node(s), CPU {c['CPU'][0]:g}/{c['CPU'][1]:g} in use, "
                f"GPU {c['GPU'][0]:g}/{c['GPU'][1]:g} in use")

    def _totals(self) -> str:
        states = [v.get("state") for v in self.view.values()]
        counts = {s: states.count(s) for s in ("running", "pending", "done", "failed")}
        retried = sum(1 for v in self.view.values() if v.get("attempts", 0) > 1)
        text = ", ".join(f"{n} {s}" for s, n in counts.items())
        return f"ray: {text}{f', {retried} retried' if retried else ''}; {self._cluster_text()}"

    def _write_view(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_view < VIEW_EVERY:
            return
        self._last_view = now
        if now - self._cluster_at > VIEW_EVERY:
            self._refresh_cluster()
        note = {"driver": self.owner, "address": self.settings.address, "updated": now,
                "cluster": self.cluster, "runs": self.view}
        self.registry.set_note("ray", note)

    def _beat_loop(self) -> None:
        # A thread: the driver may spend hours in a teacher stage before the sweep calls `wait`.
        while not self._stop.wait(BEAT_EVERY):
            try:
                self.registry.beat_driver(self.owner)
                with self._lock:
                    ids = list(self.tasks)
                for run_id in ids:
                    self.registry.heartbeat(run_id, self.owner)
            except RegistryError:
                log.debug("heartbeat failed", exc_info=True)

    def close(self, *, interrupted: bool = False) -> None:
        """Give the study up: tasks still in flight (an interrupted driver) are cancelled and their runs
        released for the next driver."""
        self._stop.set()
        for run_id, task in list(self.tasks.items()):
            with contextlib.suppress(Exception):
                self.ray.cancel(task.ref, force=True)
            self.registry.release(run_id, self.owner)
            self.view.setdefault(run_id, {})["state"] = "cancelled"
        self.tasks.clear()
        with contextlib.suppress(RegistryError):
            self._write_view(force=True)
            self.registry.release_driver(self.owner)
        if self._connected_here:
            self.ray.shutdown()
        if interrupted:
            log.info("[ray] driver stopped; unfinished runs were released for the next driver")


# ---------------------------------------------------------------------------------------------------------
# the worker side


def read_task_record(folder: Path) -> dict[str, Any] | None:
    """A run folder's ray_task.json, or None (absent, or caught mid-write on a slow file system)."""
    import json

    try:
        data = json.loads((folder / TASK_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("attempts") else None


def _note_attempt(folder: Path, submission: str, config_hash: str) -> int:
    """Append this attempt (node, host, pid, the checkpoint it resumes from) to the run's ray_task.json;
    returns its number. Attempts of one task never overlap, so read-then-write is safe."""
    import ray

    from kdlab.training import drop_incomplete_checkpoints, last_checkpoint

    record = read_task_record(folder)
    attempts = record["attempts"] if record and record.get("submission") == submission else []
    trainer = folder / "trainer"
    dropped = drop_incomplete_checkpoints(trainer)
    attempts.append({
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "started": time.time(),
        "resume_from": last_checkpoint(trainer, config_hash),  # what run_job will resume
        "dropped": dropped,
    })
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / TASK_RECORD, {"submission": submission, "attempts": attempts}, indent=1)
    return len(attempts)


def _train_in_worker(job: Job, submission: str) -> dict[str, Any]:
    """One student run in a Ray worker; returns its metrics (the driver records them)."""
    from kdlab.heap import freeze_imports

    freeze_imports()  # a worker process is kdlab's alone (kdlab.heap says why)
    from kdlab.job import run_job
    from kdlab.models import show_loading_bars

    show_loading_bars(False)  # Ray forwards the worker's output to the driver's terminal: as under `kdlab`
    if not log.handlers:  # the status lines ("[resume] ...") in the worker's log, forwarded by Ray
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    start = time.perf_counter()
    spec = job.spec
    attempt = _note_attempt(Path(spec.output_dir), submission, spec.config_hash)
    metrics = run_job(job)
    return {"metrics": metrics, "wall": time.perf_counter() - start, "attempt": attempt}


# ---------------------------------------------------------------------------------------------------------
# kdlab status


def status_lines(registry: Registry, now: float | None = None) -> list[str]:
    """Ray's view of the study as its driver last wrote it (`kdlab status`); empty for a local study."""
    note = registry.note("ray")
    if not note:
        return []
    now = time.time() if now is None else now
    live = registry.live_driver()
    running = live is not None and live.get("owner") == note.get("driver")
    c = note.get("cluster") or {}
    cluster = ""
    if c:
        cluster = (f"; cluster {c.get('nodes', '?')} node(s), CPU {c['CPU'][0]:g}/{c['CPU'][1]:g} in use, "
                   f"GPU {c['GPU'][0]:g}/{c['GPU'][1]:g} in use")
    runs = note.get("runs") or {}
    unfinished = any(e.get("state") in ("running", "pending") for e in runs.values())
    state = "driving" if running else "stopped" if unfinished else "finished"
    lines = [f"ray: driver {note.get('driver')} {state} (updated {now - note.get('updated', now):.0f}s ago)"
             + cluster]
    counts: dict[str, int] = {}
    for entry in runs.values():
        counts[entry.get("state", "?")] = counts.get(entry.get("state", "?"), 0) + 1
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for run_id, entry in runs.items():
        attempts = entry.get("attempts", 0)
        retried = f", retried {attempts - 1}x" if attempts > 1 else ""
        if entry.get("state") == "running":
            where = f"{entry.get('host')} ({entry.get('ip')}) pid {entry.get('pid')}"
            lines.append(f"  running  {run_id} on {where}, attempt {attempts}{retried}")
        elif entry.get("state") == "pending":
            lines.append(f"  pending  {run_id}")
        elif attempts > 1:
            lines.append(f"  {entry.get('state'):8s} {run_id} after {attempts} attempts")
    if not running and unfinished:
        lines.append("  (the driver is gone: these are its last words; the next driver reclaims the runs)")
    return lines
