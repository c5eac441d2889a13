"""The study recipe: wires tasks, models, teacher, cache, methods, training, evaluation and the registry
into stages. Each stage writes its artifacts under the study's output folder and is skipped when they exist,
so `kdlab run` resumes where it stopped.

    prepare data → teacher (zero-shot eval, adaptation, eval) → students' initial weights → teacher cache
    → grid runs (first seed) → best setting per method on the selection split → remaining seeds → results
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file
from transformers.trainer_utils import get_last_checkpoint

from kdlab import losses
from kdlab.config import ConfigError, StudentSettings, StudyConfig
from kdlab.distributed import Ranks
from kdlab.errors import CacheError, RegistryError, StudyError
from kdlab.evaluation import evaluate, predict
from kdlab.files import atomic_write_text
from kdlab.methods import Signals, baseline, get_method
from kdlab.models import (
    add_lora,
    atomic_folder,
    check_derivable,
    count_parameters,
    derive_layers,
    derive_student,
    hash_model_files,
    hidden_width,
    hub_snapshot_info,
    load_model,
    load_tokenizer,
    model_config,
    model_provenance,
    num_layers,
    resolve_device,
    resolve_model_path,
    save_model,
)
from kdlab.registry import (
    REGISTRY_NAME,
    RUN_RECORD,
    Registry,
    RunRecord,
    RunSpec,
    default_owner,
    find_run_records,
    rebuild_registry,
    write_run_record,
)
from kdlab.seeding import configure_determinism, seed_everything, stage_seed
from kdlab.tasks import get_task
from kdlab.tasks.base import (
    Encoded,
    Example,
    Task,
    encode,
    split_train_selection,
    subset,
    transfer_subset,
)
from kdlab.teacher import build_teacher_cache, cache_fingerprint_inputs, teacher_answer, transfer_item
from kdlab.teacher_cache import REBUILD_HINT, TeacherCache, fingerprint, hash_file
from kdlab.training import TrainItem, train

log = logging.getLogger("kdlab")


@dataclass(frozen=True)
class CacheContents:
    """What a task's teacher cache holds: the union of what every run of the study reads from it."""

    answers: bool  # the teacher's greedy answers
    top_k: int | None  # top-k log-probs (the largest k of any run)...
    temperatures: list[float] | None  # ...with an exact tail per temperature
    hidden_layers: list[int]  # hidden states at these teacher layers


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    selection: list[Example]
    eval: list[Example]
    transfer: list[Example]  # training inputs without gold labels: only the KD losses use them
    prompts: dict[str, str]  # training prompts by example id
    encoded: dict[str, Encoded]  # gold training encodings by example id
    counts: dict[str, int]


class _Heartbeat:
    """Refreshes a claimed run's heartbeat while it runs, so workers on other hosts see it is alive."""

    def __init__(self, registry: Registry, run: str, every: float = 60.0):
        self._stop = threading.Event()
        owner = default_owner()  # the claiming thread's owner id, not this thread's
        self._thread = threading.Thread(target=self._beat, args=(registry, run, owner, every), daemon=True)
        self._thread.start()

    def _beat(self, registry: Registry, run: str, owner: str, every: float) -> None:
        while not self._stop.wait(every):
            registry.heartbeat(run, owner)

    def stop(self) -> None:
        self._stop.set()


def _fmt(x: float) -> str:
    return f"{x:g}"


def _model_provenance(spec: str, revision: str | None = None) -> dict[str, Any]:
    # spec, resolved folder, hub repo and commit (hub ids), revision asked for, fingerprint of the weights
    return model_provenance(spec, revision)


def _field_error(where: str, error: Exception) -> str:
    """One line naming the config field a check failed for (messages that name it already are kept)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if text.startswith(where) else f"{where}: {text}"


def resolve_layer_pairs(
    layer_map: Any, kept: Sequence[int] | None, s_layers: int, t_layers: int, where: str
) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state pairs of one layer map for one student. `kept` are a derived
    student's teacher blocks (None: a separate student model): "derived" pairs each of its blocks with the
    teacher block it was copied from; "auto" is "derived" for derived students, else "uniform". `where`
    names the config field in errors."""
    if layer_map in ("auto", "derived"):
        if kept is not None:
            return losses.derived_layer_map(kept, t_layers)
        if layer_map == "derived":
            raise ValueError(f"{where}: 'derived' needs a student derived from the teacher (students.derive)")
        layer_map = "uniform"
    try:
        return losses.resolve_layer_map(layer_map, s_layers, t_layers)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def run_id(
    method: str, task: str, student: str, params: dict[str, Any], axes: Sequence[str], seed: int
) -> str:
    """Readable, deterministic: `kd3-sst2-s1-lam0.5-seed42` (grid axes with one value are left out; each
    axis is tagged as its method's settings label it)."""
    labels = get_method(method).settings
    parts = [method, task, student]
    for axis in axes:
        value = params[axis]
        if isinstance(value, list):  # e.g. an explicit layer map: a short stable tag
            value = "pairs" + fingerprint({"map": value})[:6]
        tag = labels.label(axis).run_id
        parts.append(f"{axis if tag is None else tag}{_fmt(value) if isinstance(value, float) else value}")
    parts.append(f"seed{seed}")
    return "-".join(parts)


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
    ):
        """`inspect_only`: for commands that only look (`kdlab cache --verify`): no checks, nothing written,
        the registry (if any) opened read-only."""
        # One process: a no-op; several: rank 0 leads (see distributed.py).
        self.ranks = Ranks(cpu=resolve_device(config.device).type == "cpu")
        self.config = config
        self.out = Path(output_dir or config.output_dir)
        self.data_dir = data_dir if data_dir is not None else config.data_dir
        self.rebuild_cache = rebuild_cache
        self.force = force  # redo finished runs whose settings changed (the registry refuses otherwise)
        self.device = self.ranks.device or resolve_device(config.device)
        configure_determinism(config.deterministic)
        self._data: dict[str, TaskData] = {}
        self._caches: dict[str, TeacherCache | None] = {}
        self._tried: set[str] = set()
        self.failed: list[str] = []  # ids of the runs that failed, after `sweep` / `run`
        self.written: list[Path] = []  # the report's files, after `run`
        self._tokenizer = None
        if inspect_only:
            path = self.out / REGISTRY_NAME
            self.registry = Registry(path, readonly=True) if path.exists() else None
            return
        # The leader accepts or refuses the command before anything is written (`_open_study`); its error,
        # if any, is raised on every rank, so no rank waits for a leader that has given up.
        error = None
        if self.ranks.leader:
            try:
                self._open_study()
            except Exception as e:
                error = e
        error = self.ranks.share(error)
        if error is not None:
            raise error
        if not self.ranks.leader:
            self.registry = Registry(self.out / REGISTRY_NAME)  # read only on these ranks

    def _log(self, text: str) -> None:
        """Status for the user (logger "kdlab"; the CLI shows it on stderr), from the leading rank only."""
        if self.ranks.leader:
            log.info(text)

    def _open_study(self) -> None:
        """Check everything that needs no training (`preflight`) and that the config agrees with the runs
        the study already finished, and only then create the folder, the registry and study.yaml: a refused
        command leaves `--out` exactly as it was. A registry file that went missing is rebuilt from the
        finished run folders first, so they are not redone."""
        self.preflight()
        finished = self._finished_runs()
        self._check_finished_runs(finished)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / REGISTRY_NAME
        if not path.exists() and finished:
            rebuilt = rebuild_registry(self.out, only_if_missing=True)
            if rebuilt is not None:
                self._log(f"[registry] {path} was missing: rebuilt from {len(rebuilt.restored)} finished run "
                          "folder(s)")
        self.registry = Registry(path)  # refuses a read-only or broken registry before study.yaml changes
        self._write_config()

    # -- artifacts ----------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        """study.yaml is the accepted config (`kdlab sweep --out` and the report read it). A changed one is
        written only once accepted (`_check_finished_runs`); the earlier one is kept beside it, so the user
        sees what moved. The copy comes first and the swap is atomic: study.yaml is never missing."""
        path = self.out / "study.yaml"
        text = self.config.to_yaml()
        if path.exists():
            old = path.read_text()
            if old == text:
                return
            atomic_write_text(self.out / f"study.{int(time.time())}.yaml", old)
        atomic_write_text(path, text)

    # -- checks before any work ---------------------------------------------------------------------------

    def preflight(self) -> None:
        """Every check that needs no training, so a study that cannot run fails before its first run and
        before anything is written: model paths, tokenizers (students share the teacher's vocabulary),
        derivable students and KD3 layer maps, data files with their fields, subset sizes, label words.
        Raises ConfigError / DataError naming the field or file."""
        cfg = self.config
        try:
            teacher_path = resolve_model_path(cfg.teacher.model, cfg.teacher.revision)
            teacher_config = model_config(teacher_path, trust_remote_code=cfg.teacher.trust_remote_code)
            vocab = len(self.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(_field_error("teacher.model", e)) from None
        for method in cfg.methods:
            top_k = max((s.top_k for s in self.grid_signals(method) if s.top_k is not None), default=0)
            if top_k > vocab:
                raise ConfigError(
                    f"methods.{method}.top_k: {top_k} is more than the vocabulary ({vocab} tokens)"
                )
        for student in cfg.students:
            where = f"students.{student.name}"
            try:
                if student.model is not None:
                    self._check_vocab(student, resolve_model_path(student.model, student.revision))
                else:
                    kept = derive_layers(teacher_config, student.derive)
                    check_derivable(teacher_config, kept, trust_remote_code=cfg.teacher.trust_remote_code)
                for method in cfg.methods:
                    for signals in self.grid_signals(method):
                        if signals.layer_map is not None:
                            self.layer_pairs(student, signals.layer_map, method)
            except (OSError, ValueError) as e:
                raise ConfigError(_field_error(where, e)) from None
        for name, settings in cfg.tasks.items():
            self._preflight_task(name, settings)

    def _preflight_task(self, name: str, settings: Any) -> None:
        """A task's template and label words, and its data: every file loaded (and so checked: encoding,
        columns, fields, not empty) and large enough for the subsets the config asks for."""
        try:
            task = get_task(name, settings)
            task.check(self.tokenizer)
        except ValueError as e:
            raise ConfigError(_field_error(f"tasks.{name}", e)) from None
        pool = task.load(task.train_split, self.data_dir)
        need = (settings.train_size or 0) + settings.selection_size + settings.transfer_size
        if need > len(pool):
            raise ConfigError(
                f"tasks.{name}: train_size + selection_size + transfer_size = {need}, but the "
                f"{task.train_split} split {task.source(task.train_split, self.data_dir)} has {len(pool)} "
                "examples"
            )
        evals = task.load(task.eval_split, self.data_dir)
        if settings.eval_size is not None and settings.eval_size > len(evals):
            raise ConfigError(
                f"tasks.{name}: eval_size {settings.eval_size}, but the {task.eval_split} split "
                f"{task.source(task.eval_split, self.data_dir)} has "
                f"{len(evals)} examples"
            )

    def _finished_runs(self) -> list[RunRecord]:
        """The study's finished runs, read without writing: from the registry, or from the run folders'
        records when the registry file is gone."""
        path = self.out / REGISTRY_NAME
        if path.exists():
            return Registry(path, readonly=True).runs(status="done")
        return find_run_records(self.out)[0] if self.out.is_dir() else []

    def _check_finished_runs(self, finished: Sequence[RunRecord]) -> None:
        """Refuse a config under which a run the study finished would now be a different run (same id, other
        settings), unless --force: its result would no longer match the study. Checked up front, so the
        refused config is never written to study.yaml."""
        if self.force or not finished:
            return
        planned: dict[str, str] = {}
        for name in self.config.tasks:
            planned.update(self._teacher_run_hashes(name))
        combos = {(r.task, r.student, r.method) for r in finished if r.kind == "student"}
        students = {st.name: st for st in self.config.students}
        for task, name, method in sorted(combos):
            student = students.get(name)
            if task not in self.config.tasks or method not in self.config.methods or student is None:
                continue  # not part of this study any more: nothing to compare
            points, axes = self.grid(method)
            seeds = self.config.seeds
            for seed, stage in [(seeds[0], "grid")] + [(x, "final") for x in seeds[1:]]:
                for point in points:
                    spec = self.student_spec(student, task, method, point, axes, seed, stage)
                    planned[spec.id] = spec.config_hash
        changed = [r.id for r in finished if r.id in planned and planned[r.id] != r.config_hash]
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise RegistryError(
                f"{len(changed)} finished run(s) of {self.out} were made with other settings than this "
                f"config gives them ({shown}): the study changed under finished runs. Use a new output "
                "folder, or --force to redo them; the study folder was left as it was"
            )

    def _teacher_run_hashes(self, name: str) -> dict[str, str]:
        """Config hashes of task `name`'s teacher runs (`teacher_stage` records them; preflight compares)."""
        cfg, settings = self.config.teacher, self.config.tasks[name].model_dump(mode="json")
        hashes = {
            f"teacher-{name}-zero-shot": self._hash(
                cfg.model, settings, self.config.evaluation, self.config.data_seed
            )
        }
        if cfg.adapt:
            hashes[f"teacher-{name}"] = self._hash(
                cfg.model_dump(mode="json"), settings, self.config.evaluation, self.config.data_seed,
                self.seed("teacher"),
            )
        return hashes

    def _command(self, name: str, *flags: str) -> str:
        """A `kdlab` command line for this study folder (error messages name commands that work)."""
        parts = ["kdlab", name, "--out", str(self.out)]
        if self.data_dir is not None:
            parts += ["--data-dir", str(self.data_dir)]
        return " ".join(parts + list(flags))

    def _cache_hint(self, message: str) -> str:
        return message.replace(
            REBUILD_HINT,
            f"rebuild it with `{self._command('cache', '--rebuild')}` (or add --rebuild-cache to this "
            "command)",
        )

    @property
    def base_teacher_path(self) -> str:
        return resolve_model_path(self.config.teacher.model, self.config.teacher.revision)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.base_teacher_path, trust_remote_code=self.config.teacher.trust_remote_code
            )
        return self._tokenizer

    def teacher_path(self, task: str) -> str:
        return str(self.out / "teacher" / task) if self.config.teacher.adapt else self.base_teacher_path

    def cache_dir(self, task: str) -> Path:
        root = Path(self.config.cache.dir) if self.config.cache.dir else self.out / "teacher_cache"
        return root / task

    # -- data ---------------------------------------------------------------------------------------------

    def data(self, name: str) -> TaskData:
        if name in self._data:
            return self._data[name]
        settings = self.config.tasks[name]
        task = get_task(name, settings)
        seed = self.config.data_seed
        pool = task.load(task.train_split, self.data_dir)
        train_ex, selection = split_train_selection(pool, settings.train_size, settings.selection_size, seed)
        transfer = transfer_subset(pool, settings.train_size, settings.selection_size, settings.transfer_size,
                                   seed)
        eval_ex = subset(task.load(task.eval_split, self.data_dir), settings.eval_size, seed)
        pairs, counts = task.build_prompts(train_ex, self.tokenizer, training=True)
        prompts = {ex.id: p for ex, p in pairs}
        encoded = {}
        for ex, p in pairs:
            enc = encode(task, ex, p, self.tokenizer)
            if enc is None:
                counts["skipped"] = counts.get("skipped", 0) + 1
            else:
                encoded[ex.id] = enc
        data = TaskData(task, train_ex, selection, eval_ex, transfer, prompts, encoded, counts)
        manifest = {
            "task": name,
            "data_seed": seed,
            "counts": counts,
            "train": [e.id for e in train_ex],
            "selection": [e.id for e in selection],
            "eval": [e.id for e in eval_ex],
            "transfer": [e.id for e in transfer],
        }
        if self.ranks.leader:
            (self.out / "data").mkdir(exist_ok=True)
            (self.out / "data" / f"{name}.json").write_text(json.dumps(manifest))
        self._log(
            f"[data] {name}: train {len(encoded)} (truncated {counts.get('truncated', 0)}, skipped "
            f"{counts.get('skipped', 0)}), selection {len(selection)}, eval {len(eval_ex)}"
            + (f", transfer {len(transfer)}" if transfer else "")
        )
        self._data[name] = data
        return data

    # -- registry helpers ---------------------------------------------------------------------------------

    def _hash(self, *parts: Any) -> str:
        return fingerprint({"parts": [json.loads(json.dumps(p, default=str)) for p in parts]})[:16]

    def _execute(
        self,
        spec: RunSpec,
        body: Callable[[], dict[str, Any]],
        *,
        force: bool = False,
        collective: bool = False,
    ) -> RunRecord | None:
        """Run `body` once for `spec` unless it is done, held by another live process, or already failed
        in this process. Returns the run's record, or None while another process holds it. `force` redoes
        a finished run whose settings changed. Under a multi-process launch the leader decides and records;
        a `collective` body (training) runs on every rank, any other body on the leader alone."""
        decision = None
        if self.ranks.leader:
            record = self.registry.add(spec, force=force or self.force)
            if record.status == "done" or (record.status == "failed" and spec.id in self._tried):
                decision = "skip"
            else:
                decision = "run" if self.registry.claim(spec.id) else "busy"
        decision = self.ranks.share(decision)
        if decision == "busy":
            return None
        if decision == "skip":
            return self.registry.get(spec.id)
        self._tried.add(spec.id)
        folder = self._record_folder(spec)
        if self.ranks.leader and folder is not None:
            # The run is being redone: its old record must not restore an old result after a rebuild.
            (folder / RUN_RECORD).unlink(missing_ok=True)
        start = time.perf_counter()
        beating = _Heartbeat(self.registry, spec.id) if self.ranks.leader else None
        metrics: dict[str, Any] = {}
        error = None
        try:
            if collective or self.ranks.leader:
                metrics = body()
        except KeyboardInterrupt:
            if self.ranks.leader:
                self.registry.release(spec.id)
            raise
        except Exception as e:
            # One broken run must not stop the study: record it, go on, and report it at the end.
            error = (f"{type(e).__name__}: {e}", traceback.format_exc())
            log.debug("run %s failed", spec.id, exc_info=True)
        finally:
            if beating is not None:
                beating.stop()
            gc.collect()
        errors = [e for e in self.ranks.gather(error) if e is not None]
        if self.ranks.leader:
            if errors:
                self.registry.fail(spec.id, "\n".join(tb for _, tb in errors))
                self._log(f"[failed] {spec.id}: {errors[0][0].strip().splitlines()[0]}")
            else:
                wall = time.perf_counter() - start
                self.registry.finish(spec.id, metrics, wall)
                if folder is not None and folder.is_dir():
                    # The registry row, kept with the run: `kdlab registry rebuild` restores it from here.
                    write_run_record(folder, self.registry.get(spec.id))
                self._log(f"[done] {spec.id}: {self._summary(spec, metrics)} ({wall:.0f}s)")
        self.ranks.barrier()
        return self.registry.get(spec.id)

    def _execute_required(
        self,
        spec: RunSpec,
        body: Callable[[], dict[str, Any]],
        poll_seconds: float = 5.0,
        force: bool = False,
        collective: bool = False,
    ) -> RunRecord:
        """Like `_execute` for runs later stages depend on: waits for another process, raises on failure."""
        while (record := self._execute(spec, body, force=force, collective=collective)) is None:
            force = False  # another process took the forced run: wait for it, do not reset it again
            time.sleep(poll_seconds)
        if record.status != "done":
            last = ((record.error or "").strip().splitlines() or ["no error recorded"])[-1]
            raise StudyError(
                f"{spec.id} failed ({last}); later stages need it. Traceback: `kdlab status {self.out} "
                f"--run {spec.id}`; re-run the command to retry it"
            )
        return record

    def _record_folder(self, spec: RunSpec) -> Path | None:
        """Where a run keeps its `run.json`: its own folder, when that lies inside the study folder (a
        shared cache folder elsewhere keeps none)."""
        if not spec.output_dir:
            return None
        folder = Path(spec.output_dir)
        return folder if folder.resolve().is_relative_to(self.out.resolve()) else None

    def _summary(self, spec: RunSpec, metrics: dict[str, Any]) -> str:
        if "cache" in metrics:
            c = metrics["cache"]
            fields = ", ".join(c["fields"])
            text = f"{c['examples']} examples, {c['answer_tokens']} answer tokens, fields {fields}"
            if "topk_bytes_per_token" in c:
                text += f", top-k {c['topk_bytes_per_token']:.0f} bytes/token"
            return text
        ev = metrics.get("eval", {})
        sel = metrics.get("selection", {})
        keys = [k for k in get_task(spec.task, self.config.tasks.get(spec.task)).metrics if k in ev]
        text = ", ".join(f"{k} {ev[k]:.1f}" for k in keys)
        if sel:
            text += " | selection " + ", ".join(f"{k} {sel[k]:.1f}" for k in keys if k in sel)
        return text

    def _evaluate_model(
        self,
        model,
        task_data: TaskData,
        folder: Path,
        label: str,
        splits: Sequence[str] = ("selection", "eval"),
    ) -> dict[str, Any]:
        task = task_data.task
        model.to(dtype=getattr(torch, self.config.evaluation.dtype))
        metrics: dict[str, Any] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for split in splits:
            examples = task_data.selection if split == "selection" else task_data.eval
            result = evaluate(
                task,
                model,
                self.tokenizer,
                examples,
                batch_size=self.config.evaluation.batch_size,
                desc=f"{label} {split}",
            )
            task.write_predictions(result.predictions, folder / task.predictions_file(split))
            metrics[split] = {
                **result.metrics,
                "truncated": result.counts.get("truncated", 0),
                "seconds": round(result.seconds, 2),
            }
        return metrics

    # -- teacher ------------------------------------------------------------------------------------------

    def teacher_stage(self, name: str) -> None:
        cfg = self.config.teacher
        data = self.data(name)
        dtype = self.config.evaluation.dtype
        common = dict(kind="teacher", task=name, method="teacher", student="teacher", seed=None)
        hashes = self._teacher_run_hashes(name)

        def zero_shot() -> dict[str, Any]:
            model = load_model(
                self.base_teacher_path,
                dtype=dtype,
                device=self.device,
                trust_remote_code=cfg.trust_remote_code,
            )
            return self._evaluate_model(model, data, self.out / "teacher" / f"{name}-zero-shot", "teacher")

        self._execute_required(
            RunSpec(
                id=f"teacher-{name}-zero-shot",
                stage="teacher",
                params={"adapted": False},
                config_hash=hashes[f"teacher-{name}-zero-shot"],
                output_dir=str(self.out / "teacher" / f"{name}-zero-shot"),
                **common,
            ),
            zero_shot,
        )
        if not cfg.adapt:
            return
        folder = Path(self.teacher_path(name))
        seed = self.seed("teacher")

        def adapt() -> dict[str, Any]:
            seed_everything(seed)  # LoRA adapters are initialised from the global generator
            model = load_model(
                self.base_teacher_path, device=self.device, trust_remote_code=cfg.trust_remote_code
            )
            if cfg.finetune == "lora":
                model = add_lora(model, cfg.lora)
            examples = (
                subset(data.train, cfg.train_size, self.config.data_seed) if cfg.train_size else data.train
            )
            items = [TrainItem(gold=data.encoded[e.id]) for e in examples if e.id in data.encoded]
            result = train(
                model,
                items,
                method=baseline(),  # plain fine-tuning on the gold answers
                params={},
                settings=cfg.training,
                output_dir=folder.with_name(folder.name + "-trainer"),
                seed=seed,
                pad_id=self.tokenizer.pad_token_id,
                vocab_size=len(self.tokenizer),
                run_name=f"teacher-{name}",
            )
            if not self.ranks.leader:
                return {}
            model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            partial = folder.with_name(folder.name + ".partial")
            save_model(model, self.tokenizer, partial)
            if folder.exists():
                shutil.rmtree(folder)
            partial.rename(folder)  # a killed save never leaves a half-written teacher behind
            metrics = self._evaluate_model(model, data, folder.with_name(name + "-eval"), "teacher")
            metrics["train_runtime"] = round(result.train_runtime, 1)
            return metrics

        spec = RunSpec(
            id=f"teacher-{name}",
            stage="teacher",
            params={"adapted": True},
            config_hash=hashes[f"teacher-{name}"],
            output_dir=str(folder),
            **dict(common, seed=seed),
        )
        record = self.registry.get(spec.id)
        if self.ranks.leader and record is not None and record.status == "done" and not folder.is_dir():
            self.registry.reset(spec.id)  # the registry says done but the model is gone: redo it
        self._execute_required(spec, adapt, collective=True)

    # -- students -----------------------------------------------------------------------------------------

    def student_path(self, student: StudentSettings) -> str:
        if student.model is not None:
            return resolve_model_path(student.model, student.revision)
        folder = self.out / "students" / student.name / "init"
        if self.ranks.share((folder / "config.json").is_file()):
            return str(folder)
        cfg = self.config.teacher
        teacher_path = resolve_model_path(cfg.model, cfg.revision)
        # Checked on the config alone (meta device), so an unsupported family fails before the teacher loads.
        config = model_config(teacher_path, trust_remote_code=cfg.trust_remote_code)
        layers = derive_layers(config, student.derive)
        check_derivable(config, layers, trust_remote_code=cfg.trust_remote_code)
        teacher = load_model(teacher_path, trust_remote_code=cfg.trust_remote_code)
        n = num_layers(teacher.config)
        seed_everything(self.seed("student-init"))
        model = derive_student(teacher, layers)  # checks its logits against the teacher's blocks

        def build(tmp: Path) -> None:
            save_model(model, self.tokenizer, tmp)
            origin = {"teacher": cfg.model, "revision": cfg.revision, "teacher_layers": layers}
            if (hub := hub_snapshot_info(teacher_path)) is not None:
                origin["commit"] = hub[1]
            (tmp / "derived_from.json").write_text(json.dumps(origin))

        # Built aside and renamed: a killed build or a second process never leaves a half-written student.
        if self.ranks.leader:
            atomic_folder(folder, build)
        self.ranks.barrier()
        self._log(
            f"[student] {student.name}: {len(layers)} of {n} teacher layers {layers}, "
            f"{count_parameters(model)[0] / 1e6:.1f}M parameters"
        )
        return str(folder)

    def _check_vocab(self, student: StudentSettings, path: str) -> None:
        tok = load_tokenizer(path, trust_remote_code=student.trust_remote_code)
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"students.{student.name}: its tokenizer differs from the teacher's "
                f"({len(tok)} vs {len(self.tokenizer)} tokens); KD needs a shared vocabulary"
            )

    def _layer_counts(self, student: StudentSettings) -> tuple[list[int] | None, int, int]:
        """(a derived student's teacher blocks or None, student layers, teacher layers), from the configs
        alone, so layer maps resolve before the derived student is built."""
        # Layer counts from each family's config (num_hidden_layers, n_layer, ...; the text part of multimodal
        # configs), so any decoder family works; hidden states come from output_hidden_states (scored.py).
        cfg = self.config.teacher
        teacher_config = model_config(self.base_teacher_path, trust_remote_code=cfg.trust_remote_code)
        t_layers = num_layers(teacher_config)
        if student.derive is not None:
            kept = derive_layers(teacher_config, student.derive)
            return kept, len(kept), t_layers
        path = resolve_model_path(student.model, student.revision)
        trust = student.trust_remote_code or cfg.trust_remote_code
        return None, num_layers(model_config(path, trust_remote_code=trust)), t_layers

    def layer_pairs(self, student: StudentSettings, layer_map: Any, method: str) -> list[tuple[int, int]]:
        """(student, teacher) hidden-state pairs of `method`'s layer map for this student
        (`resolve_layer_pairs`)."""
        kept, s_layers, t_layers = self._layer_counts(student)
        return resolve_layer_pairs(layer_map, kept, s_layers, t_layers, f"methods.{method}.layer_map")

    def grid_signals(self, method: str) -> list[Signals]:
        """What each grid point of `method` reads from the teacher."""
        return [get_method(method).signals(point) for point in self.grid(method)[0]]

    def seed(self, stage: str, run_seed: int | None = None) -> int:
        return stage_seed(self.config.seeds, self.config.data_seed, stage, run_seed)

    # -- teacher cache ------------------------------------------------------------------------------------

    def cache_contents(self) -> CacheContents | None:
        """What the teacher cache must hold for every grid point of every method and every student; None:
        no method reads the teacher, or the teacher runs live (`cache.mode: online`)."""
        if self.config.cache.mode == "online":
            return None
        answers, top_k, temperatures, layers = False, None, set(), set()
        for method in self.config.methods:
            for signals in self.grid_signals(method):
                answers |= signals.answers
                if signals.top_k is not None:
                    top_k = max(top_k or 0, signals.top_k)
                    temperatures.add(float(signals.temperature))
                if signals.layer_map is not None:
                    for student in self.config.students:
                        layers |= {t for _, t in self.layer_pairs(student, signals.layer_map, method)}
        if not (answers or top_k or layers):
            return None
        return CacheContents(answers, top_k, sorted(temperatures) if top_k else None, sorted(layers))

    def verify_caches(self) -> list[tuple[str, Path, str | None]]:
        """`kdlab cache --verify`: hash every file of each task's teacher cache against its manifest.
        (task, folder, None when intact, else the error naming the file and the repair command). Integrity
        only: whether a cache still fits the config is checked when a run uses it."""
        if self.cache_contents() is None:
            return []
        results: list[tuple[str, Path, str | None]] = []
        for name in self.config.tasks:
            directory = self.cache_dir(name)
            try:
                TeacherCache.open(directory, verify="hash")
                results.append((name, directory, None))
            except CacheError as e:
                results.append((name, directory, self._cache_hint(str(e))))
        return results

    def cache_stage(self, name: str) -> TeacherCache | None:
        contents = self.cache_contents()
        if contents is None:
            return None
        layers, answers, temperatures = contents.hidden_layers, contents.answers, contents.temperatures
        empty_answers = self.config.cache.empty_answers  # KD2: empty/degenerate teacher answers
        data = self.data(name)
        teacher_dir = self.teacher_path(name)
        inputs = cache_fingerprint_inputs(
            teacher_weights=hash_model_files(teacher_dir),  # == hash_directory, large files read once
            tokenizer=self.tokenizer,
            task=data.task,
            split=data.task.train_split,
            example_ids=[e.id for e in data.train],
            top_k=contents.top_k,
            hidden_layers=layers,
            answers=answers,
            dtype=self.config.evaluation.dtype,
            hidden_dtype=self.config.cache.hidden_dtype,
            temperatures=temperatures,
            empty_answers=empty_answers,
            transfer_ids=[e.id for e in data.transfer],
        )
        directory = self.cache_dir(name)
        expected = fingerprint(inputs)
        # A cache that fails verification (another fingerprint, a missing, truncated or corrupt file) is
        # rebuilt when asked, else refused with the command that rebuilds it; one that never finished (no
        # manifest) is simply built again.
        failed_verification = False
        if self.ranks.share((directory / "manifest.json").is_file()):
            try:
                return TeacherCache.open(directory, expected_fingerprint=expected, expected_inputs=inputs)
            except CacheError as e:
                if not self.rebuild_cache:
                    e.args = (self._cache_hint(str(e)),)
                    raise
                reason = str(e).splitlines()[0].split("; rebuild it")[0]
                self._log(f"[cache] {name}: {reason}; rebuilding it as asked")
                failed_verification = True

        def build() -> dict[str, Any]:
            self._log(f"[cache] {name}: building the teacher cache in {directory}")
            teacher = load_model(teacher_dir, dtype=self.config.evaluation.dtype, device=self.device)
            cache = build_teacher_cache(
                directory,
                task=data.task,
                teacher=teacher,
                tokenizer=self.tokenizer,
                examples=data.train,
                encoded=data.encoded,
                fingerprint_inputs=inputs,
                top_k=inputs["top_k"],
                hidden_layers=layers,
                answers=answers,
                batch_size=self.config.evaluation.batch_size,
                hidden_dtype=self.config.cache.hidden_dtype,
                overwrite=True,  # whatever is there failed verification: built beside, then swapped in
                temperatures=temperatures or (),
                empty_answers=empty_answers,
                transfer=data.transfer,
            )
            stats = {"examples": len(cache), "answer_tokens": cache.num_tokens, "fields": list(cache.fields)}
            if "topk" in cache.fields:
                # Top-k arrays plus the fp32 tail of every temperature; the parts are kept too.
                stats["topk_bytes_per_token"] = cache.bytes_per_token()
                stats["kd1_bytes_per_token_parts"] = cache.bytes_per_token_parts()
            if cache.manifest.get("answers"):
                stats["answers"] = cache.manifest["answers"]
            return {"cache": stats}

        # Claimed in the registry like any run, so two processes never build the same cache at once.
        spec = RunSpec(
            id=f"cache-{name}",
            kind="teacher",
            task=name,
            method="cache",
            student="teacher",
            stage="teacher",
            params={"fingerprint": expected},
            seed=None,
            config_hash=expected[:16],
            output_dir=str(directory),
        )
        record = self.registry.get(spec.id)
        if (
            self.ranks.leader
            and record is not None
            and record.status == "done"
            and (failed_verification or not (directory / "manifest.json").is_file())
        ):
            self.registry.reset(spec.id)  # the registry says done but the cache is gone or broken: rebuild
        self._execute_required(spec, build)
        return TeacherCache.open(directory, expected_fingerprint=expected, expected_inputs=inputs)

    # -- student runs -------------------------------------------------------------------------------------

    def grid(self, method: str) -> tuple[list[dict[str, Any]], list[str]]:
        settings = self.config.methods[method]
        axes = settings.grid_axes()
        fixed = {k: v for k, v in settings.model_dump().items() if k not in axes}
        names = list(axes)
        points = [
            dict(fixed, **dict(zip(names, values, strict=True)))
            for values in itertools.product(*(axes[n] for n in names))
        ]
        shown = [n for n in names if len(axes[n]) > 1 or n == "lam"]
        return points, shown

    def student_spec(
        self,
        student: StudentSettings,
        task: str,
        method: str,
        params: dict[str, Any],
        axes: Sequence[str],
        seed: int,
        stage: str,
    ) -> RunSpec:
        layer_map = get_method(method).signals(params).layer_map
        if layer_map is not None:  # the exact pairs a map resolves to, recorded with the run
            pairs = self.layer_pairs(student, layer_map, method)
            params = dict(params, layer_pairs=[list(p) for p in pairs])
        rid = run_id(method, task, student.name, params, axes, seed)
        return RunSpec(
            id=rid,
            kind="student",
            task=task,
            method=method,
            student=student.name,
            stage=stage,
            params=params,
            seed=seed,
            output_dir=str(self.out / "runs" / rid),
            config_hash=self._hash(
                student.model_dump(mode="json"),
                self.config.teacher.model_dump(mode="json"),
                self.config.tasks[task].model_dump(mode="json"),
                params,
                self.config.training,
                self.config.evaluation,
                self.config.cache.mode,
                self.config.data_seed,
                seed,
            ),
        )

    def student_run(
        self, spec: RunSpec, student: StudentSettings, cache: TeacherCache | None
    ) -> RunRecord | None:
        def body() -> dict[str, Any]:
            return self._train_student(spec, student, cache)

        return self._execute(spec, body, collective=True)

    def _train_student(self, spec: RunSpec, student: StudentSettings, cache: TeacherCache | None) -> dict:
        data = self.data(spec.task)
        method = get_method(spec.method)
        signals = method.signals(spec.params)
        path = self.student_path(student)
        folder = Path(spec.output_dir)
        seed_everything(self.seed("student", spec.seed))  # LoRA init, KD3 projections, data order
        model = load_model(path, device=self.device, trust_remote_code=student.trust_remote_code)
        if student.finetune == "lora":
            model = add_lora(model, student.lora)
        pairs = [] if signals.layer_map is None else self.layer_pairs(student, signals.layer_map, spec.method)
        projections = None
        if pairs:
            width = hidden_width(model_config(self.base_teacher_path))
            projections = losses.make_projections(pairs, hidden_width(model.config), width).to(self.device)
        live = None
        if self.config.cache.mode == "online" and signals.from_teacher:
            live = load_model(self.teacher_path(spec.task), device=self.device)
            live.requires_grad_(False)
        items = self._train_items(data, signals, cache, live)
        # An interrupted run continues from its last checkpoint (training.save_steps > 0).
        trainer_dir = folder / "trainer"
        last = get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None
        if last:
            self._log(f"[resume] {spec.id} from {last}")
        result = train(
            model,
            items,
            method=method,
            params=spec.params,
            settings=self.config.training,
            output_dir=trainer_dir,
            seed=spec.seed,
            pad_id=self.tokenizer.pad_token_id,
            vocab_size=len(self.tokenizer),
            cache=cache,
            live_teacher=live,
            layer_pairs=pairs,
            projections=projections,
            resume_from_checkpoint=last,
            run_name=spec.id,
        )
        del live
        if not self.ranks.leader:
            return {}  # the leader saves and evaluates
        (folder / "log_history.json").write_text(json.dumps(result.log_history))
        total, trainable = count_parameters(model)
        save_model(model, self.tokenizer, folder / "model", merged=student.save == "merged")
        if projections is not None:
            save_file(
                {k: v.contiguous() for k, v in projections.state_dict().items()},
                folder / "model" / "kd3_projections.safetensors",
            )
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        # The selection split only serves to choose among grid settings: a method with one setting skips it.
        choosing = len(self.grid(spec.method)[0]) > 1
        splits = ("selection", "eval") if choosing else ("eval",)
        metrics = self._evaluate_model(model, data, folder, spec.id, splits=splits)
        metrics.update(
            train_runtime=round(result.train_runtime, 1),
            steps=result.steps,
            train_examples=len(items),
            trainable_parameters=trainable,
            parameters=total,
        )
        return metrics

    def _train_items(
        self, data: TaskData, signals: Signals, cache: TeacherCache | None, live: Any
    ) -> list[TrainItem]:
        """The gold examples (with the teacher's answer as a second target when the method reads answers),
        then, for methods that learn from the teacher, the transfer set labelled by the teacher's answers (no
        task loss on those)."""
        task, tokenizer = data.task, self.tokenizer
        uses_teacher = signals.from_teacher
        batch_size = self.config.evaluation.batch_size
        answers: dict[str, Any] = {}
        transfer_answers: dict[str, Any] = {}
        if live is not None:
            if signals.answers:
                raw, _ = predict(
                    task, live, tokenizer, data.train, batch_size=batch_size, training_prompts=True
                )
                policy = self.config.cache.empty_answers
                answers = {ex.id: teacher_answer(task, ex, raw.get(ex.id, ""), policy) for ex in data.train}
            if uses_teacher and data.transfer:
                transfer_answers, _ = predict(task, live, tokenizer, data.transfer, batch_size=batch_size)
        elif cache is not None:
            if signals.answers:
                answers = {i: cache.answer(i) for i in data.encoded}
            transfer_answers = {e.id: cache.answer(e.id) for e in data.transfer if e.id in cache}
        items = []
        for ex in data.train:
            gold = data.encoded.get(ex.id)
            if gold is None:
                continue
            teacher_item = None
            if signals.answers:
                if answers.get(ex.id) is None:
                    continue  # an empty teacher answer dropped by `cache.empty_answers: drop`
                target = task.answer_target(answers[ex.id])
                teacher_item = encode(task, ex, data.prompts[ex.id], tokenizer, target=target)
                if teacher_item is None:
                    continue
            items.append(TrainItem(gold=gold, teacher=teacher_item))
        if uses_teacher:
            for ex in data.transfer:
                item = transfer_item(task, tokenizer, ex, transfer_answers.get(ex.id))
                if item is not None:
                    teacher_item = item if signals.answers else None
                    items.append(TrainItem(gold=item, teacher=teacher_item, transfer=True))
        return items

    # -- selection ----------------------------------------------------------------------------------------

    def select_best(self, task: str, method: str, student: str, grid_runs: Sequence[RunRecord]) -> RunRecord:
        """Best grid run on the selection split's task metric (losses of different methods don't compare)."""
        metric = self.data(task).task.metric
        best = max(grid_runs, key=lambda r: r.metrics["selection"][metric])
        path = self.out / "selection.json"
        chosen = json.loads(path.read_text()) if path.exists() else {}
        chosen[f"{method}-{task}-{student}"] = {
            "metric": f"selection {metric}",
            "chosen": best.params,
            "run": best.id,
            "candidates": {r.id: r.metrics["selection"][metric] for r in grid_runs},
            "why": f"highest selection-split {metric} ({best.metrics['selection'][metric]:.2f}) of "
            f"{len(grid_runs)} settings",
        }
        if self.ranks.leader:
            path.write_text(json.dumps(chosen, indent=1))
        return best

    def _advance(self, name: str, student: StudentSettings, method: str) -> str:
        """Move one (task, student, method) forward: grid on the first seed, then the best setting on the
        other seeds. Returns 'done', 'waiting' (another process holds a run) or 'failed'."""
        seeds = self.config.seeds
        points, axes = self.grid(method)
        cache = self._caches.get(name)
        specs = [self.student_spec(student, name, method, p, axes, seeds[0], "grid") for p in points]
        grid_runs = [self.student_run(s, student, cache) for s in specs]
        if any(r is None for r in grid_runs):
            return "waiting"
        if any(r.status != "done" for r in grid_runs):
            return "failed"
        best = self.select_best(name, method, student.name, grid_runs) if len(grid_runs) > 1 else grid_runs[0]
        finals = [
            self.student_run(
                self.student_spec(student, name, method, best.params, axes, seed, "final"), student, cache
            )
            for seed in seeds[1:]
        ]
        if any(r is None for r in finals):
            return "waiting"
        return "done" if all(r.status == "done" for r in finals) else "failed"

    def sweep(self, poll_seconds: float = 5.0) -> list[str]:
        """Every student run of the study, shared safely with other processes running the same sweep.
        Returns the ids of failed runs (kept as `failed`)."""
        for name in self.config.tasks:
            if name not in self._caches:
                self._caches[name] = self.cache_stage(name)
        while True:
            states = [
                self._advance(name, student, method)
                for name in self.config.tasks
                for student in self.config.students
                for method in self.config.methods
            ]
            if "waiting" not in states:
                break
            time.sleep(poll_seconds)  # another process holds a run we depend on
        self.failed = [r.id for r in self.registry.runs(status="failed")]
        return self.failed

    def prepare(self) -> None:
        """Data, teacher (zero-shot, adaptation, evaluation) and the students' initial weights."""
        for name in self.config.tasks:
            self.data(name)
        for name in self.config.tasks:
            self.teacher_stage(name)
        for student in self.config.students:
            self.student_path(student)  # derived students are built here (vocabularies: `preflight`)

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
        models = {"teacher": _model_provenance(self.config.teacher.model, self.config.teacher.revision)}
        for student in self.config.students:
            if student.model is not None:
                models[f"students.{student.name}"] = _model_provenance(student.model, student.revision)
        data: dict[str, Any] = {}
        for name, settings in self.config.tasks.items():
            files = get_task(name, settings).data_files(self.data_dir)
            hashed = {f: hash_file(path) for f, path in files.items()}
            data[name] = {"files": hashed} if files else {"source": "hub"}
        return {"deterministic": self.config.deterministic, "seeds": seeds, "models": models, "data": data}

    def run(self) -> pd.DataFrame:
        """The whole study; returns the results table (`results`). `failed` holds the ids of the runs that
        failed (empty when everything is done)."""
        start = time.perf_counter()
        self.prepare()
        failed = self.sweep()
        paths: list[Path] = []
        if self.ranks.leader:  # inference only: one process measures and writes
            atomic_write_text(self.out / "provenance.json", json.dumps(self.provenance(), indent=1))
            if self.config.bench.enabled:
                from kdlab.bench import write_bench

                write_bench(self, reuse=True)
            from kdlab.report import write_results

            paths = write_results(self)
        self.written = paths
        self.ranks.barrier()
        self._log(
            f"[study] finished in {time.perf_counter() - start:.0f}s; results: "
            + ", ".join(str(p) for p in paths)
        )
        if failed:
            self._log(
                f"[study] {len(failed)} run(s) failed: {', '.join(failed)}; see `kdlab status` and re-run "
                "to retry them"
            )
        return self.results()

    def results(self) -> pd.DataFrame:
        """One row per run of the study, as results.csv: identity, status, params, metrics, wall time."""
        from kdlab.report import chosen_groups, load_outputs, results_table

        outputs = load_outputs(self.out)
        header, rows = results_table(outputs, chosen_groups(outputs))
        return pd.DataFrame(rows, columns=header)

    def plan(self) -> list[tuple[str, str]]:
        """(run id, status) of every run the study needs, in the order it does them, without doing or
        writing anything (`kdlab run --dry-run`). The other seeds of a grid with several settings run its
        best setting, unknown until the grid is done: shown as `<best>`."""
        registry = self.registry
        status = {r.id: r.status for r in registry.runs()} if registry is not None else {}
        ids: list[str] = []
        for name in self.config.tasks:
            ids += list(self._teacher_run_hashes(name))
        if self.cache_contents() is not None:
            ids += [f"cache-{name}" for name in self.config.tasks]
        selected = json.loads((self.out / "selection.json").read_text()) if (
            self.out / "selection.json").is_file() else {}
        seeds = self.config.seeds
        combos = itertools.product(self.config.tasks, self.config.students, self.config.methods)
        for name, student, method in combos:
            points, axes = self.grid(method)
            ids += [self.student_spec(student, name, method, p, axes, seeds[0], "grid").id for p in points]
            chosen = selected.get(f"{method}-{name}-{student.name}", {}).get("chosen")
            best = points[0] if len(points) == 1 else chosen
            for seed in seeds[1:]:
                if best is None:
                    ids.append(f"{method}-{name}-{student.name}-<best>-seed{seed}")
                else:
                    ids.append(self.student_spec(student, name, method, best, axes, seed, "final").id)
        return [(i, status.get(i, "todo")) for i in ids]
