"""The benchmark stage (`evaluation.benchmarks`): what the models kept of the base model's general ability.
The base teacher, the teacher adapted to each task and every final student (each chosen setting, every seed)
are evaluated on lm-eval benchmarks in-process (`kdlab.benchmarks`), on the study's device, in its
evaluation dtype, with its batch size.

Each (model, benchmark) is a run of the registry, `benchmark-<name>-<model>`, so a finished evaluation is not
redone, two processes never do the same one, and one that fails is recorded while the others go on. Its
hash covers the benchmark's settings, the files of `include_path`, lm-eval's version, the dtype and batch
size, and the evaluated run's own hash: changing any of them (or retraining the model) redoes it, and
nothing else. lm-eval's version and every task's version and hash go into provenance.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.benchmarks import (
    BenchmarkResult,
    evaluate_benchmark,
    include_path_hash,
    lm_eval_version,
    require_lm_eval,
)
from kdlab.config import StudyConfig
from kdlab.errors import StudyError
from kdlab.files import atomic_write_json
from kdlab.identity import run_hash
from kdlab.plan import BENCHMARK_METHOD, benchmark_run, benchmark_run_id
from kdlab.registry import RunRecord
from kdlab.selection import chosen_groups
from kdlab.tasks import get_task

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView

log = logging.getLogger("kdlab")

BASE_TEACHER = "teacher-base"  # the base teacher's model key: one model, whatever the task


def student_init(name: str) -> str:
    """The model key of student `name`'s initial weights (before any training: what it knew)."""
    return f"student-{name}-init"


@dataclass(frozen=True)
class BenchmarkModel:
    """A model the stage evaluates: `key` names it in run ids and folders (teacher-base, teacher-<task>, a
    student run id); `path` is the folder its weights are in; `source_hash` the config hash of the run that
    made it (the base teacher: its spec's)."""

    key: str
    path: str
    task: str
    student: str
    seed: int | None
    source_hash: str
    trust_remote_code: bool = False


def planned_ids(config: StudyConfig, chosen_runs: list[str]) -> list[str]:
    """The benchmark runs a study will do (`kdlab run --dry-run`), given the ids of its chosen student runs:
    per model (the base teacher, the adapted ones, each student's initial weights, then the students), each
    benchmark."""
    settings = config.evaluation.benchmarks
    if settings is None:
        return []
    models = [BASE_TEACHER, *(f"teacher-{task}" for task in config.tasks if config.teacher.adapt)]
    models += [student_init(s.name) for s in config.students] + chosen_runs
    return [benchmark_run_id(name, model) for model in models for name in settings.tasks]


def is_benchmark_run(run: RunRecord) -> bool:
    return run.method == BENCHMARK_METHOD


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def benchmark_models(study: StudyView) -> list[BenchmarkModel]:
    """The base teacher, the adapted teacher of each task, each student's initial weights, and every run of
    each (student, method, task)'s chosen setting (the one selection rule the report and the bench read), for
    the models whose weights are there."""
    cfg = study.config
    trust = cfg.teacher.trust_remote_code
    first_task = next(iter(cfg.tasks))
    models = [BenchmarkModel(BASE_TEACHER, study.base_teacher_path, first_task, "teacher", None,
                             run_hash(cfg.teacher.model, cfg.teacher.revision), trust)]
    if cfg.teacher.adapt:
        for task in cfg.tasks:
            record = study.registry.get(f"teacher-{task}")
            folder = Path(study.teacher_path(task))
            if record is not None and record.done and _has_weights(folder):
                models.append(BenchmarkModel(f"teacher-{task}", str(folder), task, "teacher", record.seed,
                                             record.config_hash, trust))
    for student in cfg.students:
        try:
            folder = Path(study.initial_weights(student))
        except StudyError:  # a derived student not built yet: nothing trained from it either
            continue
        if _has_weights(folder):
            made_by = run_hash(student, cfg.teacher.model, cfg.teacher.revision)
            models.append(BenchmarkModel(student_init(student.name), str(folder), first_task, student.name,
                                         None, made_by, student.trust_remote_code))
    path = study.layout.selection
    selection = json.loads(path.read_text()) if path.is_file() else {}
    runs = [r for r in study.registry.runs() if r.task in cfg.tasks]
    groups = chosen_groups(runs, selection, cfg.seeds, lambda task: get_task(task, cfg.tasks[task]).metric)
    students = {s.name: s for s in cfg.students}
    for (student, _method, task), group in sorted(groups.items()):
        for run in group.runs:
            folder = study.layout.run(run.id) / "model"  # inside the study folder, whatever the row says
            if not _has_weights(folder):
                study.log(f"[benchmarks] {run.id}: no saved model in {folder}; not evaluated")
                continue
            settings = students.get(student)
            models.append(BenchmarkModel(run.id, str(folder), task, student, run.seed, run.config_hash,
                                         settings.trust_remote_code if settings is not None else False))
    return models


class _LoadedModel:
    """A model loaded on first use and released after its benchmarks: nothing is loaded when every
    benchmark of it is already done."""

    def __init__(self, study: StudyView, model: BenchmarkModel):
        self.study, self.model = study, model
        self._loaded: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from kdlab.models import load_model, load_tokenizer

            m, study = self.model, self.study
            model = load_model(m.path, dtype=study.config.evaluation.dtype, device=study.device,
                               trust_remote_code=m.trust_remote_code)
            if hasattr(model, "merge_and_unload"):  # a student saved as an adapter: evaluated merged
                model = model.merge_and_unload()
            model.eval()
            # A model folder with its own tokenizer is read with it (a student of another vocabulary).
            own = (Path(m.path) / "tokenizer_config.json").is_file()
            tokenizer = (load_tokenizer(m.path, trust_remote_code=m.trust_remote_code) if own
                         else study.tokenizer)
            self._loaded = (model, tokenizer)
        return self._loaded

    def release(self) -> None:
        self._loaded = None


def _body(study: StudyView, loaded: _LoadedModel, name: str) -> Callable[[], dict[str, Any]]:
    settings = study.config.evaluation.benchmarks
    assert settings is not None

    def evaluate() -> dict[str, Any]:
        model, tokenizer = loaded.get()
        result = evaluate_benchmark(model, tokenizer, name, settings,
                                    batch_size=study.config.evaluation.batch_size)
        write_scores(study.layout.benchmark_scores(loaded.model.key, name), result)
        return {"benchmarks": result.metrics,
                "lm_eval": {"version": lm_eval_version(), "tasks": result.tasks}}

    return evaluate


def write_scores(path: Path, result: BenchmarkResult) -> None:
    atomic_write_json(path, {"scores": result.scores, "responses": result.responses})


def run_benchmarks(study: StudyView) -> list[str]:
    """Every benchmark of every model not evaluated yet (on every rank of a launch: the leader decides and
    evaluates); then provenance.json's `benchmarks` section. Returns the ids of the benchmark runs that
    failed."""
    settings = study.config.evaluation.benchmarks
    if settings is None:
        return []
    version = require_lm_eval()
    include_hash = include_path_hash(settings)
    failed: list[str] = []
    for model in benchmark_models(study):
        loaded = _LoadedModel(study, model)
        for name in settings.tasks:
            spec = benchmark_run(study.config, study.layout, name, model.key, task=model.task,
                                 student=model.student, seed=model.seed, source_hash=model.source_hash,
                                 include_hash=include_hash, lm_eval=version)
            # The scores file gone: the comparison cannot be made, so the evaluation is redone.
            study.runner.redo_if_lost(spec, study.layout.benchmark_scores(model.key, name).is_file())
            # force: changed settings redo a finished evaluation (it is cheap, and nothing depends on it)
            record = study.runner.execute(spec, _body(study, loaded, name), force=True)
            if record is not None and record.status == "failed":
                failed.append(spec.id)
        loaded.release()
    if study.ranks.leader:
        write_provenance(study)
    return failed


def benchmark_provenance(runs: list[RunRecord], names: list[str]) -> dict[str, Any]:
    """lm-eval's version and, per lm-eval task, its version, few-shot count, documents and hash, from the
    finished runs of the benchmarks `names` (a task whose hash differs between models lists every hash: it
    should not)."""
    versions: set[str] = set()
    tasks: dict[str, dict[str, Any]] = {}
    for run in runs:
        if not (is_benchmark_run(run) and run.done and run.params.get("benchmark") in names):
            continue  # a benchmark taken out of the config is no part of the study's results
        info = (run.metrics or {}).get("lm_eval") or {}
        if info.get("version"):
            versions.add(str(info["version"]))
        for task, facts in (info.get("tasks") or {}).items():
            entry = tasks.setdefault(task, {k: v for k, v in facts.items() if k != "hash"} | {"hash": []})
            if facts.get("hash") not in entry["hash"]:
                entry["hash"].append(facts.get("hash"))
    for entry in tasks.values():
        entry["hash"] = entry["hash"][0] if len(entry["hash"]) == 1 else entry["hash"]
    version = sorted(versions)[0] if len(versions) == 1 else sorted(versions)
    return {"lm_eval": version, "tasks": dict(sorted(tasks.items()))}


def write_provenance(study: StudyView) -> None:
    """provenance.json with its `benchmarks` section from the registry (the rest as the study wrote it)."""
    path = study.layout.provenance
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    if not isinstance(data, dict) or not data:
        data = study.provenance()
    settings = study.config.evaluation.benchmarks
    names = list(settings.tasks) if settings is not None else []
    data["benchmarks"] = benchmark_provenance(study.registry.runs(), names)
    atomic_write_json(path, data, indent=1)
