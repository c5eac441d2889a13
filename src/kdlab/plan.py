"""The plan of a study: every run it does, computed once from the config (and the model configs the layer
maps need), before anything runs. `kdlab run --dry-run`, preflight's check of the finished runs, the sweep
and the teacher stage read it; nothing else lists runs.

    teacher runs   per task: the zero-shot evaluation, and the adaptation (`teacher.adapt`)
    cache runs     per task, when some method reads a cached teacher (`cache-<task>`; its hash is the cache's
                   fingerprint, known once the teacher is)
    student runs   per (task, student, method): the grid on the first seed, then the chosen grid point on
                   every other seed. Which point is chosen is known once the grid is done, so the plan holds
                   the final runs of every point (`RunGroup.finals(point)`).
    benchmark runs per (model, lm-eval benchmark) of `evaluation.benchmarks`: which students are evaluated is
                   known once the sweep chose them, so the plan gives `benchmark_run` for the stage to call
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdlab.config import StudentSettings, StudyConfig
from kdlab.hashing import canonical_hash
from kdlab.identity import run_hash
from kdlab.layout import Layout
from kdlab.methods import MethodSettings, Signals, get_method
from kdlab.registry import RunSpec
from kdlab.seeding import stage_seed

# (student, teacher) hidden-state pairs of a layer map for a student; raises ValueError naming the field.
LayerPairs = Callable[[StudentSettings, Any, str], list[tuple[int, int]]]


def grid(settings: MethodSettings) -> tuple[list[dict[str, Any]], list[str]]:
    """Every point of a method's grid (its list-valued settings crossed, the fixed ones added), and the axes
    its run ids show: those with several values, and those its labels always show (λ)."""
    axes = settings.grid_axes()
    # `tasks` says where a method runs, not how: it is no part of any run's params.
    fixed = {k: v for k, v in settings.model_dump().items() if k not in axes and k != "tasks"}
    names = list(axes)
    points = [
        dict(fixed, **dict(zip(names, values, strict=True))) for values in itertools.product(*axes.values())
    ]
    shown = [n for n in names if len(axes[n]) > 1 or settings.label(n).in_run_id]
    return points, shown


def run_id(
    method: str, task: str, student: str, params: dict[str, Any], axes: Sequence[str], seed: int
) -> str:
    """Readable, deterministic: `kd3-sst2-s1-lam0.5-seed42` (grid axes with one value are left out; each
    axis is tagged as its method's settings label it)."""
    settings = get_method(method).settings
    parts = [method, task, student]
    for axis in axes:
        value = params[axis]
        if isinstance(value, list):  # e.g. an explicit layer map: a short stable tag
            value = "pairs" + canonical_hash({"map": value})[:6]
        tag = settings.label(axis).run_id
        parts.append(f"{axis if tag is None else tag}{f'{value:g}' if isinstance(value, float) else value}")
    parts.append(f"seed{seed}")
    return "-".join(parts)


def student_hash_parts(
    config: StudyConfig, student: StudentSettings, task: str, params: dict[str, Any], seed: int
) -> list[Any]:
    """What decides a student run's result (`params` with its layer pairs): its config hash's inputs."""
    return [student, config.teacher, config.tasks[task], params, config.training, config.evaluation.scoring(),
            config.cache.mode, config.data_seed, seed]


def teacher_hash_parts(config: StudyConfig, task: str) -> dict[str, list[Any]]:
    """What decides each of `task`'s teacher runs, by run id: their config hashes' inputs."""
    teacher, settings = config.teacher, config.tasks[task]
    parts: dict[str, list[Any]] = {
        f"teacher-{task}-zero-shot": [teacher.model, settings, config.evaluation.scoring(), config.data_seed]
    }
    if teacher.adapt:
        seed = stage_seed(config.seeds, config.data_seed, "teacher")
        parts[f"teacher-{task}"] = [teacher, settings, config.evaluation.scoring(), config.data_seed, seed]
    return parts


BENCHMARK_METHOD = "benchmarks"  # the registry's method of benchmark runs (kind "teacher": no grid sees them)


def benchmark_run_id(name: str, model: str) -> str:
    return f"benchmark-{name}-{model}"


def benchmark_run(
    config: StudyConfig, layout: Layout, name: str, model: str, *, task: str, student: str,
    seed: int | None, source_hash: str, include_hash: str | None, lm_eval: str | None,
) -> RunSpec:
    """The run that evaluates `model` (teacher-base, teacher-<task> or a student run id, made by the run
    whose config hash is `source_hash`) on the lm-eval benchmark `name`. Its hash: the benchmark settings,
    the files of include_path (`include_hash`), lm-eval's version, the evaluation dtype and batch size, and
    `source_hash`, so a retrained model or a changed benchmark is evaluated again, and nothing else is."""
    settings, ev = config.evaluation.benchmarks, config.evaluation
    assert settings is not None
    params = {"model": model, "benchmark": name, "num_fewshot": settings.num_fewshot, "limit": settings.limit}
    return RunSpec(
        id=benchmark_run_id(name, model), kind="teacher", task=task, method=BENCHMARK_METHOD, student=student,
        stage="teacher", params=params, seed=seed,
        config_hash=run_hash(params, settings.include_path, include_hash, lm_eval, ev.dtype, ev.batch_size,
                             source_hash),
        output_dir=str(layout.benchmark(model, name)),
    )


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its spec (id, params with the layer pairs, seed, folder, config hash), what its
    hash is computed from, and what it reads from the teacher (student runs)."""

    spec: RunSpec
    hash_parts: tuple[Any, ...]
    signals: Signals | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        return [tuple(p) for p in self.spec.params.get("layer_pairs", [])]


def _point_key(params: Mapping[str, Any]) -> str:
    """A grid point as text, whatever form its values took (tuples, a registry row's JSON), without the
    layer pairs the plan adds to it."""
    return json.dumps({k: v for k, v in params.items() if k != "layer_pairs"}, sort_keys=True)


@dataclass(frozen=True)
class RunGroup:
    """The runs of one (task, student, method): its grid on the first seed and, per grid point, that
    point's runs on the other seeds."""

    task: str
    student: StudentSettings
    method: str
    axes: list[str]
    grid: list[PlannedRun]
    _finals: dict[str, list[PlannedRun]] = field(repr=False)

    @property
    def key(self) -> str:
        """The group's name in selection.json: method-task-student."""
        return f"{self.method}-{self.task}-{self.student.name}"

    @property
    def choosing(self) -> bool:
        """Whether its grid has several points to choose among (on the selection split)."""
        return len(self.grid) > 1

    def finals(self, point: Mapping[str, Any]) -> list[PlannedRun]:
        """The runs of grid point `point` (a grid run's params) on every seed but the first."""
        return self._finals[_point_key(point)]

    def every_final(self) -> Iterator[PlannedRun]:
        for runs in self._finals.values():
            yield from runs


@dataclass(frozen=True)
class Plan:
    teacher: dict[str, list[PlannedRun]]  # task -> its teacher runs (zero-shot first)
    cached_tasks: list[str]  # the tasks whose teacher cache some run reads (`cache-<task>`)
    groups: list[RunGroup]  # in the order the sweep advances them: task, student, method

    def runs(self) -> Iterator[PlannedRun]:
        """Every run the plan knows a spec of: teacher runs, grid runs and the finals of every point."""
        for runs in self.teacher.values():
            yield from runs
        for group in self.groups:
            yield from group.grid
            yield from group.every_final()

    def group(self, task: str, student: str, method: str) -> RunGroup:
        return next(g for g in self.groups if (g.task, g.student.name, g.method) == (task, student, method))


def student_run(
    config: StudyConfig,
    layout: Layout,
    layer_pairs: LayerPairs,
    student: StudentSettings,
    task: str,
    method: str,
    point: dict[str, Any],
    axes: Sequence[str],
    seed: int,
    stage: str,
) -> PlannedRun:
    signals = get_method(method).signals(point)
    params = dict(point)
    if signals.layer_map is not None:  # the exact pairs a map resolves to, recorded with the run
        params["layer_pairs"] = [list(p) for p in layer_pairs(student, signals.layer_map, method)]
    rid = run_id(method, task, student.name, params, axes, seed)
    parts = tuple(student_hash_parts(config, student, task, params, seed))
    spec = RunSpec(id=rid, kind="student", task=task, method=method, student=student.name, stage=stage,
                   params=params, seed=seed, output_dir=str(layout.run(rid)), config_hash=run_hash(*parts))
    return PlannedRun(spec, parts, signals)


def build_plan(config: StudyConfig, layout: Layout, layer_pairs: LayerPairs) -> Plan:
    """The study's plan. `config` must be resolved (`kdlab.resolve`); `layer_pairs` resolves a layer map
    for a student from the model configs (`stages.students.layer_pairs`)."""
    teacher: dict[str, list[PlannedRun]] = {}
    for task in config.tasks:
        runs = []
        for rid, parts in teacher_hash_parts(config, task).items():
            adapted = rid == f"teacher-{task}"
            spec = RunSpec(
                id=rid, kind="teacher", task=task, method="teacher", student="teacher", stage="teacher",
                params={"adapted": adapted}, seed=parts[-1] if adapted else None,
                config_hash=run_hash(*parts),
                output_dir=str(layout.teacher(task) if adapted else layout.teacher_zero_shot(task)),
            )
            runs.append(PlannedRun(spec, tuple(parts)))
        teacher[task] = runs
    seeds = config.seeds
    groups = []
    for task in config.tasks:
        for student in config.students:
            for method in config.methods:
                if not config.methods[method].runs_on(task):
                    continue
                points, axes = grid(config.methods[method])
                make = lambda p, seed, stage: student_run(  # noqa: E731 - the arguments every run shares
                    config, layout, layer_pairs, student, task, method, p, axes, seed, stage  # noqa: B023
                )
                grid_runs = [make(p, seeds[0], "grid") for p in points]
                finals = {_point_key(p): [make(p, s, "final") for s in seeds[1:]] for p in points}
                groups.append(RunGroup(task, student, method, axes, grid_runs, finals))
    reads_cache = config.cache.mode != "online" and any(
        r.signals is not None and r.signals.from_teacher and not r.signals.live
        for g in groups for r in g.grid
    )
    return Plan(teacher, list(config.tasks) if reads_cache else [], groups)
