"""Efficiency of the teacher and of every final student (`kdlab bench`): parameters, size on disk, and per
task the latency per example, the throughput at the evaluation batch size and the peak memory.

Inference goes through the task's own `answer` (label scoring or greedy generation) on prompts built exactly
as `evaluation.predict` builds them, so the measured path is the evaluation path. Every model is measured in
this one process on the study's device and dtype; `write_bench(study)` writes OUT/bench.json.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kdlab import evaluation
from kdlab.alignment import same_vocabulary
from kdlab.files import atomic_write_json
from kdlab.job import PROJECTIONS_FILE
from kdlab.models import count_parameters, folder_size_bytes, load_model, load_tokenizer
from kdlab.tasks.base import Example, Task

log = logging.getLogger("kdlab")

# Written beside a student's weights but only used in training: not part of the model one deploys.
TRAINING_ONLY_FILES = (PROJECTIONS_FILE,)
DEFAULT_EXAMPLES = 32
DEFAULT_WARMUP = 2
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class BenchEntry:
    """One model to measure."""

    label: str  # key in bench.json["models"]
    path: str  # a folder `load_model` takes
    role: Literal["teacher", "student"]
    method: str  # "teacher" for the teachers
    task: str | None = None  # the task it was trained for; None: measured on every task (base teacher)
    run: str | None = None  # registry run id
    trainable_parameters: int | None = None  # from the run's metrics; None: counted on the loaded model
    trust_remote_code: bool = False


# ---------------------------------------------------------------------------------------------------------
# pure helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    `sync` waits for queued device work (CUDA/MPS run asynchronously), so a call is timed to its end.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def device_sync(device: torch.device | str) -> Callable[[], None]:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.synchronize
    if kind == "mps":
        return torch.mps.synchronize
    return lambda: None


# ---------------------------------------------------------------------------------------------------------
# memory


def _proc_status_bytes(key: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        rss = _proc_status_bytes("VmRSS")
        if rss is None:
            raise RuntimeError("cannot read this process's RSS: install psutil") from None
        return rss


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: "5" resets VmHWM
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _release_memory() -> None:
    gc.collect()
    # glibc keeps freed heap pages; returning them makes the next model's RSS baseline honest.
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Polls RSS on a thread: the fallback peak where the kernel's high-water mark cannot be reset."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, current_rss())


class MemoryMeter:
    """Peak memory of one measured section, above a baseline taken before the model was loaded.

    CUDA: `max_memory_allocated` after a reset (tensors only, weights included). MPS: allocated memory
    sampled after each call (MPS keeps no peak counter). CPU: peak RSS minus the RSS before loading the
    model, from the kernel's high-water mark (Linux) or a polling thread; RSS is process-wide, so
    allocator caches and anything else the process holds move it too.
    """

    def __init__(self, device: torch.device | str):
        self.kind = torch.device(device).type
        self.base = 0
        self._peak = 0
        self._sampler: _RssSampler | None = None
        self._hwm = False

    def _now(self) -> int:
        if self.kind == "cuda":
            return torch.cuda.memory_allocated()
        if self.kind == "mps":
            return torch.mps.current_allocated_memory()
        return current_rss()

    def set_baseline(self) -> None:
        """Call with no model loaded."""
        _release_memory()
        if self.kind == "cuda":
            torch.cuda.empty_cache()
        elif self.kind == "mps":
            torch.mps.empty_cache()
        self.base = self._now()

    @contextmanager
    def section(self) -> Iterator[MemoryMeter]:
        self._peak = self._now()
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif self.kind == "cpu":
            self._hwm = reset_peak_rss()
            self._sampler = None if self._hwm else _RssSampler()
        try:
            yield self
        finally:
            if self.kind == "cuda":
                self._peak = max(self._peak, torch.cuda.max_memory_allocated())
            elif self.kind == "cpu":
                if self._hwm:
                    self._peak = max(self._peak, _proc_status_bytes("VmHWM") or 0)
                elif self._sampler is not None:
                    self._peak = max(self._peak, self._sampler.stop())
            self._peak = max(self._peak, self._now())

    def sample(self) -> None:
        """Record the current usage (the only peak source on MPS)."""
        self._peak = max(self._peak, self._now())

    @property
    def peak_bytes(self) -> int:
        return max(0, self._peak - self.base)

    def note(self) -> str:
        if self.kind == "cuda":
            return "peak_memory_bytes: torch.cuda.max_memory_allocated after a reset (weights + activations)"
        if self.kind == "mps":
            return (
                "peak_memory_bytes: torch.mps.current_allocated_memory sampled after each call, "
                "minus the value before loading (MPS keeps no peak counter)"
            )
        source = (
            "the kernel's RSS high-water mark (VmHWM, reset per task)"
            if self._hwm or reset_peak_rss()
            else "RSS polled every 2 ms"
        )
        return (
            f"peak_memory_bytes: peak RSS from {source} minus the RSS before loading the model; RSS is "
            "process-wide (allocator caches and other process memory move it too)"
        )


# ---------------------------------------------------------------------------------------------------------
# inference on the evaluation path


@contextmanager
def _quiet_evaluation_bars() -> Iterator[None]:
    # score_choices / generate_answers open a progress bar per call: thousands of one-example bars would
    # flood the terminal, and their bookkeeping is not inference.
    original = evaluation.tqdm
    evaluation.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        evaluation.tqdm = original


@dataclass
class PreparedTask:
    task: Task
    prompt_ids: list[list[int]]


def prepare_prompts(
    task: Task, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> PreparedTask:
    """Prompt ids exactly as `evaluation.predict` makes them (evaluation prompts, fitted to max_length)."""
    pairs, prompt_ids, _ = evaluation.prepare_prompts(task, tokenizer, examples)
    if not pairs:
        raise ValueError(f"{task.name}: no evaluation prompt fits max_length; nothing to measure")
    return PreparedTask(task, prompt_ids)


def run_inference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prepared: PreparedTask,
    prompt_ids: Sequence[list[int]],
    batch_size: int,
) -> list[Any]:
    """The evaluation call `predict` makes for this task, on already encoded prompts."""
    return prepared.task.answer(model, tokenizer, prompt_ids, batch_size=batch_size)


def count_tokens(prepared: PreparedTask, answers: Sequence[Any], tokenizer: PreTrainedTokenizerBase) -> int:
    """Prompt tokens, plus the tokens the model produced (generation: each answer re-encoded + 1 stop)."""
    return sum(len(p) for p in prepared.prompt_ids) + prepared.task.answer_tokens(answers, tokenizer)


def measure_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prepared: PreparedTask,
    *,
    batch_size: int,
    warmup: int,
    repeats: int,
    meter: MemoryMeter,
    sync: Callable[[], None],
) -> dict[str, float | int]:
    """Latency per example (batch 1, each prompt `repeats` times), throughput at `batch_size`, peak memory."""
    prompts = prepared.prompt_ids
    with meter.section():
        for i in range(warmup):
            run_inference(model, tokenizer, prepared, [prompts[i % len(prompts)]], 1)
        latencies: list[float] = []
        for _ in range(repeats):
            for p in prompts:
                latencies += time_calls(
                    lambda p=p: run_inference(model, tokenizer, prepared, [p], 1),
                    warmup=0,
                    repeats=1,
                    sync=sync,
                )
                meter.sample()
        answers: list[Any] = []

        def batched() -> None:
            answers[:] = run_inference(model, tokenizer, prepared, prompts, batch_size)
            meter.sample()

        # One warm-up pass: batch shapes differ from the batch-1 calls above.
        passes = time_calls(batched, warmup=1 if warmup else 0, repeats=repeats, sync=sync)
        seconds = statistics.median(passes)
    tokens = count_tokens(prepared, answers, tokenizer)
    return {
        "latency_ms_p50": round(percentile(latencies, 50) * 1e3, 3),
        "latency_ms_p95": round(percentile(latencies, 95) * 1e3, 3),
        "examples_per_s": round(len(prompts) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_bytes": int(meter.peak_bytes),
    }


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the saved model folder, training-only files (feature projections) left out."""
    folder = Path(folder)
    extra = sum((folder / name).stat().st_size for name in TRAINING_ONLY_FILES if (folder / name).is_file())
    return folder_size_bytes(folder) - extra


def _prime(
    entry: BenchEntry,
    prepared: Mapping[str, PreparedTask],
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device,
    dtype: str,
) -> None:
    """Run each task once, untimed, before anything is measured: one-time process costs (thread pools,
    kernel selection, lazy imports) would otherwise land on the first model's memory and latency."""
    model = load_model(entry.path, dtype=dtype, device=device, trust_remote_code=entry.trust_remote_code)
    model.eval()
    for p in prepared.values():
        run_inference(model, tokenizer, p, p.prompt_ids[:1], 1)
        run_inference(model, tokenizer, p, p.prompt_ids[:2], 2)
    del model
    _release_memory()


def own_tokenizer(entry: BenchEntry, tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase | None:
    """A student's tokenizer when its vocabulary differs from `tokenizer` (the study's), else None."""
    if entry.role != "student" or not (Path(entry.path) / "tokenizer_config.json").is_file():
        return None
    own = load_tokenizer(entry.path, trust_remote_code=entry.trust_remote_code)
    return None if same_vocabulary(own, tokenizer) else own


def bench_models(
    entries: Sequence[BenchEntry],
    tasks: Mapping[str, tuple[Task, list[Example]]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device | str,
    dtype: str,
    batch_size: int,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, Any]:
    """Measure every entry on its task (every task for entries with task None), one model at a time.

    `tasks` maps a task name to the task and the fixed examples to run (the same for every model).
    """
    device = torch.device(device)
    sync = device_sync(device)
    meter = MemoryMeter(device)
    prepared = {name: prepare_prompts(task, tokenizer, examples) for name, (task, examples) in tasks.items()}
    models: dict[str, Any] = {}
    with _quiet_evaluation_bars():
        if entries:
            _prime(entries[0], prepared, tokenizer, device=device, dtype=dtype)
        for entry in evaluation.progress(entries, desc="bench", unit="model"):
            names = list(prepared) if entry.task is None else [entry.task]
            missing = [n for n in names if n not in prepared]
            if missing:
                raise ValueError(f"{entry.label}: task(s) {missing} not given to bench_models")
            meter.set_baseline()
            model = load_model(
                entry.path, dtype=dtype, device=device, trust_remote_code=entry.trust_remote_code
            )
            if hasattr(model, "merge_and_unload"):
                # Evaluation runs LoRA students merged. (A folder saved with `save: adapter` loads through
                # transformers' peft integration with the adapter unmerged: timed as loaded.)
                model = model.merge_and_unload()
            model.eval()
            total, trainable = count_parameters(model)
            # A student with its own tokenizer reads the same examples in its own tokens.
            own = own_tokenizer(entry, tokenizer)
            entry_tokenizer = tokenizer if own is None else own
            entry_prepared = prepared if own is None else {
                n: prepare_prompts(tasks[n][0], own, tasks[n][1]) for n in names}
            results = {}
            for name in names:
                results[name] = measure_task(
                    model,
                    entry_tokenizer,
                    entry_prepared[name],
                    batch_size=batch_size,
                    warmup=warmup,
                    repeats=repeats,
                    meter=meter,
                    sync=sync,
                )
            models[entry.label] = {
                "role": entry.role,
                "run": entry.run,
                "method": entry.method,
                "task": entry.task,
                "parameters": int(total),
                "trainable_parameters": int(
                    trainable if entry.trainable_parameters is None else entry.trainable_parameters
                ),
                "disk_bytes": disk_bytes(entry.path),
                "tasks": results,
            }
            del model
    _release_memory()
    return {"device": str(device), "dtype": dtype, "models": models}


# ---------------------------------------------------------------------------------------------------------
# a study's models


def study_entries(study: Any) -> list[BenchEntry]:
    """The base (zero-shot) teacher, the adapted teacher of each task, and each student/method/task's
    chosen run."""
    cfg = study.config
    trust = cfg.teacher.trust_remote_code
    # method "teacher-zero-shot": the base teacher's quality on each task is its zero-shot evaluation.
    entries = [
        BenchEntry(
            "teacher-base",
            study.base_teacher_path,
            "teacher",
            "teacher-zero-shot",
            None,
            trust_remote_code=trust,
        )
    ]
    if cfg.teacher.adapt:
        for task in cfg.tasks:
            path = Path(study.teacher_path(task))
            if (path / "config.json").is_file():
                record = study.registry.get(f"teacher-{task}")
                entries.append(
                    BenchEntry(
                        f"teacher-{task}",
                        str(path),
                        "teacher",
                        "teacher",
                        task,
                        run=record.id if record is not None else None,
                        trust_remote_code=trust,
                    )
                )
    # The chosen setting of each student/method/task is decided exactly as the report decides it.
    from kdlab.report import StudyOutputs, chosen_groups

    path = study.layout.selection
    selection = json.loads(path.read_text()) if path.exists() else {}
    outputs = StudyOutputs(study.out, study.registry.runs(), selection, cfg, None, None, list(cfg.tasks))
    students = {s.name: s for s in cfg.students}
    for (student, method, task), group in chosen_groups(outputs).items():
        run = group.first
        if run is None or task not in cfg.tasks:
            continue
        key = f"{method}-{task}-{student}"
        folder = outputs.run_dir(run) / "model"  # inside the study folder, whatever the registry row says
        if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
            log.info(f"[bench] {key}: no saved model in {folder}; skipped")
            continue
        metrics = run.metrics or {}
        settings = students.get(student)
        entries.append(
            BenchEntry(
                key,
                str(folder),
                "student",
                method,
                task,
                run=run.id,
                trainable_parameters=metrics.get("trainable_parameters"),
                trust_remote_code=settings.trust_remote_code if settings else False,
            )
        )
    return entries


def write_bench(
    study: Any,
    *,
    examples: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    reuse: bool = False,
) -> Path:
    """Measure the study's teacher and final students on the first `examples` evaluation examples of each
    task; write OUT/bench.json. Unset arguments come from the study's `bench` settings. With `reuse`, an
    existing bench.json that measured the same models with the same settings is kept as it is."""
    settings = study.config.bench
    examples = settings.examples if examples is None else examples
    warmup = settings.warmup if warmup is None else warmup
    repeats = settings.repeats if repeats is None else repeats
    path = study.layout.bench
    entries = study_entries(study)
    wanted = {
        "models": sorted([e.label, e.run] for e in entries),
        "examples": examples,
        "warmup": warmup,
        "repeats": repeats,
    }
    if reuse and path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("measured") == wanted:
            log.info(f"[bench] {path} is up to date ({len(entries)} models)")
            return path
    tasks = {}
    for name in study.config.tasks:
        data = study.data(name)
        tasks[name] = (data.task, list(data.eval[:examples]))
    batch_size = study.config.evaluation.batch_size
    result = bench_models(
        entries,
        tasks,
        study.tokenizer,
        device=study.device,
        dtype=study.config.evaluation.dtype,
        batch_size=batch_size,
        warmup=warmup,
        repeats=repeats,
    )
    # Extra top-level keys: how it was measured (readers of "models" are not affected).
    result["settings"] = {
        "examples_per_task": {n: len(ex) for n, (_, ex) in tasks.items()},
        "latency_batch_size": 1,
        "throughput_batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    result["notes"] = [
        "latency: per example at batch size 1 over every example `repeats` times; throughput: the median of "
        "`repeats` passes over the same examples at the evaluation batch size",
        "tokens_per_s: prompt tokens, plus for generative tasks the answer tokens (re-encoded answer + 1)",
        MemoryMeter(study.device).note(),
        "disk_bytes: the saved model folder (weights, config, tokenizer), training-only KD3 projections "
        "excluded",
    ]
    result["measured"] = wanted
    atomic_write_json(path, result, indent=1)  # a killed bench never leaves half a file for the report
    log.info(f"[bench] {len(result['models'])} models measured on {result['device']}: {path}")
    return path
