"""Loss values the trainer logs, checked against hand computations that share no code with kdlab.

Every reference here runs the model on one unpadded sequence at a time and computes its loss in float64
with plain torch (no `kdlab.losses`, no `forward_scored`, no collator), at a realistic vocabulary (32,000).
The trainer runs the same examples left-padded in micro-batches with gradient accumulation, so a wrong
normaliser (per micro-batch, per sequence, gold tokens for teacher tokens), a wrong target (gold answers
where the teacher's belong) or a misaligned row gives another number.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kdlab import losses
from kdlab.config import TrainingSettings
from kdlab.methods import METHODS
from kdlab.tasks.base import Encoded
from kdlab.training import TrainItem, train

VOCAB = 32_000
PAD = 0
TEACHER_LAYERS = 3
STUDENT_LAYERS = [0, 2]  # teacher blocks the student keeps
PAIRS = [(1, 1), (2, 3)]  # KD3: student hidden_states index -> teacher hidden_states index


def _llama(num_layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _seq(rng: random.Random, eid: str, prompt: list[int], answer_len: int) -> Encoded:
    answer = [rng.randrange(4, VOCAB) for _ in range(answer_len - 1)] + [2]
    return Encoded(eid, prompt + answer, [-100] * len(prompt) + answer)


class Data:
    """Eight examples: six gold ones with a teacher answer of another length than the gold answer, and two
    transfer examples (target = the teacher's answer, no gold). Lengths are uneven so that no two
    micro-batches hold the same token counts."""

    def __init__(self) -> None:
        rng = random.Random(3)
        gold_lens, teacher_lens = [1, 2, 5, 3, 9, 4], [4, 7, 2, 11, 3, 6]
        self.items: list[TrainItem] = []
        for n, (g, t) in enumerate(zip(gold_lens, teacher_lens, strict=True)):
            prompt = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 12))]
            gold, teacher = _seq(rng, f"g{n}", prompt, g), _seq(rng, f"g{n}", prompt, t)
            self.items.append(TrainItem(gold=gold, teacher=teacher))
        for n, t in enumerate([8, 13]):
            prompt = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 12))]
            item = _seq(rng, f"t{n}", prompt, t)
            self.items.append(TrainItem(gold=item, teacher=item, transfer=True))


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    teacher = _llama(TEACHER_LAYERS, seed=0)
    with torch.no_grad():  # a peaked teacher, so the KD terms are far from 0
        teacher.model.norm.weight.mul_(6.0)
    student = _llama(len(STUDENT_LAYERS), seed=1)
    return teacher, student


def _settings(**kw: Any) -> TrainingSettings:
    # One optimizer step over all eight examples: 4 per micro-batch × 2 accumulation steps.
    base = dict(learning_rate=1e-3, batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                warmup_ratio=0.0, logging_steps=1, lr_scheduler="constant", max_grad_norm=1e9)
    return TrainingSettings(**{**base, **kw})


def _first_log(result: Any) -> dict[str, float]:
    entry = next(e for e in result.log_history if "loss" in e)
    return {k: float(v) for k, v in entry.items() if k.startswith("loss") or k == "grad_norm"}


def _answer_positions(e: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions whose output predicts an answer token, those tokens) of one sequence."""
    labels = torch.tensor(e.labels)
    where = (labels != -100).nonzero().squeeze(1)
    return where - 1, labels[where]


def _ce_sum(model: torch.nn.Module, e: Encoded) -> torch.Tensor:
    """Summed CE (float64) of one unpadded sequence's answer tokens."""
    logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()
    pos, tgt = _answer_positions(e)
    return -logits.log_softmax(-1)[pos, tgt].sum()


def _grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def _check(log: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        # The Trainer rounds logged losses to 4 decimals; fp32 forwards of padded vs unpadded rows differ
        # in the last bits.
        assert log[key] == pytest.approx(value, rel=2e-4, abs=2e-4), (key, log, want)


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_kd2_loss_is_ce_on_teacher_answers_over_the_global_teacher_token_count(
    models: tuple[LlamaForCausalLM, LlamaForCausalLM], lam: float, tmp_path: Path
) -> None:
    """KD2 = (1 − λ)·CE(gold answers of the gold rows) / gold tokens + λ·CE(teacher answers of every row) /
    teacher-answer tokens, both counted over the global batch (both micro-batches); λ = 1 reads no gold."""
    _, student0 = models
    data = Data()
    student = copy.deepcopy(student0)
    result = train(
        student, data.items, method=METHODS["kd2"], params={"lam": lam}, settings=_settings(),
        output_dir=tmp_path / "run", seed=5, pad_id=PAD, vocab_size=VOCAB,
    )
    ref = copy.deepcopy(student0).train()
    gold = [it.gold for it in data.items if not it.transfer]
    teacher = [it.teacher for it in data.items]
    n_gold = sum(len(_answer_positions(e)[1]) for e in gold)
    n_teacher = sum(len(_answer_positions(e)[1]) for e in teacher)
    ce = sum(_ce_sum(ref, e) for e in gold) / n_gold
    kd = sum(_ce_sum(ref, e) for e in teacher) / n_teacher  # type: ignore[arg-type]
    total = (1 - lam) * ce + lam * kd
    want = {"loss": float(total.detach()), "loss_kd": float(kd.detach())}
    if lam < 1:
        want["loss_ce"] = float(ce.detach())
    log = _first_log(result)
    _check(log, want)
    if lam == 1:
        assert "loss_ce" not in log  # λ = 1 runs the teacher-answer sequences only
    assert log["grad_norm"] == pytest.approx(_grad_norm(total, list(ref.parameters())), rel=1e-3)


def test_kd3_loss_is_ce_plus_mean_pair_mse_of_layer_normed_states(
    models: tuple[LlamaForCausalLM, LlamaForCausalLM], tmp_path: Path
) -> None:
    """KD3 = CE(gold) / gold tokens + λ · mean over pairs of Σ_tokens mean_d (LN(P·h_s) − LN(h_t))² / all
    answer tokens (transfer rows included), hidden states at the positions that predict answer tokens."""
    teacher, student0 = models
    data = Data()
    lam = 0.7
    items = [TrainItem(gold=it.gold, transfer=it.transfer) for it in data.items]
    projections = losses.make_projections(PAIRS, 32, 32)
    with torch.no_grad():  # not the identity, so a projection applied the wrong way round shows
        for p in projections:
            p.weight.add_(0.05 * torch.randn_like(p.weight))
    ref_proj = copy.deepcopy(projections)
    student = copy.deepcopy(student0)
    result = train(
        student, items, method=METHODS["kd3"], params={"lam": lam, "layer_map": "uniform", "loss": "mse"},
        settings=_settings(), output_dir=tmp_path / "run", seed=5, pad_id=PAD, vocab_size=VOCAB,
        live_teacher=teacher, layer_pairs=PAIRS, projections=projections,
    )
    ref = copy.deepcopy(student0).train()
    ce_sum, n_gold, n_all = torch.zeros((), dtype=torch.float64), 0, 0
    feat = [torch.zeros((), dtype=torch.float64) for _ in PAIRS]
    for it in items:
        e = it.gold
        ids = torch.tensor([e.input_ids])
        out = ref(input_ids=ids, output_hidden_states=True)
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        pos, tgt = _answer_positions(e)
        n_all += len(tgt)
        if not it.transfer:
            ce_sum = ce_sum - out.logits[0].double().log_softmax(-1)[pos, tgt].sum()
            n_gold += len(tgt)
        for j, (s, t) in enumerate(PAIRS):
            h_s = out.hidden_states[s][0, pos].double() @ ref_proj[j].weight.double().T
            h_t = t_hidden[t][0, pos].double()
            ln = [(h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
                  for h in (h_s, h_t)]
            feat[j] = feat[j] + ((ln[0] - ln[1]) ** 2).mean(-1).sum()
    ce = ce_sum / n_gold
    kd = sum(f / n_all for f in feat) / len(PAIRS)
    total = ce + lam * kd
    log = _first_log(result)
    _check(log, {"loss": float(total.detach()), "loss_ce": float(ce.detach()), "loss_kd": float(kd.detach())})
    params = list(ref.parameters()) + list(ref_proj.parameters())
    assert log["grad_norm"] == pytest.approx(_grad_norm(total, params), rel=1e-3)


def test_sft_loss_leaves_transfer_rows_out(models: tuple[LlamaForCausalLM, LlamaForCausalLM],
                                           tmp_path: Path) -> None:
    """The baseline's loss is CE over the gold rows' answer tokens / their global count (transfer rows,
    were they handed to it, carry no gold and must not count)."""
    _, student0 = models
    data = Data()
    items = [TrainItem(gold=it.gold, transfer=it.transfer) for it in data.items]
    result = train(copy.deepcopy(student0), items, method=METHODS["sft"], params={}, settings=_settings(),
                   output_dir=tmp_path / "run", seed=5, pad_id=PAD, vocab_size=VOCAB)
    ref = copy.deepcopy(student0).train()
    gold = [it.gold for it in items if not it.transfer]
    ce = sum(_ce_sum(ref, e) for e in gold) / sum(len(_answer_positions(e)[1]) for e in gold)
    _check(_first_log(result), {"loss": float(ce.detach())})


def test_reference_sanity() -> None:
    """The hand computations' own building block agrees with torch's CE (so a wrong reference cannot make
    a wrong trainer pass)."""
    model = _llama(1, seed=2)
    e = _seq(random.Random(0), "x", [1, 5, 6, 7], 4)
    logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
    pos, tgt = _answer_positions(e)
    want = F.cross_entropy(logits[pos].double(), tgt, reduction="sum")
    assert float(_ce_sum(model, e)) == pytest.approx(float(want), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# the teacher cache at k < V: exact tails, a bf16 teacher


class _VocabOnly:
    """What the cache builder reads of a tokenizer when it stores no answers: its length and pad id."""

    pad_token_id = PAD

    def __len__(self) -> int:
        return VOCAB


def _cache_examples(n: int = 6) -> tuple[list[Any], dict[str, Encoded]]:
    from kdlab.tasks.base import Example

    rng = random.Random(11)
    examples, encoded = [], {}
    for i in range(n):
        prompt = [1] + [rng.randrange(4, VOCAB) for _ in range(rng.randrange(3, 10))]
        examples.append(Example(f"c{i}", {"sentence": "x", "label": 0}))
        encoded[f"c{i}"] = _seq(rng, f"c{i}", prompt, [3, 6, 2, 8, 4, 5][i % 6])
    return examples, encoded


def _build_cache(root: Path, teacher: torch.nn.Module, top_k: int, temperatures: list[float]) -> Any:
    from kdlab.stages.cache import build_teacher_cache
    from kdlab.tasks import SST2Task

    examples, encoded = _cache_examples()
    return build_teacher_cache(
        root, task=SST2Task(), teacher=teacher, tokenizer=_VocabOnly(), examples=examples, encoded=encoded,
        fingerprint_inputs={"test": str(root)}, top_k=top_k, hidden_layers=[], answers=False, batch_size=4,
        temperatures=temperatures,
    )


TEMPERATURES = [0.5, 1.0, 4.0]


def test_bf16_teacher_cache_matches_a_float64_reference_of_the_same_logits(
    models: tuple[LlamaForCausalLM, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo and thesis build caches from a bf16 teacher. The bf16 logits the builder sees are recorded,
    and the cache must hold their top-k log-probs (to float16 storage precision) and the fp32 tail at every
    temperature as a float64 computation of those same logits gives it. A log-softmax or tail computed in
    bf16 is off by ~1e-2."""
    import kdlab.stages.cache as stage

    teacher = copy.deepcopy(models[0]).to(torch.bfloat16)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (targets, bf16 logits) of every scored row
    real = stage.forward_scored

    def recording(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        seen.append((out.targets.clone(), out.logits.detach().clone()))
        return out

    monkeypatch.setattr(stage, "forward_scored", recording)
    k = 16
    cache = _build_cache(tmp_path / "cache", teacher, k, TEMPERATURES)
    assert seen and all(logits.dtype == torch.bfloat16 for _, logits in seen)
    targets = torch.cat([t for t, _ in seen])
    ref_logp = torch.cat([lg for _, lg in seen]).double().log_softmax(-1)  # [N, V] float64
    _, encoded = _cache_examples()
    checked = 0
    for eid, e in encoded.items():
        answer = _answer_positions(e)[1]
        # The example's rows among the recorded ones: its answer tokens, in order (random ids: unique).
        start = next(s for s in range(len(targets) - len(answer) + 1)
                     if torch.equal(targets[s:s + len(answer)], answer))
        ref = ref_logp[start:start + len(answer)]
        for temp in TEMPERATURES:
            idx, lp, tail = cache.batch_topk_tail([eid], temp)
            idx = idx.long()
            assert idx.shape == (len(answer), k)
            picked = ref.gather(1, idx)
            torch.testing.assert_close(lp.double(), picked, rtol=1e-3, atol=1e-3)  # float16 storage
            rest = ref.scatter(1, idx, float("-inf"))
            # A top-k: no token left out is more likely than one kept (ties in bf16 allowed).
            assert bool((picked.min(1).values >= rest.max(1).values).all())
            want_tail = torch.logsumexp(rest / temp, dim=-1)
            torch.testing.assert_close(tail.double(), want_tail, rtol=1e-6, atol=2e-5)
            checked += len(answer)
    assert checked == len(targets) * len(TEMPERATURES)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_student_equal_to_teacher_gets_zero_kd1_loss_from_a_top_k_cache(
    models: tuple[LlamaForCausalLM, LlamaForCausalLM], tmp_path: Path, temperature: float
) -> None:
    """With k = 16 of 32,000 tokens, the cached KD1 loss of a student equal to the teacher is 0 at every
    temperature of the grid (and so is its gradient): the exact tail at T makes the k + 1 buckets of both
    sides agree. A tail taken at the wrong temperature, or a tail bucket built from the student's k instead
    of the teacher's, gives a clearly positive loss."""
    from kdlab.training import TrainItem as Item

    teacher = models[0]
    cache = _build_cache(tmp_path / "cache", teacher, 16, TEMPERATURES)
    _, encoded = _cache_examples()
    items = [Item(gold=e) for e in encoded.values()]
    params = {"lam": 1.0, "temperature": temperature, "divergence": "forward_kl", "jsd_beta": 0.5,
              "top_k": 16}
    result = train(
        copy.deepcopy(teacher), items, method=METHODS["kd1"], params=params,
        settings=_settings(batch_size=3, gradient_accumulation_steps=2), output_dir=tmp_path / "run", seed=1,
        pad_id=PAD, vocab_size=VOCAB, cache=cache,
    )
    log = _first_log(result)
    # float16 log-probs in the cache leave ~1e-6; a tail at another temperature gives > 1e-2.
    assert abs(log["loss_kd"]) < 1e-4, log
    assert log["grad_norm"] < 1e-2, log
