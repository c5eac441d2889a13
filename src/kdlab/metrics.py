"""Task metrics: official SQuAD v1.1 exact match / F1 and ROUGE-L for generated answers, accuracy and macro-F1
for classification.

Every score is a percentage (x100), SST-2 accuracy included, so result tables use one scale.

The SQuAD functions reproduce the official v1.1 evaluation script (``evaluate-v1.1.py``) exactly, including
its corner cases:
- ``normalize_answer`` lower-cases, drops ASCII punctuation (``string.punctuation``), drops the whole words
  a/an/the and collapses whitespace, in that order.
- ``f1`` is 0 when the two normalized strings share no token, so an empty prediction scores F1 0 and, as in
  the official script, an empty prediction against an empty gold answer also scores F1 0 (while its exact
  match is 1, since the two normalized strings are equal).
- A question without a prediction scores 0 for both metrics; the official script prints a message, here a
  ``MissingPredictionsWarning`` names the count (or ``strict=True`` raises).
- Predictions for ids that are not in the references are ignored, as in the official script, but an
  ``UnknownPredictionsWarning`` names their count and a few of them (usually the wrong reference file).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ANSWER_METRICS",
    "LONG_NAMES",
    "SHORT_NAMES",
    "MissingPredictionsWarning",
    "UnknownPredictionsWarning",
    "accuracy",
    "answer_agreement",
    "answer_scores",
    "classification_scores",
    "exact_match",
    "expected_calibration_error",
    "f1",
    "normalize_answer",
    "rouge_l",
    "squad_scores",
    "tail_mass",
    "token_kl",
]

# How tables (short) and sentences (long) name each metric.
SHORT_NAMES = {"accuracy": "Acc", "macro_f1": "Macro-F1", "exact_match": "EM", "f1": "F1",
               "rouge_l": "ROUGE-L"}
LONG_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match", "f1": "F1",
              "rouge_l": "ROUGE-L"}

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class MissingPredictionsWarning(UserWarning):
    """Some reference examples had no prediction; they were scored as wrong."""


class UnknownPredictionsWarning(UserWarning):
    """Some predictions name ids that are not in the references; they were ignored."""


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalization: lower, remove punctuation, remove articles, fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalized strings (0.0 when no token is shared, empty strings included)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure of the longest common subsequence of words, as the `rouge-score` package computes
    it: lower-cased, anything but letters and digits a separator; 0.0 when either side has no word."""
    a = re.sub(r"[^a-z0-9]+", " ", prediction.lower()).split()
    b = re.sub(r"[^a-z0-9]+", " ", gold.lower()).split()
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)  # LCS lengths of a[:i] against every prefix of b, one row at a time
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


# The metrics a generation task may be scored with, each a function (prediction, gold) -> [0, 1]; the best
# gold answer counts. "squad" is the official SQuAD v1.1 pair.
ANSWER_METRICS: dict[str, dict[str, Callable[[str, str], float]]] = {
    "squad": {"exact_match": exact_match, "f1": f1},
    "exact_match": {"exact_match": exact_match},
    "rouge_l": {"rouge_l": rouge_l},
}


def _examples(ids: Sequence[object]) -> str:
    return ", ".join(repr(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")


def _check_ids(predictions: Mapping[str, object], ids: Sequence[str], strict: bool, what: str) -> None:
    """Warn (or, strict, raise) about references without a prediction and predictions without a reference."""
    missing = [i for i in ids if i not in predictions]
    if missing:
        msg = f"{len(missing)} of {len(ids)} {what} have no prediction and score 0 ({_examples(missing)})"
        if strict:
            raise ValueError(msg)
        # stacklevel 3: point at the caller of squad_scores/accuracy, not at this helper.
        warnings.warn(msg, MissingPredictionsWarning, stacklevel=3)
    known = set(ids)
    unknown = [i for i in predictions if i not in known]
    if unknown:
        msg = (f"{len(unknown)} of {len(predictions)} predictions are for ids not among the {len(ids)} "
               f"reference {what} and were ignored ({_examples(unknown)}); wrong reference file?")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, UnknownPredictionsWarning, stacklevel=3)


def squad_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    strict: bool = False,
) -> dict[str, float]:
    """Official SQuAD v1.1 scores over the questions of ``references`` (id -> all gold answer texts).

    Each question takes the max over its gold answers; the mean over questions is returned x100 as
    ``{"exact_match": ..., "f1": ...}``. Predictions for ids not in ``references`` are ignored (as in the
    official script) with an ``UnknownPredictionsWarning``. A missing prediction scores 0 and triggers a
    ``MissingPredictionsWarning``. With ``strict=True`` either raises a ``ValueError``.
    """
    metrics = ANSWER_METRICS["squad"]
    return answer_scores(predictions, references, metrics, strict=strict, caller="squad_scores")


def answer_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Mapping[str, Callable[[str, str], float]],
    *,
    strict: bool = False,
    caller: str = "answer_scores",
) -> dict[str, float]:
    """Each metric x100, averaged over the questions of ``references`` (id -> every gold answer), each
    question scored against its best gold answer; missing and unknown predictions as in `squad_scores`."""
    if not references:
        raise ValueError(f"{caller}: no reference questions to score")
    ids = list(references)
    _check_ids(predictions, ids, strict, "questions")
    totals = dict.fromkeys(metrics, 0.0)
    for qid in ids:
        golds = list(references[qid])
        if not golds:
            raise ValueError(f"{caller}: question {qid!r} has no gold answer")
        if qid not in predictions:
            continue
        for name, fn in metrics.items():
            totals[name] += max(fn(predictions[qid], g) for g in golds)
    return {name: 100.0 * total / len(ids) for name, total in totals.items()}


def accuracy(
    predictions: Mapping[str, int],
    labels: Mapping[str, int],
    *,
    strict: bool = False,
) -> dict[str, float]:
    """Accuracy over the ids of ``labels``, as a percentage (x100, the same scale as the SQuAD scores).

    A missing prediction counts as wrong (``MissingPredictionsWarning``); predictions for ids not in
    ``labels`` are ignored (``UnknownPredictionsWarning``). With ``strict=True`` either raises a
    ``ValueError``.
    """
    if not labels:
        raise ValueError("accuracy: no labelled examples to score")
    ids = list(labels)
    _check_ids(predictions, ids, strict, "examples")
    correct = sum(1 for i in ids if i in predictions and int(predictions[i]) == int(labels[i]))
    return {"accuracy": 100.0 * correct / len(ids)}


def classification_scores(
    predictions: Mapping[str, int],
    labels: Mapping[str, int],
    *,
    strict: bool = False,
) -> dict[str, float]:
    """Accuracy and macro-F1 (x100) over the ids of ``labels``. Macro-F1 averages the F1 of every class that
    is a gold label or a prediction (as scikit-learn does); a missing prediction is a miss of its gold class.
    """
    scores = accuracy(predictions, labels, strict=strict)
    pairs = [(int(labels[i]), int(predictions[i]) if i in predictions else None) for i in labels]
    classes = {g for g, _ in pairs} | {p for _, p in pairs if p is not None}
    f1s = []
    for c in sorted(classes):
        tp = sum(1 for g, p in pairs if g == c and p == c)
        wrong = sum(1 for g, p in pairs if (g == c) != (p == c))  # false positives + false negatives
        f1s.append(2 * tp / (2 * tp + wrong))
    scores["macro_f1"] = 100.0 * sum(f1s) / len(f1s)
    return scores


# ---------------------------------------------------------------------------------------------------------
# teacher-student diagnostics (pure functions; the model passes are in kdlab.stages.diagnostics)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) in nats per row of [N, V] logits (softmax at T = 1, computed in fp32):
    Σ_v p_v (log p_v - log q_v)."""
    log_p = teacher_logits.float().log_softmax(-1)
    log_q = student_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> float:
    """Expected calibration error in percentage points (Guo et al. 2017): the examples binned by confidence
    into ``n_bins`` equal-width bins of [0, 1] (a confidence of exactly 1 in the last), then
    Σ_b |B_b| / n · |accuracy(B_b) - mean confidence(B_b)|, x100."""
    if len(confidences) != len(correct):
        raise ValueError("expected_calibration_error: one correctness per confidence")
    if not confidences:
        raise ValueError("expected_calibration_error: no examples")
    if any(not 0.0 <= c <= 1.0 for c in confidences):
        raise ValueError("confidences must be in [0, 1]")
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidences, correct, strict=True):
        bins.setdefault(min(int(c * n_bins), n_bins - 1), []).append((c, bool(ok)))
    total = 0.0
    for members in bins.values():
        acc = sum(ok for _, ok in members) / len(members)
        conf = sum(c for c, _ in members) / len(members)
        total += len(members) * abs(acc - conf)
    return 100.0 * total / len(confidences)


def answer_agreement(
    student: Mapping[str, object], teacher: Mapping[str, object], ids: Sequence[str]
) -> float:
    """Share of ``ids`` (percent) where the two systems give the same answer: equal labels, or generated
    answers equal after SQuAD normalization; an id either system did not answer counts as a disagreement."""
    if not ids:
        raise ValueError("answer_agreement: no examples")

    def same(a: object, b: object) -> bool:
        if isinstance(a, str) and isinstance(b, str):
            return normalize_answer(a) == normalize_answer(b)
        return a == b

    agree = sum(i in student and i in teacher and same(student[i], teacher[i]) for i in ids)
    return 100.0 * agree / len(ids)


def tail_mass(topk_logprobs: torch.Tensor, tail_lse: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Per answer token, the teacher's probability mass outside its top-k at ``temperature``.

    ``topk_logprobs`` [N, k]: the top-k log-probs at T = 1; ``tail_lse`` [N]: logsumexp over every other
    token of logp / T, as the teacher cache stores it. The tempered distribution's mass outside the top-k
    is exp(tail) / (exp(lse_k) + exp(tail)) = sigmoid(tail - lse_k), lse_k = logsumexp of the top-k logp / T.
    At T = 1 without a stored tail it is 1 - Σ exp(top-k log-probs) (the cache's fp16 rounding included)."""
    top = topk_logprobs.float()
    if tail_lse is None:
        if temperature != 1.0:
            raise ValueError("tail_mass: a temperature other than 1 needs the stored tail")
        return (1.0 - top.exp().sum(-1)).clamp(min=0.0)
    lse_k = (top / temperature).logsumexp(-1)
    return (tail_lse.float() - lse_k).sigmoid()
