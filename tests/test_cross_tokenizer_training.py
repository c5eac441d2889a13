"""kd1 across tokenizers through the trainer: a tiny teacher and a tiny student with different tokenizers
(byte-level BPEs of 512 and 400 tokens trained on different corpora, so each cuts some words finer than the
other), the teacher live or cached, the answers aligned per example."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab import losses
from kdlab.alignment import vocabulary_map
from kdlab.config import TrainingSettings
from kdlab.methods import METHODS
from kdlab.stages.cache import build_teacher_cache
from kdlab.tasks import SST2Task
from kdlab.tasks.base import Encoded, Example, encode_prompt, target_ids
from kdlab.tiny import _CORPUS, build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainItem, train, with_teacher_view

# (prompt, answer): labels, multi-word answers (merges both ways), a non-ASCII answer (byte pieces).
EXAMPLES = [
    ("Review: a great film with a moving story . Sentiment:", " positive"),
    ("Review: the plot is dull . Sentiment:", " negative"),
    ("Question: Which team won the game? Answer:", " Denver Broncos"),
    ("Question: What is the capital of France? Answer:", " Paris"),
    ("Review: it 's a bad , boring mess . Sentiment:", " a bad , boring and terrible mess"),
    ("Review: charming . Sentiment:", " café naïve"),
    ("Context: Santa Clara in February. Question: Where? Answer:", " Santa Clara"),
    ("Review: fine performances . Sentiment:", " the best film of the year"),
]
# The student's tokenizer learns whole words of some answers (which the teacher's splits) from this corpus.
STUDENT_CORPUS = "Santa Clara Denver Broncos café naïve\n" * 20 + _CORPUS
KD1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5}


def encoded(i: int, tokenizer: Any) -> Encoded:
    prompt, answer = EXAMPLES[i]
    p, t = encode_prompt(prompt, tokenizer), target_ids(answer, tokenizer)
    return Encoded(f"ex{i}", p + t, [-100] * len(p) + t)


class Setup:
    def __init__(self, root: Path) -> None:
        self.teacher_tok = build_tiny_tokenizer(512)
        self.student_tok = build_tiny_tokenizer(400, corpus=STUDENT_CORPUS)
        self.teacher = build_tiny_llama(self.teacher_tok, num_layers=2, seed=0).eval()
        with torch.no_grad():  # a peaked teacher, so KD terms are not all near zero
            self.teacher.model.norm.weight.mul_(8.0)
        self.student = build_tiny_llama(self.student_tok, num_layers=2, seed=1)
        self.vocabulary = vocabulary_map(self.student_tok, self.teacher_tok)
        self.teacher_encoded = {f"ex{i}": encoded(i, self.teacher_tok) for i in range(len(EXAMPLES))}
        examples = [Example(f"ex{i}", {"sentence": "x"}) for i in range(len(EXAMPLES))]
        # The cache is built exactly as the cache stage builds it: the teacher on its own encodings.
        self.cache = build_teacher_cache(
            root / "cache", task=SST2Task(), teacher=self.teacher, tokenizer=self.teacher_tok,
            examples=examples, encoded=self.teacher_encoded, fingerprint_inputs={"test": 21},
            top_k=len(self.teacher_tok), hidden_layers=[2], answers=False, batch_size=3, temperatures=[2.0],
        )

    def items(self) -> list[TrainItem]:
        return [with_teacher_view(TrainItem(gold=encoded(i, self.student_tok)),
                                  self.teacher_encoded[f"ex{i}"], EXAMPLES[i][1], self.student_tok,
                                  self.teacher_tok)
                for i in range(len(EXAMPLES))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("xt"))


def settings(**kw: Any) -> TrainingSettings:
    base = dict(learning_rate=5e-3, batch_size=4, max_steps=1, warmup_ratio=0.0, logging_steps=1,
                lr_scheduler="constant")
    return TrainingSettings(**{**base, **kw})


def run(setup: Setup, tmp: Path, params: dict[str, Any], *, online: bool, **kw: Any) -> list[dict]:
    result = train(
        copy.deepcopy(setup.student), setup.items(), method=METHODS["kd1"], params=params,
        settings=kw.pop("training", settings()), output_dir=tmp / f"run-{len(list(tmp.iterdir()))}", seed=3,
        pad_id=setup.student_tok.pad_token_id, vocab_size=len(setup.student_tok),
        cache=None if online else setup.cache, live_teacher=setup.teacher if online else None,
        teacher_pad_id=setup.teacher_tok.pad_token_id, teacher_vocab_size=len(setup.teacher_tok),
        vocabulary=setup.vocabulary, **kw,
    )
    return [e for e in result.log_history if "loss" in e]


def test_the_examples_exercise_every_kind_of_chunk(setup: Setup) -> None:
    kinds = set()
    for item in setup.items():
        assert item.alignment is not None
        for c in item.alignment.chunks:
            kinds.add((min(c.student_tokens, 2), min(c.teacher_tokens, 2)))
    assert kinds == {(1, 1), (1, 2), (2, 1), (2, 2)}  # 1:1, merges both ways, many to many
    assert any(item.alignment.merges() for item in setup.items())  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_cached_and_live_teacher_give_the_same_loss(setup: Setup, tmp_path: Path, mode: str) -> None:
    """The cache holds the teacher over its whole vocabulary (k = V): a live teacher must give the same KD
    loss (up to the cache's float16 log-probs). Catches teacher rows read from the wrong sequences."""
    params = dict(KD1, top_k=len(setup.teacher_tok), cross_tokenizer=mode)
    training = settings(batch_size=8)
    cached = run(setup, tmp_path, params, online=False, training=training)[0]
    live = run(setup, tmp_path, params, online=True, training=training)[0]
    assert cached["loss_kd"] > 0.05
    assert cached["loss_ce"] == live["loss_ce"]
    assert cached["loss_kd"] == pytest.approx(live["loss_kd"], rel=1e-3, abs=1e-4)


def test_kd_loss_falls_with_a_live_teacher(setup: Setup, tmp_path: Path) -> None:
    params = dict(KD1, lam=1.0, top_k=len(setup.teacher_tok), cross_tokenizer="hybrid")
    history = run(setup, tmp_path, params, online=True, training=settings(max_steps=12, batch_size=8,
                                                                             learning_rate=1e-2))
    first, last = history[0]["loss_kd"], history[-1]["loss_kd"]
    assert last < 0.8 * first, (first, last)


def test_hybrid_with_the_teachers_own_tokenizer_is_ordinary_kd1(setup: Setup, tmp_path: Path) -> None:
    """Teacher and student share the teacher's tokenizer: aligned hybrid KD equals plain kd1 (every chunk
    1:1, byte pieces of one character included, and every token matched)."""
    tok = setup.teacher_tok
    same = vocabulary_map(tok, tok)
    rows = range(len(EXAMPLES))  # " café naïve" too: its byte pieces pair one to one
    plain = [TrainItem(gold=setup.teacher_encoded[f"ex{i}"]) for i in rows]
    aligned = [with_teacher_view(item, item.gold, EXAMPLES[i][1], tok, tok)
               for item, i in zip(plain, rows, strict=True)]
    student = build_tiny_llama(tok, num_layers=1, seed=5)
    params = dict(KD1, top_k=len(tok))
    out = []
    for items, xt in ((plain, {}), (aligned, {"cross_tokenizer": "hybrid"})):
        result = train(copy.deepcopy(student), items, method=METHODS["kd1"], params={**params, **xt},
                       settings=settings(batch_size=len(items)), output_dir=tmp_path / f"r{len(out)}", seed=3,
                       pad_id=tok.pad_token_id, vocab_size=len(tok), live_teacher=setup.teacher,
                       vocabulary=same)
        out.append([e for e in result.log_history if "loss" in e][0])
    assert out[0]["loss_kd"] > 0.05
    assert out[1]["loss_kd"] == pytest.approx(out[0]["loss_kd"], rel=1e-5)


def test_packed_batches_give_the_padded_loss(setup: Setup, tmp_path: Path) -> None:
    params = dict(KD1, top_k=len(setup.teacher_tok), cross_tokenizer="hybrid")
    padded = run(setup, tmp_path, params, online=True, training=settings(batch_size=8))[0]
    packed = run(setup, tmp_path, params, online=True, training=settings(batch_size=8, packing=True))[0]
    assert packed["loss_kd"] == pytest.approx(padded["loss_kd"], rel=1e-4)


def test_an_encoding_that_is_not_the_answer_is_refused(setup: Setup) -> None:
    wrong = encoded(1, setup.teacher_tok)  # " negative", aligned as " positive"'s
    with pytest.raises(ValueError, match="answer tokens"):
        with_teacher_view(TrainItem(gold=encoded(0, setup.student_tok)), wrong, " Denver Broncos",
                          setup.student_tok, setup.teacher_tok)


def test_uld_with_one_tokenizer_compares_row_by_row(setup: Setup, tmp_path: Path) -> None:
    """cross_tokenizer: uld with the teacher's own tokenizer (no teacher view): the same loss as the aligned
    path with every chunk 1:1, and not the plain divergence."""
    tok = setup.teacher_tok
    rows = range(len(EXAMPLES))  # " café naïve" too: its byte pieces pair one to one
    plain = [TrainItem(gold=setup.teacher_encoded[f"ex{i}"]) for i in rows]
    aligned = [with_teacher_view(item, item.gold, EXAMPLES[i][1], tok, tok)
               for item, i in zip(plain, rows, strict=True)]
    student = build_tiny_llama(tok, num_layers=1, seed=5)
    out = []
    for items, mode in ((plain, "uld"), (aligned, "uld"), (plain, "auto")):
        result = train(copy.deepcopy(student), items, method=METHODS["kd1"],
                       params=dict(KD1, top_k=len(tok), cross_tokenizer=mode),
                       settings=settings(batch_size=len(items)), output_dir=tmp_path / f"r{len(out)}", seed=3,
                       pad_id=tok.pad_token_id, vocab_size=len(tok), live_teacher=setup.teacher,
                       vocabulary=vocabulary_map(tok, tok))
        out.append([e for e in result.log_history if "loss" in e][0]["loss_kd"])
    assert out[0] == pytest.approx(out[1], rel=1e-5)
    assert abs(out[0] - out[2]) > 1e-3  # ULD is not the forward KL


def run_kd3(student, items, tmp: Path, *, tok_pad: int, vocab: int, live=None, cache=None,
            **kw: Any) -> dict:
    pairs = [(1, 2)]
    torch.manual_seed(0)
    projections = losses.make_projections(pairs, 64, 64)
    params = {"lam": 0.5, "layer_map": "last", "loss": "mse"}
    result = train(copy.deepcopy(student), items, method=METHODS["kd3"], params=params,
                   settings=settings(batch_size=len(items)), output_dir=tmp / f"k{len(list(tmp.iterdir()))}",
                   seed=3, pad_id=tok_pad, vocab_size=vocab, live_teacher=live, cache=cache,
                   layer_pairs=pairs, projections=projections, **kw)
    return [e for e in result.log_history if "loss" in e][0]


def test_kd3_with_the_teachers_own_tokenizer_is_ordinary_kd3(setup: Setup, tmp_path: Path) -> None:
    tok = setup.teacher_tok
    rows = range(len(EXAMPLES))  # " café naïve" too: its byte pieces pair one to one
    plain = [TrainItem(gold=setup.teacher_encoded[f"ex{i}"]) for i in rows]
    aligned = [with_teacher_view(item, item.gold, EXAMPLES[i][1], tok, tok)
               for item, i in zip(plain, rows, strict=True)]
    student = build_tiny_llama(tok, num_layers=1, seed=5)
    common = dict(tok_pad=tok.pad_token_id, vocab=len(tok), live=setup.teacher)
    a = run_kd3(student, plain, tmp_path, **common)
    b = run_kd3(student, aligned, tmp_path, vocabulary=vocabulary_map(tok, tok), **common)
    assert a["loss_kd"] > 0.05
    assert b["loss_kd"] == pytest.approx(a["loss_kd"], rel=1e-5)


def test_kd3_across_tokenizers_cached_and_live_agree(setup: Setup, tmp_path: Path) -> None:
    """States pooled over the aligned chunks: the cached teacher's (float16) and the live teacher's agree."""
    common = dict(tok_pad=setup.student_tok.pad_token_id, vocab=len(setup.student_tok),
                  teacher_pad_id=setup.teacher_tok.pad_token_id, teacher_vocab_size=len(setup.teacher_tok),
                  vocabulary=setup.vocabulary)
    cached = run_kd3(setup.student, setup.items(), tmp_path, cache=setup.cache, **common)
    live = run_kd3(setup.student, setup.items(), tmp_path, live=setup.teacher, **common)
    assert cached["loss_kd"] > 0.05
    assert cached["loss_kd"] == pytest.approx(live["loss_kd"], rel=1e-2)


def test_student_samples_are_retokenised_for_the_teacher(setup: Setup) -> None:
    """An on-policy sample (student tokens, maybe not the canonical ones) becomes its text encoded again by
    both tokenizers, EOS-ended, after each side's own prompt; an empty text is left out."""
    from types import SimpleNamespace

    from kdlab.tasks.base import target_ids
    from kdlab.training import KDTrainer

    s, t = setup.student_tok, setup.teacher_tok
    text = " Denver Broncos"
    pieces = [i for ch in text for i in s(ch, add_special_tokens=False)["input_ids"]]  # one token per char
    assert pieces != s(text, add_special_tokens=False)["input_ids"]  # not the canonical tokens
    prompt, t_prompt = [5, 6, 7], [8, 9]
    samples = [Encoded("a", [*prompt, *pieces], [-100] * 3 + pieces),  # cut at max_new_tokens: no EOS
               Encoded("b", [*prompt, s.eos_token_id], [-100] * 3 + [s.eos_token_id])]  # empty
    trainer = SimpleNamespace(tokenizer=s, teacher_tokenizer=t)
    kept, views, alignment = KDTrainer._retokenised(trainer, samples, {"a": t_prompt, "b": t_prompt})
    assert [k.id for k in kept] == ["a"]
    assert kept[0].input_ids == [*prompt, *target_ids(text, s)]
    assert views[0].input_ids == [*t_prompt, *target_ids(text, t)]
    assert views[0].labels == [-100] * 2 + target_ids(text, t)
    n_s, n_t = len(target_ids(text, s)), len(target_ids(text, t))
    assert alignment["xt_student_chunk"].numel() == n_s and alignment["xt_teacher_chunk"].numel() == n_t
    assert int(alignment["xt_pair_student"][-1]) == n_s - 1  # EOS pairs with EOS
    assert int(alignment["xt_pair_teacher"][-1]) == n_t - 1


def test_opd_across_tokenizers_trains_on_retokenised_samples(setup: Setup, tmp_path: Path) -> None:
    params = {"lam": 1.0, "discount": 1.0, "sample_temperature": 1.0, "max_new_tokens": 6}
    result = train(
        copy.deepcopy(setup.student), setup.items(), method=METHODS["opd"], params=params,
        settings=settings(batch_size=4, max_steps=3), output_dir=tmp_path / "opd", seed=3,
        pad_id=setup.student_tok.pad_token_id, vocab_size=len(setup.student_tok), live_teacher=setup.teacher,
        tokenizer=setup.student_tok, teacher_pad_id=setup.teacher_tok.pad_token_id,
        teacher_vocab_size=len(setup.teacher_tok), vocabulary=setup.vocabulary,
        teacher_tokenizer=setup.teacher_tok,
    )
    kd = [e["loss_kd"] for e in result.log_history if "loss_kd" in e]
    assert len(kd) == 3 and all(v == v for v in kd) and result.cost["rollout_samples"] > 0


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_gkd_across_tokenizers_trains_on_retokenised_samples(setup: Setup, tmp_path: Path,
                                                            fraction: float) -> None:
    params = {"lam": 1.0, "temperature": 1.0, "divergence": "reverse_kl", "jsd_beta": 0.5,
              "student_fraction": fraction, "seq_kd": False, "sample_temperature": 1.0,
              "max_new_tokens": 6}
    result = train(
        copy.deepcopy(setup.student), setup.items(), method=METHODS["gkd"], params=params,
        settings=settings(batch_size=4, max_steps=3), output_dir=tmp_path / "gkd", seed=3,
        pad_id=setup.student_tok.pad_token_id, vocab_size=len(setup.student_tok), live_teacher=setup.teacher,
        tokenizer=setup.student_tok, teacher_pad_id=setup.teacher_tok.pad_token_id,
        teacher_vocab_size=len(setup.teacher_tok), vocabulary=setup.vocabulary,
        teacher_tokenizer=setup.teacher_tok, rollouts_file=tmp_path / "rollouts.jsonl",
    )
    kd = [e["loss_kd"] for e in result.log_history if "loss_kd" in e]
    assert len(kd) == 3 and all(v == v and v >= 0 for v in kd) and max(kd) > 0
    assert result.cost["rollout_samples"] > 0 and result.cost["teacher_tokens"] > 0


def test_the_teacher_reads_each_sequence_sets_own_view_and_alignment(setup: Setup) -> None:
    """Gold and POLICY sequences each carry the teacher's own encoding and their alignment: the live teacher
    runs on the set asked for, with that set's alignment."""
    import contextlib
    from collections import defaultdict
    from types import SimpleNamespace

    from kdlab.alignment import TEACHER_VIEW, batch_alignment
    from kdlab.methods import POLICY, Signals
    from kdlab.tasks.base import collate
    from kdlab.training import KDTrainer, answer_tokens

    items = setup.items()
    gold, policy = items[:2], items[2:5]
    batch: dict[str, Any] = {}
    for prefix, chosen in (("", gold), (POLICY, policy)):
        views = collate([it.teacher_view for it in chosen], setup.teacher_tok.pad_token_id,
                        padding_side="left")
        views.pop("example_ids")
        batch.update({prefix + TEACHER_VIEW + k: v for k, v in views.items()})
        alignment = batch_alignment([it.alignment for it in chosen],
                                    [answer_tokens(it.gold) for it in chosen],
                                    [answer_tokens(it.teacher_view) for it in chosen])
        batch.update({prefix + k: v for k, v in alignment.items()})
    trainer = SimpleNamespace(signals=Signals(live=True), layer_pairs=[], live_teacher=setup.teacher,
                              accelerator=SimpleNamespace(autocast=contextlib.nullcontext),
                              teacher_vocab_size=len(setup.teacher_tok), vocabulary=setup.vocabulary,
                              cost=defaultdict(float))
    for prefix, chosen in (("", gold), (POLICY, policy)):
        teacher = KDTrainer._teacher_on(trainer, batch, prefix)
        assert teacher.logits.shape[0] == sum(len(answer_tokens(it.teacher_view)) for it in chosen)
        assert torch.equal(teacher.alignment["xt_pair_teacher"], batch[prefix + "xt_pair_teacher"])
