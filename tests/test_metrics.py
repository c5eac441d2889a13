from __future__ import annotations

import json
import warnings

import pytest

from kdlab.metrics import (
    ANSWER_METRICS,
    MissingPredictionsWarning,
    UnknownPredictionsWarning,
    accuracy,
    answer_scores,
    classification_scores,
    exact_match,
    f1,
    normalize_answer,
    rouge_l,
    squad_scores,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Cat!", "cat"),
        ("  Denver   Broncos \n", "denver broncos"),
        ("an apple, the pear and a plum", "apple pear and plum"),
        ("theory another anthem", "theory another anthem"),  # articles only as whole words
        ("A.", ""),
        ("!!!...", ""),
        ("rock'n'roll", "rocknroll"),  # punctuation is removed, not replaced by a space
        ("naïve café", "naïve café"),  # only ASCII punctuation goes; letters are kept
        ("", ""),
    ],
)
def test_normalize_answer_official(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match() -> None:
    assert exact_match("The Denver Broncos.", "denver broncos") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    assert exact_match("", "Denver") == 0.0


def test_f1_overlap_and_counts() -> None:
    assert f1("Denver Broncos", "the Denver Broncos!") == 1.0
    assert f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    # Counter intersection: a repeated token counts only as often as in both strings.
    assert f1("x x y", "x y") == pytest.approx(0.8)
    assert f1("Broncos Denver", "Denver Broncos") == 1.0  # bag of tokens, order free


def test_f1_empty_and_punctuation_predictions() -> None:
    assert f1("", "Denver") == 0.0
    assert f1("?!", "Denver") == 0.0  # punctuation only normalizes to empty
    assert f1("the", "Denver") == 0.0  # an article only normalizes to empty
    # Official v1.1 behaviour: no common token -> F1 0, even for empty vs empty, while EM is 1.
    assert f1("", "") == 0.0
    assert exact_match("", "a") == 1.0


def test_squad_scores_max_over_golds_and_mean() -> None:
    refs = {"q1": ["Denver Broncos", "the Broncos"], "q2": ["Paris"], "q3": ["1858", "in 1858"]}
    preds = {"q1": "Broncos", "q2": "Paris", "q3": "the year 1858", "extra": "ignored"}
    with pytest.warns(UnknownPredictionsWarning, match=r"1 of 4 predictions .* \('extra'\)"):
        scores = squad_scores(preds, refs)  # the extra id is ignored, as in the official script
    # q1: EM 1 (matches "the Broncos"); q2: EM 1; q3: EM 0, F1 max(2/3 vs "1858", 1/2 vs "in 1858") = 2/3.
    assert scores["exact_match"] == pytest.approx(100 * 2 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    assert set(scores) == {"exact_match", "f1"}


def test_squad_scores_missing_prediction_warns_and_scores_zero() -> None:
    refs = {"q1": ["Paris"], "q2": ["Rome"]}
    with pytest.warns(MissingPredictionsWarning, match="1 of 2 questions"):
        scores = squad_scores({"q1": "Paris"}, refs)
    assert scores == {"exact_match": 50.0, "f1": 50.0}
    with pytest.raises(ValueError, match="'q2'"):
        squad_scores({"q1": "Paris"}, refs, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        squad_scores({"q1": "Paris", "q2": "Rome"}, refs)  # nothing missing: no warning
    with pytest.raises(ValueError, match="no reference"):
        squad_scores({}, {})


def test_accuracy_percentage() -> None:
    labels = {"a": 1, "b": 0, "c": 1, "d": 0}
    assert accuracy({"a": 1, "b": 0, "c": 0, "d": 0}, labels) == {"accuracy": 75.0}
    with pytest.warns(MissingPredictionsWarning, match="1 of 4 examples"):
        assert accuracy({"a": 1, "b": 0, "c": 1}, labels) == {"accuracy": 75.0}
    with pytest.raises(ValueError):
        accuracy({}, {})
    with pytest.warns(UnknownPredictionsWarning, match="2 of 6 predictions"):
        assert accuracy({"a": 1, "b": 0, "c": 1, "d": 0, "x": 1, "y": 0}, labels) == {"accuracy": 100.0}
    with pytest.raises(ValueError, match="'x'"):
        accuracy({"a": 1, "b": 0, "c": 1, "d": 0, "x": 1}, labels, strict=True)


def test_real_dev_gold_answers_score_100(real_data_dir) -> None:
    data = json.loads((real_data_dir / "squad" / "dev-v1.1.json").read_text())
    refs: dict[str, list[str]] = {}
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                refs[qa["id"]] = [a["text"] for a in qa["answers"]]
    first = dict(list(refs.items())[:200])
    preds = {qid: golds[0] for qid, golds in first.items()}
    assert squad_scores(preds, first) == {"exact_match": 100.0, "f1": 100.0}
    # Answering each question with the next question's answer must score far lower.
    ids = list(first)
    shifted = {qid: first[ids[(i + 1) % len(ids)]][0] for i, qid in enumerate(ids)}
    assert squad_scores(shifted, first)["exact_match"] < 50.0


def test_rouge_l_is_the_lcs_f_measure() -> None:
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert rouge_l("The Cat, sat!", "the cat sat") == 1.0  # case and punctuation are separators only
    assert rouge_l("sat the cat", "the cat sat") == pytest.approx(2 / 3)  # LCS "the cat"
    assert rouge_l("", "the cat") == 0.0 and rouge_l("dog", "the cat") == 0.0
    references = {"q1": ["the cat sat", "the cat"], "q2": ["cat"]}
    scores = answer_scores({"q1": "the cat", "q2": "a dog"}, references, ANSWER_METRICS["rouge_l"])
    assert scores == {"rouge_l": pytest.approx(50.0)}  # q1's best gold matches exactly, q2 shares nothing


def test_macro_f1_averages_the_classes() -> None:
    labels = {"a": 0, "b": 0, "c": 1, "d": 2}
    predictions = {"a": 0, "b": 1, "c": 1}  # "d" has no prediction: a miss of class 2
    with pytest.warns(MissingPredictionsWarning):
        scores = classification_scores(predictions, labels)
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; class 2: fn 1 -> 0
    assert scores == {"accuracy": 50.0, "macro_f1": pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)}
