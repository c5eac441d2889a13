"""Teacher-student diagnostics of a trained student on the evaluation split, computed right after its
evaluation (`job.run_job`) and written to ``runs/<run id>/diagnostics.json`` so the report only reads
files:

- ``kl_teacher_student``: mean over the gold answer tokens (target + eos) of every evaluation example of
  KL(p_teacher ‖ q_student) at T = 1, full vocabulary, nats per token (`metrics.token_kl`); the teacher is the
  one the students learn from (`Job.teacher`).
- ``ece`` (classification): expected calibration error of the student's label probabilities (softmax over
  the labels' summed continuation log-probs, as answers are chosen), 10 bins, percentage points.
- ``train_tokens``: tokens the run trained on (every training sequence's length x epochs), returned to the
  run's metrics for the cost estimate (`report.costs`).

Agreement with the teacher's answers and the caches' tail mass need no model: the report computes them from
the prediction files and the caches (`teacher_agreement`, `cache_tail_mass`).
"""

from __future__ import annotations

import logging
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
from kdlab.scored import forward_scored
from kdlab.tasks.base import IGNORE_INDEX, Encoded, Task, collate, encode

if TYPE_CHECKING:
    from kdlab.stages.data import TaskData
    from kdlab.training import TrainItem

log = logging.getLogger("kdlab")
DIAGNOSTICS_FILE = "diagnostics.json"
ECE_BINS = 10


def after_training(folder: Path, model: nn.Module, data: TaskData, items: Sequence[TrainItem], tokenizer: Any,
                   *, teacher: str, epochs: float, batch_size: int, dtype: str,
                   device: torch.device) -> dict[str, Any]:
    """Compute and write the diagnostics.json of the run in `folder` (its student ``model``, trained on
    ``items`` for ``epochs``, against ``teacher``, a model folder); returns the metrics the run records with
    it. A failure here is written into the file and logged, never fails the run (the diagnostics are not
    its result)."""
    recorded = {"train_tokens": int(round(epochs * training_tokens(items)))}
    try:
        out = student_diagnostics(model, data, tokenizer, teacher=teacher, batch_size=batch_size, dtype=dtype,
                                  device=device)
    except Exception as e:  # noqa: BLE001 - reported in the file and the log
        log.info(f"[diagnostics] {folder.name}: not computed ({type(e).__name__}: {e})")
        out = {"error": f"{type(e).__name__}: {e}"}
    atomic_write_json(folder / DIAGNOSTICS_FILE, out)
    return recorded


def student_diagnostics(model: nn.Module, data: TaskData, tokenizer: Any, *, teacher: str, batch_size: int,
                        dtype: str, device: torch.device) -> dict[str, Any]:
    """KL(teacher ‖ student) on the gold answers and (classification) ECE of ``model`` on the eval split."""
    start = time.perf_counter()
    task = data.task
    gold = gold_encodings(task, tokenizer, data.eval)
    batches = length_batches(gold, batch_size)
    teacher_lp = _teacher_logprobs(teacher, batches, tokenizer, dtype, device)
    choices = task.choice_ids(tokenizer) if hasattr(task, "choice_ids") else None
    # Single-token labels: the label probabilities come from the same student pass (its first answer
    # position), as `evaluation.score_choices` scores them; longer labels need a pass per label.
    first = [c[0] for c in choices] if choices is not None and all(len(c) == 1 for c in choices) else None
    kl_sum, kl_tokens, probs = kl_on_answers(teacher_lp, model, batches, pad_id=tokenizer.pad_token_id,
                                             vocab_size=len(tokenizer), label_tokens=first)
    out: dict[str, Any] = {
        "split": "eval",
        "teacher": teacher,
        "kl_teacher_student": kl_sum / kl_tokens if kl_tokens else None,
        "kl_tokens": kl_tokens,
        "kl_examples": len(gold),
    }
    if choices is not None:  # classification
        labels = {ex.id: ex.label for ex in data.eval}
        if first is None:
            pairs, prompt_ids, _ = prepare_prompts(task, tokenizer, data.eval)
            by_id = label_probabilities(model, prompt_ids, choices, pad_id=tokenizer.pad_token_id,
                                        batch_size=batch_size)
            probs = {ex.id: p for (ex, _), p in zip(pairs, by_id, strict=True)}
        confidence = [max(p) for p in probs.values()]
        correct = [p.index(max(p)) == labels[i] for i, p in probs.items()]
        out.update(ece=expected_calibration_error(confidence, correct, ECE_BINS), ece_bins=ECE_BINS,
                   mean_confidence=100.0 * sum(confidence) / len(confidence))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


# The teacher's answer-token log-probs of the tasks diagnosed in this process, the most recent ones that fit
# in MEMO_BYTES together (the demo's SST-2 and SQuAD: ~400 MB): one teacher pass per task and process, not per
# run, however a sweep's runs alternate between tasks (it starts every group's grid before the other seeds).
MEMO_BYTES = 768 * 2**20
_memo: dict[tuple[Any, ...], list[torch.Tensor]] = {}


def _teacher_logprobs(path: str, batches: Sequence[Sequence[Encoded]], tokenizer: Any, dtype: str,
                      device: torch.device) -> list[torch.Tensor]:
    from kdlab.models import load_frozen

    config = Path(path) / "config.json"
    stamp = config.stat().st_mtime_ns if config.is_file() else None  # a re-adapted teacher is another key
    vocab = len(tokenizer)
    key = (path, stamp, vocab, tuple(e.id for b in batches for e in b), dtype)
    if key in _memo:
        return _memo[key]
    teacher = load_frozen(path, dtype=dtype, device=device)
    lp = answer_logprobs(teacher, batches, pad_id=tokenizer.pad_token_id, vocab_size=vocab)
    del teacher
    _memo[key] = lp
    while sum(t.numel() * t.element_size() for v in _memo.values() for t in v) > MEMO_BYTES:
        del _memo[next(iter(_memo))]  # the oldest first (the one just computed last, if alone too big)
    return lp


def training_tokens(items: Sequence[TrainItem]) -> int:
    """Tokens of one pass over the training items: every sequence a run trains on (gold and teacher's)."""
    return sum(len(seq.input_ids) for item in items for seq in (item.gold, item.teacher) if seq is not None)


def gold_encodings(task: Task, tokenizer: Any, examples: Sequence[Any]) -> list[Encoded]:
    """Prompt + gold answer (+ eos) of each example whose prompt fits, as training encodes them."""
    pairs, _ = task.build_prompts(examples, tokenizer, training=True)
    return [enc for ex, prompt in pairs if (enc := encode(task, ex, prompt, tokenizer)) is not None]


def length_batches(encoded: Sequence[Encoded], batch_size: int) -> list[list[Encoded]]:
    """Batches of similar lengths (longest first), so little compute goes to padding."""
    order = sorted(encoded, key=lambda e: -len(e.input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _tensors(batch: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    collated = collate(batch, pad_id, padding_side="left")
    return {k: v.to(device) for k, v in collated.items() if k != "example_ids"}


@torch.no_grad()
def answer_logprobs(model: nn.Module, batches: Sequence[Sequence[Encoded]], *, pad_id: int,
                    vocab_size: int) -> list[torch.Tensor]:
    """Per batch, the fp32 log-softmax of ``model`` at every answer token ([N_b, V], rows in order)."""
    was_training = model.training
    model.eval()
    try:
        return [forward_scored(model, _tensors(b, pad_id, _device(model)), vocab_size=vocab_size)
                .logits.float().log_softmax(-1).cpu() for b in batches]
    finally:
        model.train(was_training)


@torch.no_grad()
def kl_on_answers(teacher: nn.Module | Sequence[torch.Tensor], student: nn.Module,
                  batches: Sequence[Sequence[Encoded]], *, pad_id: int, vocab_size: int,
                  label_tokens: Sequence[int] | None = None
                  ) -> tuple[float, int, dict[str, list[float]]]:
    """(Σ over answer tokens of KL(teacher ‖ student), number of answer tokens, label probabilities) on
    ``batches``. ``teacher``: a model, or its `answer_logprobs` on the same batches. ``label_tokens``: the
    labels' (single) tokens, for each example's label probabilities at its first answer position."""
    if isinstance(teacher, nn.Module):
        teacher = answer_logprobs(teacher, batches, pad_id=pad_id, vocab_size=vocab_size)
    total, count = 0.0, 0
    probs: dict[str, list[float]] = {}
    was_training = student.training
    student.eval()
    try:
        for batch, log_p in zip(batches, teacher, strict=True):
            s = forward_scored(student, _tensors(batch, pad_id, _device(student)), vocab_size=vocab_size)
            log_q = s.logits.float().log_softmax(-1).cpu()
            kl = token_kl(log_p, log_q)  # log-softmax of log-probs is the identity
            total += float(kl.sum())
            count += int(kl.numel())
            if label_tokens is not None:
                starts = torch.cumsum(s.counts.cpu(), 0) - s.counts.cpu()  # each example's first answer row
                rows = log_q[starts][:, list(label_tokens)].softmax(-1)
                probs.update({e.id: r.tolist() for e, r in zip(batch, rows, strict=True)})
    finally:
        student.train(was_training)
    return total, count, probs


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
