"""Teacher-student diagnostics (kdlab.stages.diagnostics, kdlab.metrics) against hand computations, on tiny
models and a small synthetic teacher cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.evaluation import score_choices
from kdlab.metrics import answer_agreement, expected_calibration_error, tail_mass, token_kl
from kdlab.stages.diagnostics import (
    answer_logprobs,
    cache_tail_mass,
    kl_on_answers,
    label_probabilities,
    length_batches,
)
from kdlab.tasks.base import Encoded
from kdlab.teacher_cache import TeacherCacheWriter
from kdlab.tiny import build_tiny_llama


def test_token_kl_by_hand() -> None:
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    s = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.exp(t.numpy()) / np.exp(t.numpy()).sum(-1, keepdims=True)
    q = np.exp(s.numpy()) / np.exp(s.numpy()).sum(-1, keepdims=True)
    expected = (p * np.log(p / q)).sum(-1)
    assert token_kl(t, s).numpy() == pytest.approx(expected, abs=1e-6)
    assert token_kl(t, t).abs().max() < 1e-6 and token_kl(t, s)[1] == 0.0


def test_ece_by_hand() -> None:
    # Bins of width 0.1: {0.95, 0.97} -> acc 1/2, conf 0.96; {0.55} -> acc 1, conf 0.55; {1.0} (last bin
    # with 0.95 and 0.97) -> the bin [0.9, 1.0] holds 0.95, 0.97 and 1.0.
    conf = [0.95, 0.97, 0.55, 1.0]
    correct = [True, False, True, True]
    top = abs(2 / 3 - (0.95 + 0.97 + 1.0) / 3) * 3
    mid = abs(1.0 - 0.55) * 1
    assert expected_calibration_error(conf, correct) == pytest.approx(100 * (top + mid) / 4)
    assert expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [True])


def test_answer_agreement() -> None:
    ids = ["a", "b", "c", "d"]
    assert answer_agreement({"a": 1, "b": 0, "c": 1}, {"a": 1, "b": 1, "c": 1, "d": 0}, ids) == 50.0
    assert answer_agreement({"a": "The Cat.", "b": "dog"}, {"a": "cat", "b": "a dog"}, ["a", "b"]) == 100.0


def test_tail_mass_by_hand() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (5, 12))
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    k = 3
    top = np.argsort(-logp, -1)[:, :k]
    rest = np.ones_like(logp, dtype=bool)
    np.put_along_axis(rest, top, False, -1)
    top_lp = torch.tensor(np.take_along_axis(logp, top, -1))
    for temperature in (1.0, 2.0, 4.0):
        tempered = np.exp(logp / temperature)
        expected = (tempered * rest).sum(-1) / tempered.sum(-1)
        tail = torch.tensor(np.log((tempered * rest).sum(-1)))
        assert tail_mass(top_lp, tail, temperature).numpy() == pytest.approx(expected, abs=1e-6)
    assert tail_mass(top_lp, None, 1.0).numpy() == pytest.approx((np.exp(logp) * rest).sum(-1), abs=1e-6)


def write_cache(directory: Path, rng: np.random.Generator, vocab: int = 16, k: int = 4,
                temperatures: tuple[float, ...] = (2.0,)) -> dict[float, float]:
    """A small top-k cache from known full distributions; returns the mean tail mass per temperature."""
    masses: dict[float, list[float]] = {1.0: [], **{t: [] for t in temperatures}}
    with TeacherCacheWriter(directory, fingerprint_inputs={"test": 1}, vocab_size=vocab, top_k=k,
                            temperatures=temperatures) as writer:
        for i in range(7):
            n = int(rng.integers(1, 4))
            z = rng.normal(0, 2, (n, vocab))
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            top = np.argsort(-logp, -1)[:, :k]
            rest = np.ones_like(logp, dtype=bool)
            np.put_along_axis(rest, top, False, -1)
            tails = {}
            for t in masses:
                tempered = np.exp(logp / t)
                masses[t] += list((tempered * rest).sum(-1) / tempered.sum(-1))
                if t in temperatures:
                    tails[t] = np.log((tempered * rest).sum(-1)).astype(np.float32)
            writer.add(f"ex-{i}", topk_indices=top, topk_logprobs=np.take_along_axis(logp, top, -1),
                       topk_tail=tails)
    return {t: float(np.mean(v)) for t, v in masses.items()}


def test_cache_tail_mass(tmp_path: Path) -> None:
    expected = write_cache(tmp_path / "cache", np.random.default_rng(1))
    got = cache_tail_mass(tmp_path / "cache", chunk=3)  # chunks across examples
    assert got is not None and got["top_k"] == 4 and set(got["mass"]) == {"1", "2"}
    # fp16 log-probs in the cache: close, not exact
    assert got["mass"]["1"] == pytest.approx(expected[1.0], abs=2e-3)
    assert got["mass"]["2"] == pytest.approx(expected[2.0], abs=2e-3)


def test_kl_on_answers_against_unpadded_forward(tiny_tokenizer) -> None:
    teacher = build_tiny_llama(tiny_tokenizer, num_layers=2, hidden_size=32, seed=1).eval()
    student = build_tiny_llama(tiny_tokenizer, num_layers=2, hidden_size=32, seed=2).eval()
    encoded = [Encoded("a", [5, 6, 7, 8, 9], [-100, -100, -100, 8, 9]),
               Encoded("b", [10, 11, 12], [-100, 12, 2]),
               Encoded("c", [13, 14, 15, 16], [-100, -100, -100, 16])]
    batches = length_batches(encoded, 2)
    total, count, _ = kl_on_answers(teacher, student, batches, pad_id=0, vocab_size=len(tiny_tokenizer))
    # the same with the teacher's log-probs computed beforehand (the in-process memo's path)
    lp = answer_logprobs(teacher, batches, pad_id=0, vocab_size=len(tiny_tokenizer))
    assert kl_on_answers(lp, student, batches, pad_id=0, vocab_size=len(tiny_tokenizer))[:2] == (total, count)
    # By hand: each sequence alone (no padding), logits at the positions that predict the answer tokens.
    expected, n = 0.0, 0
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lt, ls = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
        for pos, label in enumerate(e.labels):
            if label != -100:
                p = lt[pos - 1].double().softmax(-1)
                q = ls[pos - 1].double().softmax(-1)
                expected += float((p * (p.log() - q.log())).sum())
                n += 1
    assert count == n == 5
    assert total / count == pytest.approx(expected / n, rel=1e-3)
    same, _, _ = kl_on_answers(teacher, teacher, batches, pad_id=0, vocab_size=len(tiny_tokenizer))
    assert abs(same) < 1e-5


def test_label_probabilities_match_score_choices(tiny_tokenizer) -> None:
    model = build_tiny_llama(tiny_tokenizer, num_layers=2, hidden_size=32, seed=3).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    choices = [[20, 21], [22], [23, 24, 25]]
    probs = label_probabilities(model, prompts, choices, pad_id=0, batch_size=4)
    best = score_choices(model, prompts, choices, pad_id=0, batch_size=4)
    assert [p.index(max(p)) for p in probs] == best
    assert all(math.isclose(sum(p), 1.0, rel_tol=1e-5) for p in probs)
    # by hand for the first prompt: summed log-probs of each continuation
    sums = []
    for choice in choices:
        ids = torch.tensor([prompts[0] + choice])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        sums.append(sum(float(logp[len(prompts[0]) - 1 + j, tok]) for j, tok in enumerate(choice)))
    expected = torch.tensor(sums).softmax(-1).tolist()
    assert probs[0] == pytest.approx(expected, abs=1e-4)


def test_single_token_label_probabilities_from_the_kl_pass(tiny_tokenizer) -> None:
    # Prompt + gold label + eos: the student's label probabilities at the first answer position equal the
    # per-label scoring pass's (what ECE uses when every label is one token).
    teacher = build_tiny_llama(tiny_tokenizer, num_layers=2, hidden_size=32, seed=4).eval()
    student = build_tiny_llama(tiny_tokenizer, num_layers=2, hidden_size=32, seed=5).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    labels, gold = [30, 31], [0, 1, 1, 0, 1]
    encoded = [Encoded(f"e{i}", [*p, labels[g], 2], [-100] * len(p) + [labels[g], 2])
               for i, (p, g) in enumerate(zip(prompts, gold, strict=True))]
    _, _, probs = kl_on_answers(teacher, student, length_batches(encoded, 2), pad_id=0,
                                vocab_size=len(tiny_tokenizer), label_tokens=labels)
    expected = label_probabilities(student, prompts, [[t] for t in labels], pad_id=0, batch_size=4)
    for i, e in enumerate(expected):
        assert probs[f"e{i}"] == pytest.approx(e, abs=1e-5)


def test_one_teacher_pass_per_task_however_the_runs_alternate(tmp_path: Path, tiny_tokenizer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep starts every group's grid before the other seeds, so a process's runs alternate between tasks:
    the teacher's log-probs of both tasks stay in memory (one pass per task), unless they do not fit."""
    import kdlab.models
    from kdlab.stages import diagnostics

    loads: list[str] = []
    monkeypatch.setattr(kdlab.models, "load_frozen", lambda path, **kw: loads.append(path) or object())
    monkeypatch.setattr(diagnostics, "answer_logprobs",
                        lambda model, batches, **kw: [torch.zeros(len(b), 1000) for b in batches])
    monkeypatch.setattr(diagnostics, "_memo", {})
    batches = {task: [[Encoded(f"{task}-{i}", [1, 2], [-100, 2])] for i in range(3)] for task in ("a", "b")}

    def diagnose(task: str) -> None:
        diagnostics._teacher_logprobs(str(tmp_path), batches[task], tiny_tokenizer, "float32",
                                      torch.device("cpu"))

    for task in ("a", "b", "a", "b", "a"):
        diagnose(task)
    assert len(loads) == 2
    monkeypatch.setattr(diagnostics, "MEMO_BYTES", 3 * 1000 * 4)  # room for one task's log-probs only
    loads.clear()
    diagnostics._memo.clear()
    for task in ("a", "b", "a"):
        diagnose(task)
    assert len(loads) == 3
