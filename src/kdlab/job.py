"""One student run as data (`Job`) and the one function that does it (`run_job`).

A job is frozen and picklable: the run's spec, the settings it trains and evaluates with, and the paths it
reads (initial weights, the teacher, the cache, the data). The sweep makes one per run (`sweep.job_for`);
the local runner calls `run_job` in this process, the Ray executor ships the job to a worker, which calls the
same function. Nothing here sees the `Study`, so a worker never builds one.

    initial weights (+ LoRA) → training items (gold, teacher answers, transfer set) → `training.train`
    → save_pretrained → evaluate (selection split when the grid chooses, eval split) → diagnostics
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from kdlab import losses
from kdlab.alignment import same_vocabulary, vocabulary_map
from kdlab.config import EvaluationSettings, StudentSettings, TrainingSettings
from kdlab.distributed import Ranks
from kdlab.evaluation import evaluate_splits, generation_for, generation_options, predict
from kdlab.files import atomic_write_json
from kdlab.methods import Signals, get_method
from kdlab.models import (
    count_parameters,
    hidden_width,
    load_frozen,
    load_tokenizer,
    load_trainable,
    model_config,
    resolve_device,
    save_model,
)
from kdlab.registry import RunSpec
from kdlab.seeding import seed_everything
from kdlab.stages import diagnostics
from kdlab.stages.cache import teacher_answer, transfer_item
from kdlab.stages.data import TaskData, load_task_data
from kdlab.tasks.base import encode
from kdlab.teacher_cache import TeacherCache
from kdlab.training import TrainItem, last_checkpoint, train, with_teacher_view

log = logging.getLogger("kdlab")

# Learned feature projections, kept beside the model (named after KD3, which introduced them).
PROJECTIONS_FILE = "kd3_projections.safetensors"


@dataclass(frozen=True)
class CacheRef:
    """A teacher cache a job reads: its folder and the fingerprint the study verified."""

    directory: str
    fingerprint: str


@dataclass(frozen=True)
class Job:
    """Everything one student run needs, as plain values (a Ray worker receives it pickled).

    ``task_settings`` is the task section as JSON (a plugin's settings class is typed again where the
    plugins are imported, `plugins`); ``teacher`` is the teacher the students learn from (adapted or
    base), ``base_teacher`` the base model whose width the KD3 projections map to and whose tokenizer the
    study uses; ``seed`` the run's student-stage seed (LoRA init, projections, data order); ``choosing``:
    the run's grid has several settings, so it is also evaluated on the selection split."""

    spec: RunSpec
    student: StudentSettings
    initial_weights: str
    task_settings: dict[str, Any]
    data_dir: str | None
    data_seed: int
    teacher: str
    base_teacher: str
    trust_remote_code: bool
    training: TrainingSettings
    evaluation: EvaluationSettings
    live_teacher: bool
    empty_answers: str
    seed: int
    choosing: bool
    device: str = "auto"
    cache: CacheRef | None = None
    plugins: tuple[str, ...] = field(default_factory=tuple)


def with_absolute_paths(job: Job) -> Job:
    """`job` with its local paths absolute, for a process started elsewhere (a Ray worker on another node
    mounts the study folder at the same path); a hub model id stays as it is."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    spec = dataclasses.replace(job.spec, output_dir=str(Path(job.spec.output_dir).resolve()))
    cache = None if job.cache is None else CacheRef(absolute(job.cache.directory), job.cache.fingerprint)
    return dataclasses.replace(
        job, spec=spec, cache=cache, initial_weights=absolute(job.initial_weights),
        data_dir=absolute(job.data_dir), teacher=absolute(job.teacher),
        base_teacher=absolute(job.base_teacher),
    )


def run_job(
    job: Job,
    ranks: Ranks | None = None,
    *,
    tokenizer: Any = None,
    data: TaskData | None = None,
    cache: TeacherCache | None = None,
) -> dict[str, Any]:
    """Train, save and evaluate the run `job` describes; returns its metrics ({} on ranks other than the
    leader, which saves and evaluates). ``tokenizer``, ``data`` and ``cache``: what the caller already holds
    (the local sweep); a worker passes none and they are loaded from the job."""
    ranks = ranks or Ranks()
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(job.base_teacher, job.trust_remote_code)
    data = data if data is not None else _task_data(job, tokenizer)
    if cache is None and job.cache is not None:
        # The driver verified every hash before the sweep; sizes are enough here.
        cache = TeacherCache.open(job.cache.directory, expected_fingerprint=job.cache.fingerprint,
                                  verify="size")
    spec, settings = job.spec, job.training
    device = ranks.device or resolve_device(job.device)
    method = get_method(spec.method)
    signals = method.signals(spec.params)
    folder = Path(spec.output_dir)
    seed_everything(job.seed)  # LoRA init, projections, data order
    # Frozen weights in the dtype mixed precision computes in; trainable ones (LoRA, full) stay fp32.
    dtype = settings.compute_dtype
    model = load_trainable(
        job.initial_weights, finetune=job.student.finetune, lora=job.student.lora, dtype=dtype,
        device=device, trust_remote_code=job.student.trust_remote_code,
        attn_implementation=settings.attn_implementation,
    )
    pairs = [tuple(p) for p in spec.params.get("layer_pairs", [])]  # resolved by the plan
    projections = None
    if pairs:
        width = hidden_width(model_config(job.base_teacher))
        # Trainable: fp32 master weights; autocast runs their matmuls in the compute dtype.
        projections = losses.make_projections(pairs, hidden_width(model.config), width).to(device)
    live = None
    if job.live_teacher:
        live = load_frozen(job.teacher, dtype=dtype, device=device,
                           attn_implementation=settings.attn_implementation)
    # A student with its own tokenizer trains, saves and is evaluated in its tokens (the teacher in its own).
    student_tokenizer = _tokenizer(job.initial_weights, job.student.trust_remote_code)
    across = not same_vocabulary(student_tokenizer, tokenizer)
    items = train_items(job, data, tokenizer, signals, cache, live,
                        student_tokenizer=student_tokenizer if across else None)
    teacher_tokenizer, tokenizer = tokenizer, student_tokenizer if across else tokenizer
    # An interrupted run continues from its last checkpoint (training.save_steps > 0).
    trainer_dir = folder / "trainer"
    # The leader looks (and tidies); every rank resumes from what it found.
    last = ranks.share(last_checkpoint(trainer_dir, spec.config_hash) if ranks.leader else None)
    if last and ranks.leader:
        log.info(f"[resume] {spec.id} from {last}")
    result = train(
        model,
        items,
        method=method,
        params=spec.params,
        settings=settings,
        output_dir=trainer_dir,
        seed=spec.seed,
        pad_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
        cache=cache,
        live_teacher=live,
        layer_pairs=pairs,
        projections=projections,
        resume_from_checkpoint=last,
        run_name=spec.id,
        tokenizer=tokenizer,
        rollouts_file=folder / "rollouts.jsonl",
        teacher_pad_id=teacher_tokenizer.pad_token_id,
        teacher_vocab_size=len(teacher_tokenizer),
        vocabulary=vocabulary_map(tokenizer, teacher_tokenizer) if across else None,
        teacher_tokenizer=teacher_tokenizer if across else None,
    )
    del live
    if not ranks.leader:
        return {}
    model, projections = result.model, result.projections  # [fsdp] FSDP: the copies gathered on rank 0
    atomic_write_json(folder / "log_history.json", result.log_history)
    total, trainable = count_parameters(model)
    save_model(model, tokenizer, folder / "model", merged=job.student.save == "merged")
    if projections is not None:
        tensors = {k: v.contiguous() for k, v in projections.state_dict().items()}
        save_file(tensors, folder / "model" / PROJECTIONS_FILE)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # The selection split only serves to choose among grid settings: a method with one setting skips it.
    splits = {"selection": data.selection, "eval": data.eval} if job.choosing else {"eval": data.eval}
    # vLLM reads weights from disk: the merged model just saved is this model; an adapter-only save is not.
    saved = str(folder / "model") if job.student.save == "merged" else None
    with generation_options(generation_for(job.evaluation, saved)):
        metrics = evaluate_splits(
            data.task, model, tokenizer, splits, folder, label=spec.id,
            batch_size=job.evaluation.batch_size, dtype=job.evaluation.dtype,
        )
    if across:
        # KL(teacher ‖ student) on the gold answers is token by token: not defined across tokenizers yet.
        atomic_write_json(folder / diagnostics.DIAGNOSTICS_FILE,
                          {"error": "not computed: the student's tokenizer differs from the teacher's"})
        metrics["train_tokens"] = int(round(settings.epochs * diagnostics.training_tokens(items)))
    else:
        metrics.update(diagnostics.after_training(
            folder, model, data, items, tokenizer, teacher=job.teacher, epochs=settings.epochs,
            batch_size=job.evaluation.batch_size, dtype=job.evaluation.dtype, device=device,
        ))
    metrics.update(
        train_runtime=round(result.train_runtime, 1),
        steps=result.steps,
        train_examples=len(items),
        trainable_parameters=trainable,
        parameters=total,
        **result.cost,
    )
    return metrics


def train_items(
    job: Job, data: TaskData, tokenizer: Any, signals: Signals, cache: TeacherCache | None, live: Any,
    *, student_tokenizer: Any = None,
) -> list[TrainItem]:
    """The gold examples (with the teacher's answer as a second target when the method reads answers),
    then, for methods that learn from the teacher, the transfer set labelled by the teacher's answers (no
    task loss on those). `tokenizer` is the teacher's; a `student_tokenizer` of its own (another vocabulary)
    encodes every sequence the student reads, answers retokenised from their text, and the teacher's
    distributions are read on its own encoding, aligned to the student's (`training.with_teacher_view`)."""
    task = data.task
    student_tok = tokenizer if student_tokenizer is None else student_tokenizer
    aligned = student_tokenizer is not None and (
        signals.top_k is not None or signals.layer_map is not None or signals.live)
    batch_size = job.evaluation.batch_size
    answers: dict[str, Any] = {}
    transfer_answers: dict[str, Any] = {}
    if live is not None:
        # The live teacher is unchanged since it was loaded, so vLLM may read its folder.
        with generation_options(generation_for(job.evaluation, getattr(live, "name_or_path", None))):
            if signals.answers:
                raw, _ = predict(task, live, tokenizer, data.train, batch_size=batch_size,
                                 training_prompts=True)
                answers = {ex.id: teacher_answer(task, ex, raw.get(ex.id, ""), job.empty_answers)
                           for ex in data.train}
            if signals.from_teacher and data.transfer:
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
        teacher_view = gold
        if student_tokenizer is not None:
            gold = encode(task, ex, data.prompts[ex.id], student_tok)
            if gold is None:
                continue  # longer than max_length in the student's tokens
        teacher_item = None
        if signals.answers:
            if answers.get(ex.id) is None:
                continue  # an empty teacher answer dropped by `cache.empty_answers: drop`
            target = task.answer_target(answers[ex.id])
            teacher_item = encode(task, ex, data.prompts[ex.id], student_tok, target=target)
            if teacher_item is None:
                continue
        item = TrainItem(gold=gold, teacher=teacher_item)
        if aligned:
            item = with_teacher_view(item, teacher_view, task.target_text(ex), student_tok, tokenizer)
        items.append(item)
    if signals.from_teacher:
        for ex in data.transfer:
            answer = transfer_answers.get(ex.id)
            item = transfer_item(task, student_tok, ex, answer)
            if item is None:
                continue
            train_item = TrainItem(gold=item, teacher=item if signals.answers else None, transfer=True)
            if aligned:
                view = transfer_item(task, tokenizer, ex, answer)  # the cache's rows are on these tokens
                if view is None:
                    continue
                train_item = with_teacher_view(train_item, view, task.answer_target(str(answer)), student_tok,
                                               tokenizer)
            items.append(train_item)
    return items


# -- what a worker loads once and keeps for the next job of the same study ------------------------------


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


_DATA: dict[str, TaskData] = {}


def _task_data(job: Job, tokenizer: Any) -> TaskData:
    """The run's task data, as the study's data stage drew it (the same subsets from the same seed)."""
    import json

    from kdlab.resolve import import_plugin
    from kdlab.tasks import get_task, settings_class

    key = json.dumps([job.spec.task, job.task_settings, job.data_dir, job.data_seed, job.base_teacher],
                     sort_keys=True)
    if key not in _DATA:
        for name in job.plugins:
            import_plugin(name)
        cls = settings_class(job.spec.task, job.task_settings)
        settings = cls.model_validate(job.task_settings)
        _DATA.clear()  # one study per worker at a time
        _DATA[key] = load_task_data(get_task(job.spec.task, settings), settings, tokenizer, job.data_dir,
                                    job.data_seed)
    return _DATA[key]
