"""Task metrics: official SQuAD v1.1 exact match / F1, and classification accuracy.

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
from collections.abc import Mapping, Sequence

__all__ = [
    "MissingPredictionsWarning",
    "UnknownPredictionsWarning",
    "accuracy",
    "exact_match",
    "f1",
    "normalize_answer",
    "squad_scores",
]

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
    if not references:
        raise ValueError("squad_scores: no reference questions to score")
    ids = list(references)
    _check_ids(predictions, ids, strict, "questions")
    em_total = f1_total = 0.0
    for qid in ids:
        golds = list(references[qid])
        if not golds:
            raise ValueError(f"squad_scores: question {qid!r} has no gold answer")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em_total += max(exact_match(pred, g) for g in golds)
        f1_total += max(f1(pred, g) for g in golds)
    return {"exact_match": 100.0 * em_total / len(ids), "f1": 100.0 * f1_total / len(ids)}


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
