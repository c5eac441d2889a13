"""Padding-free batches (`training.packing`): the sequences of a batch back to back in one row, positions
restarting per sequence, no attention mask. They must give the padded batch's loss and gradients (to float
tolerance): same answer rows, same order, attention kept within each sequence."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdlab.config import TrainingSettings
from kdlab.methods import METHODS, TEACHER_ANSWER
from kdlab.scored import answer_counts, forward_scored, pack, packing_respected
from kdlab.stages.cache import build_teacher_cache
from kdlab.tasks import SST2Task
from kdlab.tasks.base import Encoded, Example, collate
from kdlab.tiny import build_tiny_tokenizer
from kdlab.training import KDTrainer, StudentModule, TrainCollator, TrainItem, train, training_arguments

# Prompt and answer lengths differ per sequence, so a row shifted by one position, a sequence attending to
# its neighbour or a wrong token count all change the loss.
PROMPTS = [3, 11, 6, 24, 9]
ANSWERS = [1, 5, 12, 2, 7]
KD1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 8}


def _llama(vocab: int, *, seed: int, layers: int = 2, attn: str = "sdpa") -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger attention weights: a leak across sequences shows in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _sequences(vocab: int, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        prompt = [rng.randrange(3, vocab) for _ in range(p)]
        answer = [rng.randrange(3, vocab) for _ in range(a)]
        out.append(Encoded(f"ex{i}", prompt + answer, [-100] * p + answer))
    return out


Result = tuple[dict[str, float], dict[str, torch.Tensor]]


def _loss_and_grads(method: str, params: dict[str, Any], student: torch.nn.Module, items: list[TrainItem], *,
                    packing: bool, vocab: int, tmp: Path, cache: Any = None,
                    teacher: torch.nn.Module | None = None) -> Result:
    """The method's loss on one batch through KDTrainer.compute_loss (outside the accumulation loop, so its
    own token counts), and the gradients of every student weight."""
    m = METHODS[method]
    student = copy.deepcopy(student)
    module = StudentModule(student)
    collator = TrainCollator(0, signals=m.signals(params), cache=cache, packing=packing)
    args = training_arguments(TrainingSettings(), tmp / f"{method}-{packing}", 0, use_cpu=True)
    trainer = KDTrainer(model=module, args=args, train_dataset=[], data_collator=collator, method=m,
                        params=params, vocab_size=vocab, live_teacher=teacher)
    batch = collator(items)
    assert ("seq_lengths" in batch) == packing and ("attention_mask" in batch) != packing
    loss = trainer.compute_loss(module, batch)
    loss.backward()
    parts = {name: values[-1] for name, values in trainer._parts.items()}
    return {"loss": float(loss.detach()), **parts}, {n: p.grad.clone() for n, p in student.named_parameters()}


def _assert_same(a: Result, b: Result) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert set(loss_a) == set(loss_b)
    for key in loss_a:
        assert loss_a[key] == pytest.approx(loss_b[key], rel=1e-5, abs=1e-6), (key, loss_a, loss_b)
    for name, g in grads_a.items():
        scale = float(g.abs().max()) or 1.0
        assert float((g - grads_b[name]).abs().max()) <= 1e-4 * scale, name


def test_pack_layout_and_counts() -> None:
    seqs = _sequences(100)
    packed = pack(seqs)
    total = sum(PROMPTS) + sum(ANSWERS)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, total)
    assert packed["seq_lengths"].tolist() == [p + a for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    starts = (packed["position_ids"][0] == 0).nonzero().squeeze(1).tolist()
    assert starts == [0, *packed["seq_lengths"].cumsum(0)[:-1].tolist()]
    assert answer_counts(packed).tolist() == ANSWERS
    assert answer_counts(collate(seqs, 0, padding_side="left")).tolist() == ANSWERS
    with pytest.raises(ValueError, match="prompt token"):
        pack([Encoded("x", [5, 6], [5, 6])])  # its first token would be predicted from the previous sequence


@pytest.mark.parametrize("vocab", [96, 32000])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_scored_packed_equals_padded(vocab: int, attn: str) -> None:
    model = _llama(vocab, seed=1, attn=attn).eval()
    seqs = _sequences(vocab)
    padded = collate(seqs, 0, padding_side="left")
    with torch.no_grad():
        a = forward_scored(model, padded, hidden_layers=[1, 2], vocab_size=vocab)
        b = forward_scored(model, pack(seqs), hidden_layers=[1, 2], vocab_size=vocab)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.counts, b.counts)
    assert a.logits.shape == b.logits.shape == (sum(ANSWERS), vocab)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
    for layer in (1, 2):
        torch.testing.assert_close(b.hidden[layer], a.hidden[layer], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", [96, 32000])
def test_sft_and_online_kd1_packed_match_padded(vocab: int, tmp_path: Path) -> None:
    """SFT, and KD1 against a live teacher (full-vocabulary logits: the teacher runs on the packed batch
    too), at a toy and at a Llama-sized vocabulary."""
    student, teacher = _llama(vocab, seed=2), _llama(vocab, seed=3, layers=3).eval()
    items = [TrainItem(gold=s) for s in _sequences(vocab)]
    for method, params in (("sft", {}), ("kd1", KD1)):
        common: dict[str, Any] = dict(vocab=vocab, tmp=tmp_path, teacher=teacher if method == "kd1" else None)
        padded = _loss_and_grads(method, params, student, items, packing=False, **common)
        packed = _loss_and_grads(method, params, student, items, packing=True, **common)
        _assert_same(padded, packed)
        if method == "kd1":
            assert padded[0]["kd"] > 0


def test_cached_kd1_and_kd2_packed_match_padded(tmp_path: Path) -> None:
    """KD1 reading top-k rows from a teacher cache (rows looked up by id, in forward_scored's order) and KD2's
    second target sequence (the teacher-answer batch is packed too)."""
    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    student, teacher = _llama(vocab, seed=4), _llama(vocab, seed=5, layers=3).eval()
    seqs = _sequences(vocab)
    examples = [Example(s.id, {"sentence": "x"}) for s in seqs]
    cache = build_teacher_cache(
        tmp_path / "cache", task=SST2Task(), teacher=teacher, tokenizer=tokenizer, examples=examples,
        encoded={s.id: s for s in seqs}, fingerprint_inputs={"test": "packing"}, top_k=16, hidden_layers=[],
        answers=False, batch_size=2, temperatures=[2.0],
    )
    items = [TrainItem(gold=s) for s in seqs]
    padded = _loss_and_grads("kd1", dict(KD1, top_k=16), student, items, packing=False, vocab=vocab,
                             tmp=tmp_path, cache=cache)
    packed = _loss_and_grads("kd1", dict(KD1, top_k=16), student, items, packing=True, vocab=vocab,
                             tmp=tmp_path, cache=cache)
    _assert_same(padded, packed)
    # KD2: each prompt with a different answer as second target.
    kd2_items = [TrainItem(gold=s, teacher=Encoded(s.id, s.input_ids[:p] + [7, 8, 2], [-100] * p + [7, 8, 2]))
                 for s, p in zip(seqs, PROMPTS, strict=True)]
    kd2: dict[str, Any] = dict(vocab=vocab, tmp=tmp_path)
    padded = _loss_and_grads("kd2", {"lam": 0.5}, student, kd2_items, packing=False, **kd2)
    packed = _loss_and_grads("kd2", {"lam": 0.5}, student, kd2_items, packing=True, **kd2)
    _assert_same(padded, packed)


def test_train_with_packing_logs_the_padded_losses(tmp_path: Path) -> None:
    """Two optimizer steps through `train()` (Trainer, accumulation, transfer rows): packed and padded runs
    log the same losses and end with the same weights."""
    vocab = 96
    student = _llama(vocab, seed=6)
    seqs = _sequences(vocab) + _sequences(vocab, seed=1)
    items = [TrainItem(gold=s, transfer=i % 4 == 3) for i, s in enumerate(seqs)]
    runs = {}
    for packing in (False, True):
        model = copy.deepcopy(student)
        settings = TrainingSettings(learning_rate=0.1, batch_size=3, gradient_accumulation_steps=2,
                                    max_steps=2, warmup_ratio=0.0, logging_steps=1, lr_scheduler="constant",
                                    packing=packing,
                                    optim="sgd")  # Adam would amplify rounding-level gradient differences
        result = train(model, items, method=METHODS["sft"], params={}, settings=settings,
                       output_dir=tmp_path / str(packing), seed=3, pad_id=0, vocab_size=vocab)
        runs[packing] = (model, [e for e in result.log_history if "loss" in e])
    (padded, log_a), (packed, log_b) = runs[False], runs[True]
    assert len(log_a) == len(log_b) == 2
    for a, b in zip(log_a, log_b, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (name, wa), (_, wb) in zip(padded.state_dict().items(), packed.state_dict().items(), strict=True):
        torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-5, msg=name)


class _NoPositions(torch.nn.Module):
    """A model that drops `position_ids`: packed sequences run as one long sequence (no boundaries)."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, **kwargs: Any) -> Any:
        kwargs.pop("position_ids", None)
        return self.model(**kwargs)


def test_packing_check_refuses_models_that_leak_across_sequences(tmp_path: Path) -> None:
    model = _llama(96, seed=7)
    assert packing_respected(model)
    assert model.training  # restored after the check
    assert not packing_respected(_NoPositions(model))
    settings = TrainingSettings(max_steps=1, batch_size=2, packing=True)
    with pytest.raises(ValueError, match="packing"):
        train(_NoPositions(model), [TrainItem(gold=s) for s in _sequences(96)], method=METHODS["sft"],
              params={}, settings=settings, output_dir=tmp_path, seed=0, pad_id=0, vocab_size=96)


def test_teacher_answer_keys_are_packed() -> None:
    seqs = _sequences(96)
    collator = TrainCollator(0, signals=METHODS["kd2"].signals({"lam": 0.5}), packing=True)
    batch = collator([TrainItem(gold=s, teacher=s) for s in seqs])
    assert TEACHER_ANSWER + "seq_lengths" in batch and TEACHER_ANSWER + "attention_mask" not in batch
