"""Checks before any work: everything a study needs that can be checked without training, and whether the
config still agrees with the runs the study folder already finished. A command refused here leaves the study
folder exactly as it was."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kdlab.benchmarks import check_benchmarks
from kdlab.config import ConfigError, StudyConfig, TaskSettings
from kdlab.errors import RegistryError
from kdlab.identity import Rekey, run_hash, runs_to_rekey
from kdlab.models import check_derivable, derive_layers, model_config, resolve_model_path
from kdlab.registry import Registry, RunRecord, find_run_records
from kdlab.stages.students import check_vocabulary
from kdlab.tasks import get_task
from kdlab.training import check_trainer_arguments

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView


def field_error(where: str, error: Exception) -> str:
    """One line naming the config field a check failed for (messages that name it already are kept)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if text.startswith(where) else f"{where}: {text}"


def preflight(study: StudyView) -> None:
    """Model paths, tokenizers (a student with its own vocabulary only with methods that work across
    tokenizers), derivable students and layer maps, top-k within the vocabulary, data files with their
    fields, subset sizes, labels. Raises ConfigError / DataError naming the field or file."""
    cfg = study.config
    check_training_arguments(cfg)
    try:
        teacher_path = resolve_model_path(cfg.teacher.model, cfg.teacher.revision)
        teacher_config = model_config(teacher_path, trust_remote_code=cfg.teacher.trust_remote_code)
        vocab = len(study.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(field_error("teacher.model", e)) from None
    for method in cfg.methods:
        top_k = max((s.top_k for s in study.grid_signals(method) if s.top_k is not None), default=0)
        if top_k > vocab:
            raise ConfigError(f"methods.{method}.top_k: {top_k} is more than the vocabulary ({vocab} tokens)")
    for student in cfg.students:
        try:
            if student.model is not None:
                check_vocabulary(
                    student, resolve_model_path(student.model, student.revision), study.tokenizer,
                    cfg.methods,
                )
            else:
                kept = derive_layers(teacher_config, student.derive)
                check_derivable(teacher_config, kept, trust_remote_code=cfg.teacher.trust_remote_code)
            for method in cfg.methods:
                for signals in study.grid_signals(method):
                    if signals.layer_map is not None:
                        study.layer_pairs(student, signals.layer_map, method)
        except (OSError, ValueError) as e:
            raise ConfigError(field_error(f"students.{student.name}", e)) from None
    for name, settings in cfg.tasks.items():
        check_task(study, name, settings)
    if cfg.evaluation.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "evaluation.backend: vllm is not installed (pip install 'kdlab[vllm]' on a CUDA machine); "
            "or use backend: hf"
        )
    if cfg.evaluation.benchmarks is not None:
        check_benchmarks(cfg.evaluation.benchmarks)  # lm-eval installed (else how to), names known


def check_training_arguments(config: StudyConfig) -> None:
    """The TrainingArguments fields `training:` and `teacher.training:` pass through, checked against
    transformers (names, types, TrainingArguments' own checks); ConfigError names the field."""
    for where, settings in (("training", config.training), ("teacher.training", config.teacher.training)):
        if not settings.model_extra:
            continue
        try:
            check_trainer_arguments(settings)
        except ValueError as e:
            key, sep, reason = str(e).partition(": ")
            field = f"{where}.{key}" if sep and key in settings.model_extra else where
            raise ConfigError(f"{field}: {reason if field != where else e}") from None


def check_task(study: StudyView, name: str, settings: TaskSettings) -> None:
    """A task's template and labels, and its data: every file loaded (and so checked: encoding, columns,
    fields, not empty) and large enough for the subsets the config asks for."""
    try:
        task = get_task(name, settings)
        task.check(study.tokenizer)
    except ValueError as e:
        raise ConfigError(field_error(f"tasks.{name}", e)) from None
    pool = task.load(task.train_split, study.data_dir)
    need = (settings.train_size or 0) + settings.selection_size + settings.transfer_size
    if need > len(pool):
        raise ConfigError(
            f"tasks.{name}: train_size + selection_size + transfer_size = {need}, but the {task.train_split} "
            f"split {task.source(task.train_split, study.data_dir)} has {len(pool)} examples"
        )
    evals = task.load(task.eval_split, study.data_dir)
    if settings.eval_size is not None and settings.eval_size > len(evals):
        raise ConfigError(
            f"tasks.{name}: eval_size {settings.eval_size}, but the {task.eval_split} split "
            f"{task.source(task.eval_split, study.data_dir)} has {len(evals)} examples"
        )


def finished_runs(study: StudyView) -> list[RunRecord]:
    """The study's finished runs, read without writing: from the registry, or from the run folders' records
    when the registry file is gone."""
    path = study.layout.registry
    if path.exists():
        return Registry(path, readonly=True).runs(status="done")
    return find_run_records(study.out)[0] if study.out.is_dir() else []


def check_finished_runs(study: StudyView, finished: Sequence[RunRecord]) -> list[Rekey]:
    """Refuse a config under which a run the study finished would now be a different run (same id, other
    settings), unless --force: its result would no longer match the study. Checked up front, so the refused
    config is never written to study.yaml. Returns the finished runs recorded under kdlab 0.1.0's hash of
    the same settings, to be re-keyed (`identity.rekey_finished_runs`)."""
    if study.force or not finished:
        return []
    # Every run the config plans (the final runs of every grid point: which one was chosen does not matter).
    planned = {run.id: run.hash_parts for run in study.plan.runs()}
    rekeys = runs_to_rekey(finished, planned)
    old_hashes = {r.record.id for r in rekeys}
    changed = [r.id for r in finished if r.id in planned and r.id not in old_hashes
               and run_hash(*planned[r.id]) != r.config_hash]
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise RegistryError(
            f"{len(changed)} finished run(s) of {study.out} were made with other settings than this config "
            f"gives them ({shown}): the study changed under finished runs. Use a new output folder, or "
            "--force to redo them; the study folder was left as it was"
        )
    return rekeys
