"""General-ability benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`), in-process on a model
kdlab already holds: `evaluate_benchmark` runs one benchmark (an lm-eval task or group) and returns its
metrics, each task's version and hash, and the per-document scores the report compares methods on.

lm-eval is optional (`pip install 'kdlab[eval]'`): only this module imports it, and only inside functions.
Reading lm-eval's results (`read_results`) is pure, apart from the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kdlab.config import BenchmarkSettings, ConfigError
from kdlab.files import hash_file
from kdlab.identity import run_hash

INSTALL = "pip install 'kdlab[eval]'"  # what the errors tell a user without lm-eval
NO_FILTER = "none"  # lm-eval's name for a metric read without a filter ("acc,none")


def lm_eval_version() -> str | None:
    """The installed lm-eval's version, or None when it is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def require_lm_eval(where: str = "evaluation.benchmarks") -> str:
    """lm-eval's version; ConfigError with the install command when it is missing."""
    version = lm_eval_version()
    if version is None:
        raise ConfigError(f"{where}: needs lm-evaluation-harness, which is not installed: {INSTALL}")
    return version


# One TaskManager per process and settings: making one indexes lm-eval's few thousand built-in YAML files
# (~9 s here), and a study evaluates every model on every benchmark. Edited files under include_path are
# another key, so an edited task is indexed again.
_task_managers: dict[tuple[Any, ...], Any] = {}


def task_manager(settings: BenchmarkSettings) -> Any:
    """lm-eval's TaskManager for `settings` (the one made earlier in this process for the same settings and
    include_path files, if any): over `include_path` alone when it defines every benchmark asked for, else
    over both (include_path's tasks take precedence, as in lm-eval)."""
    key = (settings.include_path, tuple(settings.tasks), include_path_hash(settings))
    if key not in _task_managers:
        _task_managers[key] = _new_task_manager(settings)
    return _task_managers[key]


def include_path_hash(settings: BenchmarkSettings) -> str | None:
    """The files of `include_path` (task YAML and local data), hashed: editing a task redoes it."""
    if not settings.include_path or not os.path.isdir(settings.include_path):
        return None
    root = Path(settings.include_path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return run_hash({str(p.relative_to(root)): hash_file(p) for p in files})


def _new_task_manager(settings: BenchmarkSettings) -> Any:
    from lm_eval.tasks import TaskManager

    if settings.include_path:
        local = TaskManager(include_path=settings.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in settings.tasks):
            return local
        return TaskManager(include_path=settings.include_path)
    return TaskManager()


def check_benchmarks(settings: BenchmarkSettings) -> None:
    """Before any work: lm-eval installed, include_path a folder, every name a task or group lm-eval knows.
    Raises ConfigError naming the field."""
    require_lm_eval()
    if settings.include_path and not os.path.isdir(settings.include_path):
        raise ConfigError(
            f"evaluation.benchmarks.include_path: {settings.include_path} is not a folder (of lm-eval YAML "
            "task files)"
        )
    known = set(task_manager(settings).all_tasks)
    unknown = [name for name in settings.tasks if name not in known]
    if unknown:
        where = f" nor in include_path {settings.include_path}" if settings.include_path else ""
        raise ConfigError(
            f"evaluation.benchmarks.tasks: {unknown} not lm-eval task or group names (not among lm-eval "
            f"{lm_eval_version()}'s tasks{where}); `lm-eval ls tasks` lists them"
        )


@dataclass
class BenchmarkResult:
    """One benchmark's outcome on one model.

    metrics: per lm-eval entry (the benchmark, a group's subtasks), metric name → value as lm-eval reports
    it, and `<metric>_stderr` (a filtered metric is named `<metric>_<filter>`); tasks: per lm-eval task, its
    version, few-shot count, documents scored and hash (lm-eval's: documents, prompts and targets);
    scores: per task, metric → per-document scores in document order (metrics with a number per
    document only); responses: per task, the model's filtered answer to each document."""

    metrics: dict[str, dict[str, float]]
    tasks: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    responses: dict[str, list[Any]] = field(default_factory=dict)


def metric_name(key: str) -> str | None:
    """lm-eval's "acc,none" → "acc", "exact_match,strict-match" → "exact_match_strict-match"; None for keys
    that are no metric (name, alias, sample_len)."""
    metric, sep, filter_name = key.partition(",")
    if not sep:
        return None
    if metric.endswith("_stderr"):
        base = metric.removesuffix("_stderr")
        return (base if filter_name == NO_FILTER else f"{base}_{filter_name}") + "_stderr"
    return metric if filter_name == NO_FILTER else f"{metric}_{filter_name}"


def _number(value: Any) -> float | None:
    """A finite float, or None (lm-eval writes "N/A" for an stderr it did not compute)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def task_hash(samples: Sequence[Mapping[str, Any]]) -> str:
    """lm-eval's hash of a task's documents, prompts and targets (its EvaluationTracker's `task_hashes`)."""
    joined = "".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def read_results(results: Mapping[str, Any]) -> BenchmarkResult:
    """kdlab's view of what `lm_eval.simple_evaluate(..., log_samples=True)` returned."""
    metrics: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for entry, values in (results.get(section) or {}).items():
            for key, value in values.items():
                name, number = metric_name(key), _number(value)
                if name is not None and number is not None:
                    metrics.setdefault(entry, {})[name] = number
    samples = results.get("samples") or {}
    tasks: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    responses: dict[str, list[Any]] = {}
    for task, task_samples in samples.items():
        ordered = sorted(task_samples, key=lambda s: s["doc_id"])
        counts = (results.get("n-samples") or {}).get(task) or {}
        tasks[task] = {
            "version": (results.get("versions") or {}).get(task),
            "num_fewshot": (results.get("n-shot") or {}).get(task),
            "documents": counts.get("effective", len(ordered)),
            "hash": task_hash(ordered),
        }
        per_doc: dict[str, list[float]] = {}
        for name in dict.fromkeys(m for s in ordered for m in s.get("metrics", [])):
            values = [_number(s.get(name)) for s in ordered]
            if all(v is not None for v in values):  # perplexities are (loglikelihood, length) pairs: left out
                filter_name = ordered[0].get("filter", NO_FILTER)
                per_doc[name if filter_name == NO_FILTER else f"{name}_{filter_name}"] = values
        scores[task] = per_doc
        responses[task] = [_plain(s.get("filtered_resps")) for s in ordered]
    return BenchmarkResult(metrics, tasks, scores, responses)


def _plain(value: Any) -> Any:
    """A response as JSON values (lm-eval keeps loglikelihood answers as tuples of numpy numbers)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


@contextlib.contextmanager
def _lm_eval_logging(level: int) -> Iterator[None]:
    """lm-eval logs each step at INFO, and warns that it was handed a model instance (as kdlab means to):
    its logger at `level` for the block, unless kdlab's is at DEBUG (`kdlab -v`)."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not logging.getLogger("kdlab").isEnabledFor(logging.DEBUG):
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def evaluate_benchmark(
    model: Any, tokenizer: Any, name: str, settings: BenchmarkSettings, *, batch_size: int
) -> BenchmarkResult:
    """Benchmark `name` (an lm-eval task or group) on `model` as it is (its device and dtype) through
    lm-eval's HF wrapper; `settings`: few-shot count, limit, include_path."""
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _lm_eval_logging(logging.ERROR):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _lm_eval_logging(logging.WARNING):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=task_manager(settings),
                log_samples=True,  # the per-document scores the report's paired comparison needs
            )
    except Exception as e:
        text = f"{type(e).__name__}: {e}".lower()
        if any(word in text for word in ("offline", "connection", "couldn't reach", "cannot reach")):
            raise RuntimeError(
                f"benchmark {name}: its dataset is not in the Hugging Face cache and the hub is unreachable "
                f"({type(e).__name__}: {e}); download it once online (a hub task), or define the task over "
                "local files in evaluation.benchmarks.include_path"
            ) from e
        raise
    if results is None:  # lm-eval returns None on ranks other than its first
        raise RuntimeError(f"benchmark {name}: lm-eval returned no results")
    return read_results(results)
