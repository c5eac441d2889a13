"""The teacher stage, per task: the base teacher's zero-shot evaluation, then (`teacher.adapt`) its
fine-tuning on the task's training examples and the evaluation of the adapted teacher, saved under
teacher/<task> for the cache and the online KD runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.evaluation import evaluate_splits, generation_options
from kdlab.files import atomic_folder
from kdlab.methods import baseline
from kdlab.models import hub_snapshot_info, load_model, load_trainable, save_model
from kdlab.seeding import seed_everything
from kdlab.tasks.base import subset
from kdlab.training import TrainItem, train

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView


def run_teacher(study: StudyView, name: str) -> None:
    cfg = study.config.teacher
    data = study.data(name)
    planned = {run.id: run.spec for run in study.plan.teacher[name]}

    def evaluate(model: Any, folder: Path, weights: str) -> dict[str, Any]:
        """`weights`: the folder `model` was loaded from or saved to (a vLLM backend reads it)."""
        splits = {"selection": data.selection, "eval": data.eval}
        with generation_options(study.generation(weights)):
            return evaluate_splits(
                data.task,
                model,
                study.tokenizer,
                splits,
                folder,
                label="teacher",
                batch_size=study.config.evaluation.batch_size,
                dtype=study.config.evaluation.dtype,
            )

    def zero_shot() -> dict[str, Any]:
        model = load_model(
            study.base_teacher_path,
            dtype=study.config.evaluation.dtype,
            device=study.device,
            trust_remote_code=cfg.trust_remote_code,
        )
        return evaluate(model, study.layout.teacher_zero_shot(name), study.base_teacher_path)

    # The hub commit a hub-id teacher resolved to, recorded with its runs (params are not in the config hash).
    snapshot = hub_snapshot_info(study.base_teacher_path)
    origin = {"model_repo": snapshot[0], "model_commit": snapshot[1]} if snapshot else {}
    zero_shot_spec = planned[f"teacher-{name}-zero-shot"]
    zero_shot_spec = replace(zero_shot_spec, params={**zero_shot_spec.params, **origin})
    study.runner.execute_required(zero_shot_spec, zero_shot)
    if not cfg.adapt:
        return
    folder = Path(study.teacher_path(name))
    seed = study.seed("teacher")

    def adapt() -> dict[str, Any]:
        seed_everything(seed)  # LoRA adapters are initialised from the global generator
        # Unlike a student's, the base stays fp32 under bf16: the adapted teacher is saved merged, and every
        # KD signal derives from it, so its weights are not rounded to bf16 (measured on the demo: a bf16
        # base moved the teacher by -1.8 SQuAD F1 and every KD result with it, docs/demo.md).
        model = load_trainable(
            study.base_teacher_path, finetune=cfg.finetune, lora=cfg.lora, dtype="float32",
            device=study.device, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.training.attn_implementation,
        )
        examples = (
            subset(data.train, cfg.train_size, study.config.data_seed) if cfg.train_size else data.train
        )
        items = [TrainItem(gold=data.encoded[e.id]) for e in examples if e.id in data.encoded]
        result = train(
            model,
            items,
            method=baseline(),  # plain fine-tuning on the gold answers
            params={},
            settings=cfg.training,
            output_dir=study.layout.teacher_trainer(name),
            seed=seed,
            pad_id=study.tokenizer.pad_token_id,
            vocab_size=len(study.tokenizer),
            run_name=f"teacher-{name}",
        )
        if not study.ranks.leader:
            return {}
        model = result.model  # [fsdp] under FSDP the weights gathered on rank 0, not the sharded original
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        # Saved aside and swapped in: a killed save never leaves a half-written teacher behind.
        atomic_folder(folder, lambda tmp: save_model(model, study.tokenizer, tmp), replace=True)
        metrics = evaluate(model, study.layout.teacher_eval(name), str(folder))
        metrics["train_runtime"] = round(result.train_runtime, 1)
        return metrics

    spec = replace(planned[f"teacher-{name}"], params={**planned[f"teacher-{name}"].params, **origin})
    study.runner.redo_if_lost(spec, folder.is_dir())
    study.runner.execute_required(spec, adapt, collective=True)
