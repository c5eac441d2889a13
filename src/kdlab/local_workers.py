"""More sweep workers on this machine (`executor: {kind: local, workers: N}`, or `--workers N`).

A local sweep already shares its runs with any other `kdlab sweep` process on the same study folder: each
run is claimed in the registry, so nothing runs twice. `workers: N` starts N - 1 such processes for the
sweep stage and gives every process (this one included) an equal share of the cores as torch threads. On
a CPU, several small runs side by side may use the cores better than one run spread over all of them (a
small model's ops are too short to keep many threads busy); on the 2-core demo machine it gained only about
1.1x (docs/demo.md, section 7). On a machine
with several GPUs the extra workers take the visible GPUs in turn (this process keeps the first), the
"one `kdlab sweep` per GPU with CUDA_VISIBLE_DEVICES" of the README in one command.

The extra workers start once the teacher stages and caches are done (they find everything before the sweep
finished and skip it), write their log to `logs/sweep-worker-<i>.log` in the study folder, and are waited
for before the report. They are stopped when this process stops early.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Each worker's torch threads: OMP_NUM_THREADS when the user set it, else an equal share of the
    cores."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, available_cores() // workers)


def worker_gpu(study: StudyView, worker: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for extra worker `worker` (1, 2, ...): the visible GPUs in turn after the one
    this process uses (worker 0 is this process, on the first); None for a CPU study or no GPU."""
    if str(study.config.device) == "cpu" or not torch.cuda.is_available():
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = [g for g in given.split(",") if g.strip()] if given else [
        str(i) for i in range(torch.cuda.device_count())]
    return gpus[worker % len(gpus)] if gpus else None


def worker_command(study: StudyView) -> list[str]:
    """`kdlab sweep` on this study's folder, itself with one worker (it must not start more)."""
    cmd = [sys.executable, "-m", "kdlab.cli", "sweep", "--out", str(study.out), "--workers", "1",
           "--executor", "local"]
    if study.data_dir is not None:
        cmd += ["--data-dir", str(study.data_dir)]
    return cmd


@contextlib.contextmanager
def local_workers(study: StudyView, workers: int) -> Iterator[list[subprocess.Popen]]:
    """For the block (the sweep stage): `workers - 1` more `kdlab sweep` processes on the same study, and
    this process's torch threads set to its share. Yields the processes; waits for them at the end of the
    block (they finish when no run is left), or stops them when the block raises."""
    if workers <= 1 or study.ranks.size > 1:  # under torchrun every rank already is a worker
        yield []
        return
    threads = threads_per_worker(workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logs = study.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    before = torch.get_num_threads()
    try:
        for i in range(1, workers):
            gpu = worker_gpu(study, i)
            worker_env = env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu)
            with (logs / f"sweep-worker-{i}.log").open("w") as fh:
                procs.append(subprocess.Popen(worker_command(study), stdout=fh, stderr=subprocess.STDOUT,
                                              env=worker_env, stdin=subprocess.DEVNULL))
        study.log(f"[sweep] {workers} workers on {available_cores()} cores, {threads} torch thread(s) each; "
                  f"the other workers' logs: {logs}/sweep-worker-*.log")
        torch.set_num_threads(threads)
        yield procs
        for i, proc in enumerate(procs, start=1):
            if proc.wait() != 0:
                study.log(f"[sweep] worker {i} exited with code {proc.returncode}: see "
                          f"{logs}/sweep-worker-{i}.log")
    finally:
        torch.set_num_threads(before)
        for proc in procs:
            if proc.poll() is None:  # the block raised (or was interrupted): the workers stop with it
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
