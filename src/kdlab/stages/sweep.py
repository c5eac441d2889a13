"""The sweep: every (task, student, method) trains its grid on the first seed, chooses its best setting on
the selection split (`selection`), then runs that setting on every other seed. Runs are claimed in the
registry, so several `kdlab sweep` processes share the work.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from kdlab.config import StudentSettings
from kdlab.job import CacheRef, Job, run_job
from kdlab.methods import get_method
from kdlab.plan import RunGroup
from kdlab.registry import RunRecord, RunSpec
from kdlab.selection import best_run, record_choice
from kdlab.teacher_cache import TeacherCache

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView


def job_for(study: StudyView, spec: RunSpec, student: StudentSettings, cache: TeacherCache | None) -> Job:
    """The run `spec` as a `Job`: the settings and paths it needs, read from the study once, here."""
    config = study.config
    signals = get_method(spec.method).signals(spec.params)
    task_settings = config.tasks[spec.task]
    return Job(
        spec=spec,
        student=student,
        initial_weights=study.initial_weights(student),
        task_settings=task_settings.model_dump(mode="json"),
        data_dir=None if study.data_dir is None else str(study.data_dir),
        data_seed=config.data_seed,
        teacher=study.teacher_path(spec.task),
        base_teacher=study.base_teacher_path,
        trust_remote_code=config.teacher.trust_remote_code,
        training=config.training,
        evaluation=config.evaluation,
        live_teacher=signals.live or (config.cache.mode == "online" and signals.from_teacher),
        empty_answers=config.cache.empty_answers,
        seed=study.seed("student", spec.seed),
        choosing=study.plan.group(spec.task, spec.student, spec.method).choosing,
        device=str(config.device),
        cache=None if cache is None else CacheRef(str(cache.directory), cache.fingerprint),
        plugins=tuple(config.plugins),
    )


class RunExecutor(Protocol):
    """Runs student runs somewhere else (`kdlab.ray_executor`): `run` starts one job (or reports its run),
    `wait` blocks until one of those started ends (or `timeout` seconds) and records it."""

    def run(self, job: Job) -> RunRecord | None:
        """The run's record once it is finished (done or failed); None while it is pending or running."""
        ...

    def wait(self, timeout: float) -> None: ...


def student_run(
    study: StudyView,
    spec: RunSpec,
    student: StudentSettings,
    cache: TeacherCache | None,
    executor: RunExecutor | None = None,
) -> RunRecord | None:
    """The run done here and now (local), or handed to `executor` as a job; None while it is not
    finished."""
    job = job_for(study, spec, student, cache)
    if executor is not None:
        return executor.run(job)
    data = study.data(spec.task)  # already drawn and encoded by the data stage: not again per run
    return study.runner.execute(
        spec, lambda: run_job(job, study.ranks, tokenizer=study.tokenizer, data=data, cache=cache),
        collective=True,
    )


def advance(
    study: StudyView, group: RunGroup, cache: TeacherCache | None, executor: RunExecutor | None = None
) -> str:
    """Move one (task, student, method) forward: grid on the first seed, then the best setting on the
    other seeds. Returns 'done', 'waiting' (another process holds a run, or the executor has not finished
    it) or 'failed'. With an executor every run of a stage is started before any is waited for."""
    grid_runs = [student_run(study, r.spec, group.student, cache, executor) for r in group.grid]
    if any(r is None for r in grid_runs):
        return "waiting"
    if any(r.status != "done" for r in grid_runs):
        return "failed"
    best = grid_runs[0]
    if group.choosing:
        metric = study.data(group.task).task.metric
        best = best_run(grid_runs, metric)
        if study.ranks.leader:
            record_choice(study.layout.selection, group.key, best, grid_runs, metric)
    finals = [student_run(study, r.spec, group.student, cache, executor) for r in group.finals(best.params)]
    if any(r is None for r in finals):
        return "waiting"
    return "done" if all(r.status == "done" for r in finals) else "failed"


def run_sweep(
    study: StudyView,
    caches: dict[str, TeacherCache | None],
    poll_seconds: float = 5.0,
    executor: RunExecutor | None = None,
) -> list[str]:
    """Every student run of the study, shared safely with other processes running the same sweep, or handed
    to `executor` (every group's grid at once; each group's other seeds once its grid is done). Returns the
    ids of failed runs."""
    while True:
        # Every group's grid before any group's other seeds: with several workers (or an executor) the
        # last groups' grids (gkd, the slowest, is often last) do not wait behind the first groups' seeds.
        for group in study.plan.groups:
            for run in group.grid:
                student_run(study, run.spec, group.student, caches.get(group.task), executor)
        states = [advance(study, group, caches.get(group.task), executor) for group in study.plan.groups]
        if "waiting" not in states:
            break
        if executor is None:
            time.sleep(poll_seconds)  # another process holds a run we depend on
        else:
            executor.wait(poll_seconds)  # until one of its runs ends (or another process's may have)
    return [r.id for r in study.registry.runs(status="failed")]
