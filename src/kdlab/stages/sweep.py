"""The sweep: every (task, student, method) trains its grid on the first seed, chooses its best setting on
the selection split (`selection`), then runs that setting on every other seed. Runs are claimed in the
registry, so several `kdlab sweep` processes share the work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safetensors.torch import save_file

from kdlab import losses
from kdlab.config import StudentSettings
from kdlab.evaluation import evaluate_splits, generation_options, predict
from kdlab.files import atomic_write_json
from kdlab.methods import Signals, get_method
from kdlab.models import (
    count_parameters,
    hidden_width,
    load_frozen,
    load_trainable,
    model_config,
    save_model,
)
from kdlab.plan import RunGroup
from kdlab.registry import RunRecord, RunSpec
from kdlab.seeding import seed_everything
from kdlab.stages import diagnostics
from kdlab.stages.cache import teacher_answer, transfer_item
from kdlab.stages.data import TaskData
from kdlab.stages.selection import best_run, record_choice
from kdlab.tasks.base import encode
from kdlab.teacher_cache import TeacherCache
from kdlab.training import TrainItem, last_checkpoint, train

if TYPE_CHECKING:
    from kdlab.study import Study

# Learned feature projections, kept beside the model (named after KD3, which introduced them).
PROJECTIONS_FILE = "kd3_projections.safetensors"


def train_student(study: Study, spec: RunSpec, student: StudentSettings, cache: TeacherCache | None) -> dict:
    """One student run: train from the student's initial weights with the run's method and params, save the
    model, evaluate it; returns its metrics."""
    data = study.data(spec.task)
    method = get_method(spec.method)
    signals = method.signals(spec.params)
    folder = Path(spec.output_dir)
    seed_everything(study.seed("student", spec.seed))  # LoRA init, projections, data order
    settings = study.config.training
    # Frozen weights in the dtype mixed precision computes in; trainable ones (LoRA, full) stay fp32.
    dtype = settings.compute_dtype
    model = load_trainable(
        study.initial_weights(student), finetune=student.finetune, lora=student.lora, dtype=dtype,
        device=study.device, trust_remote_code=student.trust_remote_code,
        attn_implementation=settings.attn_implementation,
    )
    pairs = [tuple(p) for p in spec.params.get("layer_pairs", [])]  # resolved by the plan
    projections = None
    if pairs:
        width = hidden_width(model_config(study.base_teacher_path))
        # Trainable: fp32 master weights; autocast runs their matmuls in the compute dtype.
        projections = losses.make_projections(pairs, hidden_width(model.config), width).to(study.device)
    live = None
    if signals.live or (study.config.cache.mode == "online" and signals.from_teacher):
        live = load_frozen(study.teacher_path(spec.task), dtype=dtype, device=study.device,
                           attn_implementation=settings.attn_implementation)
    items = train_items(study, data, signals, cache, live)
    # An interrupted run continues from its last checkpoint (training.save_steps > 0).
    trainer_dir = folder / "trainer"
    # The leader looks (and tidies); every rank resumes from what it found.
    last = study.ranks.share(last_checkpoint(trainer_dir, spec.config_hash) if study.ranks.leader else None)
    if last:
        study.log(f"[resume] {spec.id} from {last}")
    result = train(
        model,
        items,
        method=method,
        params=spec.params,
        settings=study.config.training,
        output_dir=trainer_dir,
        seed=spec.seed,
        pad_id=study.tokenizer.pad_token_id,
        vocab_size=len(study.tokenizer),
        cache=cache,
        live_teacher=live,
        layer_pairs=pairs,
        projections=projections,
        resume_from_checkpoint=last,
        run_name=spec.id,
        tokenizer=study.tokenizer,
        rollouts_file=folder / "rollouts.jsonl",
    )
    del live
    if not study.ranks.leader:
        return {}  # the leader saves and evaluates
    model, projections = result.model, result.projections  # [fsdp] FSDP: the copies gathered on rank 0
    atomic_write_json(folder / "log_history.json", result.log_history)
    total, trainable = count_parameters(model)
    save_model(model, study.tokenizer, folder / "model", merged=student.save == "merged")
    if projections is not None:
        tensors = {k: v.contiguous() for k, v in projections.state_dict().items()}
        save_file(tensors, folder / "model" / PROJECTIONS_FILE)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # The selection split only serves to choose among grid settings: a method with one setting skips it.
    choosing = study.plan.group(spec.task, spec.student, spec.method).choosing
    splits = {"selection": data.selection, "eval": data.eval} if choosing else {"eval": data.eval}
    # vLLM reads weights from disk: the merged model just saved is this model; an adapter-only save is not.
    saved = str(folder / "model") if student.save == "merged" else None
    with generation_options(study.generation(saved)):
        metrics = evaluate_splits(
            data.task,
            model,
            study.tokenizer,
            splits,
            folder,
            label=spec.id,
            batch_size=study.config.evaluation.batch_size,
            dtype=study.config.evaluation.dtype,
        )
    metrics.update(diagnostics.after_training(study, spec, model, data, items))  # diagnostics.json
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
    study: Study, data: TaskData, signals: Signals, cache: TeacherCache | None, live: Any
) -> list[TrainItem]:
    """The gold examples (with the teacher's answer as a second target when the method reads answers),
    then, for methods that learn from the teacher, the transfer set labelled by the teacher's answers (no
    task loss on those)."""
    task, tokenizer = data.task, study.tokenizer
    batch_size = study.config.evaluation.batch_size
    answers: dict[str, Any] = {}
    transfer_answers: dict[str, Any] = {}
    if live is not None:
        # The live teacher is unchanged since it was loaded, so vLLM may read its folder.
        with generation_options(study.generation(getattr(live, "name_or_path", None))):
            if signals.answers:
                raw, _ = predict(task, live, tokenizer, data.train, batch_size=batch_size,
                                 training_prompts=True)
                policy = study.config.cache.empty_answers
                answers = {ex.id: teacher_answer(task, ex, raw.get(ex.id, ""), policy) for ex in data.train}
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
        teacher_item = None
        if signals.answers:
            if answers.get(ex.id) is None:
                continue  # an empty teacher answer dropped by `cache.empty_answers: drop`
            target = task.answer_target(answers[ex.id])
            teacher_item = encode(task, ex, data.prompts[ex.id], tokenizer, target=target)
            if teacher_item is None:
                continue
        items.append(TrainItem(gold=gold, teacher=teacher_item))
    if signals.from_teacher:
        for ex in data.transfer:
            item = transfer_item(task, tokenizer, ex, transfer_answers.get(ex.id))
            if item is not None:
                items.append(TrainItem(gold=item, teacher=item if signals.answers else None, transfer=True))
    return items


class RunExecutor(Protocol):
    """Runs student runs somewhere else (`kdlab.ray_executor`): `run` starts one (or reports it), `wait`
    blocks until one of those started ends (or `timeout` seconds) and records it."""

    def run(self, spec: RunSpec, student: StudentSettings, cache: TeacherCache | None) -> RunRecord | None:
        """The run's record once it is finished (done or failed); None while it is pending or running."""
        ...

    def wait(self, timeout: float) -> None: ...


def student_run(
    study: Study,
    spec: RunSpec,
    student: StudentSettings,
    cache: TeacherCache | None,
    executor: RunExecutor | None = None,
) -> RunRecord | None:
    """The run done here and now (local), or handed to `executor`; None while it is not finished."""
    if executor is not None:
        return executor.run(spec, student, cache)
    return study.runner.execute(spec, lambda: train_student(study, spec, student, cache), collective=True)


def advance(
    study: Study, group: RunGroup, cache: TeacherCache | None, executor: RunExecutor | None = None
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
    study: Study,
    caches: dict[str, TeacherCache | None],
    poll_seconds: float = 5.0,
    executor: RunExecutor | None = None,
) -> list[str]:
    """Every student run of the study, shared safely with other processes running the same sweep, or handed
    to `executor` (every group's grid at once; each group's other seeds once its grid is done). Returns the
    ids of failed runs."""
    while True:
        states = [advance(study, group, caches.get(group.task), executor) for group in study.plan.groups]
        if "waiting" not in states:
            break
        if executor is None:
            time.sleep(poll_seconds)  # another process holds a run we depend on
        else:
            executor.wait(poll_seconds)  # until one of its runs ends (or another process's may have)
    return [r.id for r in study.registry.runs(status="failed")]
