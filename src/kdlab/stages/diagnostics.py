"""Teacher-student diagnostics of a trained student on the evaluation split, computed right after its
evaluation (`sweep.train_student`) and written to ``runs/<run id>/diagnostics.json`` so the report only reads
files:

- ``kl_teacher_student``: mean over the gold answer tokens (target + eos) of every evaluation example of
  KL(p_teacher ‖ q_student) at T = 1, full vocabulary, nats per token (`metrics.token_kl`); the teacher is the
  one the students learn from (`Study.teacher_path`).
- ``ece`` (classification): expected calibration error of the student's label probabilities (softmax over
  the labels' summed continuation log-probs, as answers are chosen), 10 bins, percentage points.
- ``train_tokens``: tokens the run trained on (every training sequence's length x epochs), returned to the
  run's metrics for the cost estimate (`report.costs`).

Agreement with the teacher's answers and the caches' tail mass need no model: the report computes them from
the prediction files and the caches (`teacher_agreement`, `cache_tail_mass`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdlab.evaluation import prepare_prompts
from kdlab.files import atomic_write_json
from kdlab.metrics import answer_agreement, expected_calibration_error, tail_mass, token_kl
from kdlab.registry import RunSpec
from kdlab.scored import forward_scored
from kdlab.tasks.base import IGNORE_INDEX, Encoded, Task, collate, encode

if TYPE_CHECKING:
    from kdlab.stages.data import TaskData
    from kdlab.study import Study
    from kdlab.training import TrainItem

DIAGNOSTICS_FILE = "diagnostics.json"
ECE_BINS = 10


def after_training(study: Study, spec: RunSpec, model: nn.Module, data: TaskData,
                   items: Sequence[TrainItem]) -> dict[str, Any]:
    """Compute and write the run's diagnostics.json; returns the metrics the run records with it. A failure
    here is written into the file and logged, never fails the run (the diagnostics are not its result)."""
    epochs = study.config.training.epochs
    recorded = {"train_tokens": int(round(epochs * training_tokens(items)))}
    try:
        out = student_diagnostics(study, spec, model, data)
    except Exception as e:  # noqa: BLE001 - reported in the file and the log
        study.log(f"[diagnostics] {spec.id}: not computed ({type(e).__name__}: {e})")
        out = {"error": f"{type(e).__name__}: {e}"}
    atomic_write_json(Path(spec.output_dir) / DIAGNOSTICS_FILE, out)
    return recorded


def student_diagnostics(study: Study, spec: RunSpec, model: nn.Module, data: TaskData) -> dict[str, Any]:
    """KL(teacher ‖ student) on the gold answers and (classification) ECE of ``model`` on the eval split."""
    from kdlab.models import load_frozen

    start = time.perf_counter()
    task, tokenizer = data.task, study.tokenizer
    batch_size = study.config.evaluation.batch_size
    vocab = len(tokenizer)
    gold = gold_encodings(task, tokenizer, data.eval)
    teacher = load_frozen(study.teacher_path(spec.task), dtype=study.config.evaluation.dtype,
                          device=study.device)
    kl_sum, kl_tokens = kl_on_answers(teacher, model, gold, pad_id=tokenizer.pad_token_id,
                                      batch_size=batch_size, vocab_size=vocab)
    del teacher
    out: dict[str, Any] = {
        "split": "eval",
        "teacher": study.teacher_path(spec.task),
        "kl_teacher_student": kl_sum / kl_tokens if kl_tokens else None,
        "kl_tokens": kl_tokens,
        "kl_examples": len(gold),
    }
    choice_ids = getattr(task, "choice_ids", None)
    if choice_ids is not None:  # classification
        pairs, prompt_ids, _ = prepare_prompts(task, tokenizer, data.eval)
        probs = label_probabilities(model, prompt_ids, choice_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                                    batch_size=batch_size)
        confidence = [max(p) for p in probs]
        correct = [p.index(max(p)) == ex.label for (ex, _), p in zip(pairs, probs, strict=True)]
        out.update(ece=expected_calibration_error(confidence, correct, ECE_BINS), ece_bins=ECE_BINS,
                   mean_confidence=100.0 * sum(confidence) / len(confidence))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def training_tokens(items: Sequence[TrainItem]) -> int:
    """Tokens of one pass over the training items: every sequence a run trains on (gold and teacher's)."""
    return sum(len(seq.input_ids) for item in items for seq in (item.gold, item.teacher) if seq is not None)


def gold_encodings(task: Task, tokenizer: Any, examples: Sequence[Any]) -> list[Encoded]:
    """Prompt + gold answer (+ eos) of each example whose prompt fits, as training encodes them."""
    pairs, _ = task.build_prompts(examples, tokenizer, training=True)
    return [enc for ex, prompt in pairs if (enc := encode(task, ex, prompt, tokenizer)) is not None]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def kl_on_answers(teacher: nn.Module, student: nn.Module, encoded: Sequence[Encoded], *, pad_id: int,
                  batch_size: int, vocab_size: int) -> tuple[float, int]:
    """(Σ over answer tokens of KL(teacher ‖ student), number of answer tokens) on ``encoded``."""
    total, count = 0.0, 0
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size], pad_id, padding_side="left")
            t = forward_scored(teacher, {k: v.to(_device(teacher)) for k, v in batch.items()
                                         if k != "example_ids"}, vocab_size=vocab_size)
            s = forward_scored(student, {k: v.to(_device(student)) for k, v in batch.items()
                                         if k != "example_ids"}, vocab_size=vocab_size)
            kl = token_kl(t.logits.to(s.logits.device), s.logits)
            total += float(kl.sum())
            count += int(kl.numel())
    finally:
        student.train(was_training)
    return total, count


@torch.no_grad()
def label_probabilities(model: nn.Module, prompt_ids: Sequence[list[int]], choices: Sequence[Sequence[int]],
                        *, pad_id: int, batch_size: int) -> list[list[float]]:
    """Per prompt, the probability of each label: softmax over the labels of their continuations' summed
    log-probs (the scores `evaluation.score_choices` takes the argmax of)."""
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    per_batch = max(1, batch_size // len(choices))
    try:
        for start in range(0, len(prompt_ids), per_batch):
            rows = range(start, min(start + per_batch, len(prompt_ids)))
            seqs = [Encoded(f"{i}:{c}", [*prompt_ids[i], *choice],
                            [IGNORE_INDEX] * len(prompt_ids[i]) + list(choice))
                    for i in rows for c, choice in enumerate(choices)]
            batch = collate(seqs, pad_id, padding_side="left")
            scored = forward_scored(model, {k: v.to(device) for k, v in batch.items() if k != "example_ids"})
            logp = scored.logits.float().log_softmax(-1).gather(1, scored.targets[:, None]).squeeze(1)
            sums = torch.stack([part.sum() for part in logp.split(scored.counts.tolist())])
            out += sums.view(len(rows), len(choices)).softmax(-1).tolist()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------
# read by the report: no model


def read_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """A run's diagnostics.json, or None when it has none (older runs) or it is unreadable."""
    import json

    path = run_dir / DIAGNOSTICS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def teacher_agreement(task: Task, student_file: Path, teacher_file: Path, ids: Sequence[str]) -> float:
    """Agreement (%) of a student's evaluation answers with the teacher's, from their prediction files."""
    return answer_agreement(task.read_predictions(student_file), task.read_predictions(teacher_file), ids)


def cache_tail_mass(cache_dir: Path, chunk: int = 2048) -> dict[str, Any] | None:
    """Mean teacher probability mass outside the cached top-k per answer token, at T = 1 and at every
    temperature the cache holds a tail for: {"top_k": k, "tokens": n, "mass": {T: mean}}; None without a
    top-k field. Read in chunks of ``chunk`` examples (memory stays small on a large cache)."""
    from kdlab.teacher_cache import TeacherCache

    cache = TeacherCache.open(cache_dir, verify="size")
    if "topk" not in cache.fields:
        return None
    ids = cache.ids()
    temps = sorted({1.0, *(float(t) for t in cache.temperatures)})
    sums = dict.fromkeys(temps, 0.0)
    tokens = 0
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        _, lp = cache.batch_topk(part)
        if lp.shape[0] == 0:
            continue
        tokens += lp.shape[0]
        for t in temps:
            tail = cache.batch_topk_tail(part, t)[2] if t in cache.temperatures else None
            if tail is None and t != 1.0:
                continue
            sums[t] += float(tail_mass(lp, tail, t).sum())
    if not tokens:
        return None
    mass = {f"{t:g}": sums[t] / tokens for t in temps if math.isfinite(sums[t])}
    return {"top_k": cache.top_k, "tokens": tokens, "mass": mass}
