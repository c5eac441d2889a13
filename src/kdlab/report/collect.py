"""Collecting what a study left in its output folder: the registry's runs, selection.json, study.yaml,
bench.json, provenance.json and the manifests, read once and defensively (a damaged file becomes a note); the
chosen settings; results.csv; the environment the report is written in."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kdlab.config import StudyConfig, load_config
from kdlab.layout import PROVENANCE, Layout
from kdlab.methods import METHODS
from kdlab.registry import Registry, RunRecord
from kdlab.resolve import resolve_config
from kdlab.selection import Group
from kdlab.selection import chosen_groups as selection_groups
from kdlab.stages.benchmarks import BASE_TEACHER, is_benchmark_run
from kdlab.tasks import TASKS, Task, get_task

BOOTSTRAP_SEED = 0  # the report's bootstrap when the study recorded none (provenance.json)
ENV_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy", "pandas", "matplotlib")

Echo = Callable[[str], None]
log = logging.getLogger("kdlab")


# ---------------------------------------------------------------------------------------------------------
# reading the output folder


@dataclass
class StudyOutputs:
    """What a study left in its output folder, read once."""

    out: Path
    runs: list[RunRecord]
    selection: dict[str, Any]
    config: StudyConfig | None
    config_text: str | None
    bench: dict[str, Any] | None
    tasks: list[str]
    notes: list[str] = field(default_factory=list)  # problems met while reading, shown in report.md
    provenance: dict[str, Any] | None = None  # provenance.json: seeds, determinism, fingerprints
    _tasks: dict[str, Task] = field(default_factory=dict, repr=False)

    def task(self, name: str) -> Task:
        """The task `name` as the study defined it (a built-in task's defaults without a valid study.yaml)."""
        if name not in self._tasks:
            settings = self.config.tasks.get(name) if self.config is not None else None
            self._tasks[name] = get_task(name, settings)
        return self._tasks[name]

    def get(self, run_id: str | None) -> RunRecord | None:
        return next((r for r in self.runs if r.id == run_id), None) if run_id else None

    def run_dir(self, run: RunRecord) -> Path:
        # Built from the (validated) run id inside the study folder, never from the registry row's absolute
        # output_dir: that breaks when a folder is moved, and a tampered row must not lead outside the study.
        return self.layout.run(run.id)

    @property
    def layout(self) -> Layout:
        """The study folder's paths (kdlab.layout)."""
        return Layout.of(self.out, self.config.cache.dir if self.config is not None else None)

    @property
    def name(self) -> str:
        return self.config.name if self.config is not None else self.out.name


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        notes.append(f"{path.name} is not valid JSON ({e}); ignored")
        return None


def load_outputs(out: str | Path) -> StudyOutputs:
    out = Path(out)
    layout = Layout(out)
    if not layout.registry.is_file():
        raise FileNotFoundError(f"{out}: no {layout.registry.name} here; not a kdlab study output folder")
    notes: list[str] = []
    runs = Registry(layout.registry).runs()
    selection = _read_json(layout.selection, notes) or {}
    bench = _read_json(layout.bench, notes)
    if bench is not None and not isinstance(bench.get("models"), dict):
        notes.append("bench.json has no `models` mapping; efficiency results skipped")
        bench = None
    config, config_text = None, None
    if layout.study_config.is_file():
        config_text = layout.study_config.read_text(encoding="utf-8")
        try:
            config = resolve_config(load_config(layout.study_config), str(layout.study_config))
        except ValueError as e:  # ConfigError: still report, with task defaults
            notes.append(f"study.yaml could not be validated ({e}); task defaults used")
    tasks = list(config.tasks) if config is not None else []
    tasks += [t for t in dict.fromkeys(r.task for r in runs) if t not in tasks]
    known = set(config.tasks) if config is not None else set(TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown:  # runs of a task this kdlab does not know: listed in results.csv, left out of the tables
        notes.append(f"unknown task(s) {', '.join(unknown)}: only in results.csv")
    tasks = [t for t in tasks if t in known]
    provenance = _read_json(layout.provenance, notes)
    if provenance is not None and not isinstance(provenance, dict):
        notes.append("provenance.json is not a JSON object; ignored")
        provenance = None
    return StudyOutputs(out, runs, selection, config, config_text, bench, tasks, notes, provenance)


def as_mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty: provenance.json and manifests are read defensively."""
    return value if isinstance(value, dict) else {}


def bootstrap_seed(outputs: StudyOutputs) -> int:
    """The bootstrap's seed: provenance.json's ``seeds.bootstrap`` when the study recorded one, else the
    default `BOOTSTRAP_SEED` (the study config has no bootstrap seed)."""
    seed = as_mapping(as_mapping(outputs.provenance).get("seeds")).get("bootstrap")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else BOOTSTRAP_SEED


def seed_source(outputs: StudyOutputs, seed: int) -> str:
    recorded = as_mapping(as_mapping(outputs.provenance).get("seeds")).get("bootstrap")
    return PROVENANCE if recorded is not None and recorded == seed else "default"


def task_title(task: str) -> str:
    """How tables and figures name a task: a built-in task's title (SST-2, SQuAD), else its name."""
    return (TASKS[task].title if task in TASKS else "") or task


def setting_key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _method_rank(method: str) -> tuple[int, str]:
    order = list(METHODS)  # registration order: the baseline, then the KD methods
    return (order.index(method) if method in order else len(order), method)


def run_metric(run: RunRecord, split: str, metric: str) -> float | None:
    value = ((run.metrics or {}).get(split) or {}).get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def chosen_groups(outputs: StudyOutputs) -> dict[tuple[str, str, str], Group]:
    """The chosen setting per (student, method, task) of the study's known tasks (`selection.chosen_groups`:
    selection.json's entry, the only setting, or the best grid run so far), in table order."""
    seeds = outputs.config.seeds if outputs.config is not None else []
    runs = [r for r in outputs.runs if r.task in outputs.tasks]
    groups = selection_groups(runs, outputs.selection, seeds, lambda task: outputs.task(task).metric)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], _method_rank(kv[0][1]))))


# ---------------------------------------------------------------------------------------------------------
# results.csv

_CSV_HEAD = ["run", "kind", "task", "method", "student", "stage", "seed", "status", "chosen"]
_CSV_METRICS = [f"{split}_{m}" for split in ("eval", "selection") for m in ("accuracy", "exact_match", "f1")]
_CSV_TAIL = [
    "train_runtime",
    "steps",
    "train_examples",
    "trainable_parameters",
    "parameters",
    "wall_time",
    "attempts",
    "error",
]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "_"))
        else:
            out[name] = json.dumps(v) if isinstance(v, list) else v
    return out


def results_table(
    outputs: StudyOutputs, groups: Mapping[tuple[str, str, str], Group]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and one row per run: identity, status, `param_*` columns, flattened metrics, wall time."""
    chosen_ids = {r.id for g in groups.values() for r in g.runs}
    rows: list[dict[str, Any]] = []
    param_cols: dict[str, None] = {}
    metric_cols: dict[str, None] = dict.fromkeys(_CSV_METRICS)
    for r in outputs.runs:
        if is_benchmark_run(r):
            continue  # its metrics go on its model's row (`benchmark_columns`)
        row: dict[str, Any] = {
            "run": r.id,
            "kind": r.kind,
            "task": r.task,
            "method": r.method,
            "student": r.student,
            "stage": r.stage,
            "seed": r.seed,
            "status": r.status,
            "chosen": "" if r.kind == "teacher" else r.id in chosen_ids,
            "wall_time": round(r.wall_time, 2) if r.wall_time is not None else None,
            "attempts": r.attempts,
            "error": (r.error or "").strip().splitlines()[-1] if (r.error or "").strip() else None,
        }
        for k, v in r.params.items():
            param_cols[f"param_{k}"] = None
            row[f"param_{k}"] = json.dumps(v) if isinstance(v, list | dict) else v
        for k, v in _flatten(r.metrics or {}).items():
            if k not in _CSV_TAIL:
                metric_cols[k] = None
            row[k] = v
        rows.append(row)
    # Fixed columns first (a stable schema for scripts), then whatever else the runs recorded, sorted.
    extra = sorted(c for c in metric_cols if c not in _CSV_METRICS)
    header = _CSV_HEAD + sorted(param_cols) + _CSV_METRICS + extra + _CSV_TAIL
    return benchmark_columns(outputs.runs, header, rows)


def benchmark_columns(
    runs: Sequence[RunRecord], header: list[str], rows: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Each finished benchmark run's metrics on the row of the model it evaluated, `bench_<entry>_<metric>`
    (lm-eval's stderr: `bench_<entry>_<metric>_stderr`; the base teacher's on each zero-shot teacher row),
    after the other metrics (`results_table` leaves the benchmark runs' own rows out: `kdlab status` lists
    them)."""
    by_model: dict[str, dict[str, Any]] = {}
    for r in runs:
        if is_benchmark_run(r) and r.done:
            for entry, metrics in ((r.metrics or {}).get("benchmarks") or {}).items():
                for metric, value in metrics.items():
                    by_model.setdefault(str(r.params.get("model")), {})[f"bench_{entry}_{metric}"] = value
    columns: dict[str, None] = {}
    for row in rows:
        zero_shot = row["kind"] == "teacher" and str(row["run"]).endswith("-zero-shot")
        values = by_model.get(BASE_TEACHER if zero_shot else str(row["run"]), {})
        row.update(values)
        columns.update(dict.fromkeys(values))
    at = header.index(_CSV_TAIL[0])
    return header[:at] + sorted(columns) + header[at:], rows


def csv_text(header: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row[k] for k in header})
    return buf.getvalue()



# ---------------------------------------------------------------------------------------------------------
# environment and report.md


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh (write) the index of the user's checkout.
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, has uncommitted changes) of the kdlab checkout, or (None, None) when kdlab is not run from a
    git checkout (e.g. installed from a wheel: the enclosing repository would be someone else's)."""
    src = Path(__file__).resolve().parent.parent  # the kdlab package
    if _git(["ls-files", "--error-unmatch", "__init__.py"], src) is None:
        return None, None
    commit = _git(["rev-parse", "HEAD"], src)
    status = _git(["status", "--porcelain", "--untracked-files=no"], src)
    return commit, (bool(status) if status is not None else None)


def _device(bench: Mapping[str, Any] | None) -> str:
    if bench and bench.get("device"):
        return f"{bench['device']} (from bench.json)"
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)} (report machine)"
        if torch.backends.mps.is_available():
            return "mps (report machine)"
    except Exception:  # torch missing or broken: the report still gets written
        pass
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (report machine)"


def environment(bench: Mapping[str, Any] | None) -> dict[str, str]:
    commit, dirty = git_commit()
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "kdlab": _version("kdlab")}
    env.update({p: _version(p) for p in ENV_PACKAGES})
    env["device"] = _device(bench)
    env["git commit"] = (
        "unknown (kdlab not run from a git checkout)"
        if commit is None
        else (commit + (" (with uncommitted changes)" if dirty else ""))
    )
    return env



def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return as_mapping(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def data_manifest(outputs: StudyOutputs, task: str) -> dict[str, Any]:
    return _read_manifest(outputs.layout.data_manifest(task))


def cache_manifest(outputs: StudyOutputs, task: str) -> dict[str, Any]:
    return _read_manifest(outputs.layout.teacher_cache(task) / "manifest.json")


