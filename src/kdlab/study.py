"""The study recipe: a short sequence of stages over one output folder. Each stage writes its artifacts there
and records its runs in the registry, so `kdlab run` resumes where it stopped and several processes share
one study.

    preflight → data → teacher (zero-shot, adaptation) → students' initial weights → teacher cache
    → sweep (grid on the first seed → best setting on the selection split → the other seeds)
    → provenance, benchmarks (lm-eval, `evaluation.benchmarks`), bench, report

The stages live in `kdlab.stages`; the runner (`kdlab.runner`) runs each run once. `Study` holds what they
share: the config, the folder, the tokenizer, the registry, and where things are.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdlab.config import ExecutorSettings, StudentSettings, StudyConfig, parse_config
from kdlab.distributed import Ranks
from kdlab.evaluation import GenerationOptions, generation_for
from kdlab.files import atomic_write_json, atomic_write_text, hash_file
from kdlab.identity import rekey_checkpoints, rekey_finished_runs
from kdlab.layout import Layout
from kdlab.methods import Signals, get_method
from kdlab.models import load_tokenizer, model_provenance, resolve_device, resolve_model_path
from kdlab.plan import Plan, build_plan, grid
from kdlab.preflight import check_finished_runs, finished_runs, preflight
from kdlab.registry import Registry, RunSpec, rebuild_registry
from kdlab.resolve import resolve_config
from kdlab.runner import Runner
from kdlab.seeding import configure_determinism, stage_seed
from kdlab.stages import benchmarks, cache, students, sweep, teacher
from kdlab.stages.data import TaskData, load_task_data
from kdlab.tasks import get_task
from kdlab.teacher_cache import TeacherCache

log = logging.getLogger("kdlab")


class Study:
    def __init__(
        self,
        config: StudyConfig,
        *,
        output_dir: str | Path | None = None,
        data_dir: str | Path | None = None,
        rebuild_cache: bool = False,
        force: bool = False,
        inspect_only: bool = False,
        open_registry: bool = True,
    ):
        """`force`: redo finished runs whose settings changed (else refused); `inspect_only`: for commands
        that only look (`kdlab cache --verify`, `kdlab run --dry-run`) and for Ray workers: no checks,
        nothing written, the registry (if any) opened read-only, or not at all without `open_registry` (a
        worker on another host must not touch SQLite over a network filesystem)."""
        config = resolve_config(config)  # the task and method sections typed by their registries
        # One process: a no-op; several: rank 0 leads (see distributed.py).
        self.ranks = Ranks(cpu=resolve_device(config.device).type == "cpu")
        self.config = config
        self.out = Path(output_dir or config.output_dir)
        self.layout = Layout.of(self.out, config.cache.dir)  # every path of the study folder
        self.data_dir = data_dir if data_dir is not None else config.data_dir
        self.rebuild_cache = rebuild_cache
        self.force = force
        self.device = self.ranks.device or resolve_device(config.device)
        configure_determinism(config.deterministic)
        self._data: dict[str, TaskData] = {}
        self._tokenizer = None
        self.failed: list[str] = []  # ids of the runs that failed, after `sweep` / `run`
        self.timings: dict[str, float] = {}  # wall seconds by stage in this process (`timed`)
        self.written: list[Path] = []  # the report's files, after `run`
        if inspect_only:
            path = self.layout.registry
            self.registry = Registry(path, readonly=True) if open_registry and path.exists() else None
            return
        # The leader accepts or refuses the command before anything is written (`_open`); its error, if any,
        # is raised on every rank, so no rank waits for a leader that has given up.
        error = None
        if self.ranks.leader:
            try:
                self._open()
            except Exception as e:
                error = e
        error = self.ranks.share(error)
        if error is not None:
            raise error
        if not self.ranks.leader:
            self.registry = Registry(self.layout.registry)  # read only on these ranks
        self.runner = Runner(self.registry, self.ranks, self.out, force=force, describe=self._describe)

    def _open(self) -> None:
        """Check everything that needs no training and that the config agrees with the runs the study already
        finished, and only then create the folder, the registry and study.yaml: a refused command leaves
        `--out` exactly as it was. A registry file that went missing is rebuilt from the finished run
        folders first, so they are not redone."""
        self.preflight()
        finished = finished_runs(self)
        rekeys = check_finished_runs(self, finished)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.layout.registry
        if not path.exists() and finished:
            rebuilt = rebuild_registry(self.out, only_if_missing=True)
            if rebuilt is not None:
                self.log(
                    f"[registry] {path} was missing: rebuilt from {len(rebuilt.restored)} finished run "
                    "folder(s)"
                )
        self.registry = Registry(path)  # refuses a read-only or broken registry before study.yaml changes
        if rekeys:
            rekeyed = rekey_finished_runs(self.registry, self.out, rekeys)
            self.log(f"[registry] {len(rekeyed)} finished run(s) recorded by kdlab 0.1.0 re-keyed to today's "
                     "config hashes (the same settings)")
        done = {r.id for r in finished}
        unfinished = [run for run in self.plan.runs() if run.spec.kind == "student" and run.id not in done]
        if rekey_checkpoints((Path(run.spec.output_dir), run.hash_parts) for run in unfinished):
            self.log("[resume] interrupted runs of kdlab 0.1.0 keep their checkpoints (re-keyed)")
        self._write_config()

    def _write_config(self) -> None:
        """study.yaml is the accepted config (`kdlab sweep --out` and the report read it). A changed one is
        written only once accepted; the earlier one is kept beside it, so the user sees what moved. The copy
        comes first and the swap is atomic: study.yaml is never missing. One that reads as this config
        (written by an older kdlab, without the settings added since at their defaults) is left as it is."""
        path = self.layout.study_config
        text = self.config.to_yaml()
        if path.exists():
            old = path.read_text()
            if old == text or self._same_config(old):
                return
            atomic_write_text(self.layout.earlier_study_config(int(time.time())), old)
        atomic_write_text(path, text)

    def _same_config(self, text: str) -> bool:
        try:
            return resolve_config(parse_config(yaml.safe_load(text))) == self.config
        except (ValueError, yaml.YAMLError):
            return False

    # -- the recipe ---------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Every check that needs no training (`kdlab.preflight`); raises naming the field or file."""
        preflight(self)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Adds the block's wall time to `timings[stage]` (logged by `run`: where a study's time goes)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def prepare(self) -> None:
        """Data, teacher (zero-shot, adaptation, evaluation) and the students' initial weights."""
        with self.timed("data"):
            for name in self.config.tasks:
                self.data(name)
        with self.timed("teacher"):
            for name in self.config.tasks:
                teacher.run_teacher(self, name)
        with self.timed("students"):
            for student in self.config.students:
                students.build_student(self, student)  # derived students (vocabularies: `preflight`)

    def sweep(self, poll_seconds: float = 5.0, executor: ExecutorSettings | None = None) -> list[str]:
        """Everything but the report: `prepare`, the teacher caches, then every student run (shared safely
        with other processes running the same sweep), here or as tasks on a Ray cluster (`executor`, default
        the config's `executor:`; see `kdlab.ray_executor`, whose driver holds the study throughout). Returns
        the ids of failed runs (kept as `failed`)."""
        from kdlab.local_workers import local_workers
        from kdlab.ray_executor import driving

        settings = executor or self.config.executor
        with driving(self, settings) as runs_on:
            self.prepare()
            with self.timed("cache"):
                caches = {name: self.cache_stage(name) for name in self.config.tasks}
            workers = settings.workers if runs_on is None else 1
            with self.timed("sweep"), local_workers(self, workers):
                self.failed = sweep.run_sweep(self, caches, poll_seconds, runs_on)
        return self.failed

    def run(self, executor: ExecutorSettings | None = None) -> pd.DataFrame:
        """The whole study; returns the results table (`results`). `failed` holds the ids of the runs that
        failed (empty when everything is done). `executor`: as for `sweep`."""
        start = time.perf_counter()
        self.sweep(executor=executor)
        if self.ranks.leader:
            atomic_write_json(self.layout.provenance, self.provenance(), indent=1)
        with self.timed("benchmarks"):
            self.failed += benchmarks.run_benchmarks(self)  # every rank: the leader decides and evaluates
        if self.ranks.leader:  # inference only: one process measures and writes
            if self.config.bench.enabled:
                from kdlab.bench import write_bench

                with self.timed("bench"):
                    write_bench(self, reuse=True)
            from kdlab.report import write_results

            with self.timed("report"):
                self.written = write_results(self)
        self.ranks.barrier()
        self.log(
            f"[study] finished in {time.perf_counter() - start:.0f}s; results: "
            + ", ".join(str(p) for p in self.written)
        )
        # Work already done is skipped, so a resumed study shows only what this command did.
        self.log("[study] time by stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
        if self.failed:
            self.log(
                f"[study] {len(self.failed)} run(s) failed: {', '.join(self.failed)}; see `kdlab status` "
                "and re-run to retry them"
            )
        return self.results()

    # -- what the stages share ----------------------------------------------------------------------------

    def data(self, name: str) -> TaskData:
        """Task `name`'s subsets and training encodings (data/<task>.json lists the ids)."""
        if name not in self._data:
            settings = self.config.tasks[name]
            data = load_task_data(
                get_task(name, settings), settings, self.tokenizer, self.data_dir, self.config.data_seed
            )
            if self.ranks.leader:
                atomic_write_json(self.layout.data_manifest(name), data.manifest(self.config.data_seed))
            self.log(data.summary())
            self._data[name] = data
        return self._data[name]

    def cache_stage(self, name: str) -> TeacherCache | None:
        return cache.run_cache(self, name)

    def verify_caches(self) -> list[tuple[str, Path, str | None]]:
        return cache.verify_caches(self)

    def initial_weights(self, student: StudentSettings) -> str:
        """The folder `student`'s runs start from (a derived one is built by `prepare`, never by a run)."""
        return students.initial_weights(self, student)

    def layer_pairs(self, student: StudentSettings, layer_map: Any, method: str) -> list[tuple[int, int]]:
        return students.layer_pairs(self, student, layer_map, method)

    def grid(self, method: str) -> tuple[list[dict[str, Any]], list[str]]:
        """Every setting of `method`'s grid, and the axes its run ids show."""
        return grid(self.config.methods[method])

    def grid_signals(self, method: str) -> list[Signals]:
        """What each grid point of `method` reads from the teacher."""
        return [get_method(method).signals(point) for point in self.grid(method)[0]]

    @property
    def base_teacher_path(self) -> str:
        return resolve_model_path(self.config.teacher.model, self.config.teacher.revision)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.base_teacher_path, trust_remote_code=self.config.teacher.trust_remote_code
            )
        return self._tokenizer

    def teacher_path(self, task: str) -> str:
        return str(self.layout.teacher(task)) if self.config.teacher.adapt else self.base_teacher_path


    def generation(self, model_path: str | None) -> GenerationOptions:
        """How to generate with a model whose weights are in the folder `model_path` (`generation_for`)."""
        return generation_for(self.config.evaluation, model_path)

    def seed(self, stage: str, run_seed: int | None = None) -> int:
        return stage_seed(self.config.seeds, self.config.data_seed, stage, run_seed)

    def command(self, name: str, *flags: str) -> str:
        """A `kdlab` command line for this study folder (error messages name commands that work)."""
        parts = ["kdlab", name, "--out", str(self.out)]
        if self.data_dir is not None:
            parts += ["--data-dir", str(self.data_dir)]
        return " ".join(parts + list(flags))

    def log(self, text: str) -> None:
        """Status for the user (logger "kdlab"; the CLI shows it on stderr), from the leading rank only."""
        if self.ranks.leader:
            log.info(text)

    def _describe(self, spec: RunSpec, metrics: dict[str, Any]) -> str:
        """A finished run's metrics in one line: the cache's size, a benchmark's metrics, or the task's."""
        if "cache" in metrics:
            c = metrics["cache"]
            fields = ", ".join(c["fields"])
            text = f"{c['examples']} examples, {c['answer_tokens']} answer tokens, fields {fields}"
            if "topk_bytes_per_token" in c:
                text += f", top-k {c['topk_bytes_per_token']:.0f} bytes/token"
            return text
        if "benchmarks" in metrics:  # an lm-eval benchmark (stages/benchmarks.py), in lm-eval's units
            return "; ".join(f"{entry} " + ", ".join(f"{m} {v:.3f}" for m, v in values.items()
                                                      if not m.endswith("_stderr"))
                             for entry, values in metrics["benchmarks"].items())
        ev, sel = metrics.get("eval", {}), metrics.get("selection", {})
        keys = [k for k in get_task(spec.task, self.config.tasks.get(spec.task)).metrics if k in ev]
        text = ", ".join(f"{k} {ev[k]:.1f}" for k in keys)
        if sel:
            text += " | selection " + ", ".join(f"{k} {sel[k]:.1f}" for k in keys if k in sel)
        return text

    # -- what the study did -------------------------------------------------------------------------------

    def results(self) -> pd.DataFrame:
        """One row per run of the study, as results.csv: identity, status, params, metrics, wall time."""
        from kdlab.report import chosen_groups, load_outputs, results_table

        outputs = load_outputs(self.out)
        header, rows = results_table(outputs, chosen_groups(outputs))
        return pd.DataFrame(rows, columns=header)

    @functools.cached_property
    def plan(self) -> Plan:
        """Every run of the study (`kdlab.plan`), computed once from the config and the model configs."""
        return build_plan(self.config, self.layout, self.layer_pairs)

    def run_statuses(self) -> list[tuple[str, str]]:
        """(run id, status) of every run the study needs, in the order it does them, without doing or
        writing anything (`kdlab run --dry-run`). The other seeds of a grid with several settings run its
        best setting, unknown until the grid is done: shown as `<best>`."""
        status = {r.id: r.status for r in self.registry.runs()} if self.registry is not None else {}
        ids = [run.id for runs in self.plan.teacher.values() for run in runs]
        ids += [f"cache-{name}" for name in self.plan.cached_tasks]
        path = self.layout.selection
        selected = json.loads(path.read_text()) if path.is_file() else {}
        chosen_runs: list[str] = []  # every seed of each group's chosen setting: the benchmarked students
        for group in self.plan.groups:
            ids += [run.id for run in group.grid]
            chosen = selected.get(group.key, {}).get("chosen")
            best = chosen if group.choosing else group.grid[0].spec.params
            try:
                finals = [run.id for run in group.finals(best)] if best is not None else []
            except KeyError:  # chosen under another grid: the choice is made again
                best = None
            if best is None:
                ids += [f"{group.key}-<best>-seed{seed}" for seed in self.config.seeds[1:]]
                chosen_runs += [f"{group.key}-<best>-seed{seed}" for seed in self.config.seeds]
            else:
                ids += finals
                first = next((r.id for r in group.grid if group.finals(r.spec.params) is group.finals(best)),
                             f"{group.key}-<best>-seed{self.config.seeds[0]}")
                chosen_runs += [first, *finals]
        ids += benchmarks.planned_ids(self.config, chosen_runs)
        return [(i, status.get(i, "todo")) for i in ids]

    def provenance(self) -> dict[str, Any]:
        """What reproducing the study needs besides its config: the seed of every stage and run, and the
        fingerprints of the models and data files it read."""
        seeds: dict[str, Any] = {"data": self.seed("data")}
        for name in self.config.tasks:
            if self.config.teacher.adapt:
                seeds[f"teacher-{name}"] = self.seed("teacher")
        for student in self.config.students:
            if student.derive is not None:
                seeds[f"student-init-{student.name}"] = self.seed("student-init")
        for record in self.registry.runs():
            if record.kind == "student":
                seeds[record.id] = record.seed
        seeds["bootstrap"] = self.seed("bootstrap")
        # spec, resolved folder, hub repo and commit, revision asked for, fingerprint of the weights
        models = {"teacher": model_provenance(self.config.teacher.model, self.config.teacher.revision)}
        for student in self.config.students:
            if student.model is not None:
                models[f"students.{student.name}"] = model_provenance(student.model, student.revision)
        data: dict[str, Any] = {}
        for name, settings in self.config.tasks.items():
            files = get_task(name, settings).data_files(self.data_dir)
            data[name] = (
                {"files": {f: hash_file(p) for f, p in files.items()}} if files else {"source": "hub"}
            )
        return {"deterministic": self.config.deterministic, "seeds": seeds, "models": models, "data": data}
