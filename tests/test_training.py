"""The trainer, the methods' losses and the teacher cache wired together, on tiny models and synthetic data.

Examples are synthetic `Encoded` rows (random prompt tokens, answers of chosen lengths), so token counts per
example are controlled: uneven answer lengths are what tell a global-token mean from a mean of means.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab import losses
from kdlab.config import TrainingSettings
from kdlab.methods import METHODS, Signals
from kdlab.models import derive_student
from kdlab.scored import forward_scored
from kdlab.stages.cache import build_teacher_cache
from kdlab.tasks import SST2Task
from kdlab.tasks.base import Encoded, Example, collate
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter
from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainCollator, TrainItem, train

TEACHER_LAYERS = 4
HIDDEN = (2, 4)  # teacher hidden_states indices cached for KD3
PAIRS = [(1, 2), (2, 4)]  # student (2 blocks) -> teacher hidden_states indices


def _encoded(rng: random.Random, eid: str, prompt_len: int, answer_len: int, vocab: int) -> Encoded:
    prompt = [1] + [rng.randrange(4, vocab) for _ in range(prompt_len - 1)]
    answer = [rng.randrange(4, vocab) for _ in range(answer_len - 1)] + [2]
    return Encoded(eid, prompt + answer, [-100] * prompt_len + answer)


class Setup:
    def __init__(self, root: Path) -> None:
        self.tokenizer = build_tiny_tokenizer()
        self.vocab = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.teacher = build_tiny_llama(self.tokenizer, num_layers=TEACHER_LAYERS, seed=0).eval()
        with torch.no_grad():  # a peaked teacher, so KD terms are not all near zero
            self.teacher.model.norm.weight.mul_(8.0)
        self.student = derive_student(self.teacher, [0, 3])
        rng = random.Random(0)
        # Answer lengths with no two 4-subsets of equal total: micro-batches of 4 never hold equal
        # token counts.
        answer_lens = [1, 2, 3, 4, 5, 6, 7, 30]
        self.examples = [Example(f"ex{i}", {"sentence": "x"}) for i in range(len(answer_lens))]
        self.encoded = {ex.id: _encoded(rng, ex.id, rng.randrange(5, 20), n, self.vocab)
                        for ex, n in zip(self.examples, answer_lens, strict=True)}
        # KD2: the same prompts with a "teacher answer" as target.
        self.teacher_encoded = {}
        for i, e in self.encoded.items():
            n = e.labels.count(-100)
            self.teacher_encoded[i] = Encoded(i, e.input_ids[:n] + [5, 6, 2], [-100] * n + [5, 6, 2])
        # Top-k over the whole vocabulary (k = V), so any smaller k is a prefix and KD1 can be exact.
        self.cache = build_teacher_cache(
            root / "cache", task=SST2Task(), teacher=self.teacher, tokenizer=self.tokenizer,
            examples=self.examples, encoded=self.encoded, fingerprint_inputs={"test": 1}, top_k=self.vocab,
            hidden_layers=list(HIDDEN), answers=False, batch_size=3, hidden_dtype="float16",
            temperatures=[1.0, 2.0],
        )

    def items(self, kd2: bool = False) -> list[TrainItem]:
        return [TrainItem(gold=self.encoded[ex.id], teacher=self.teacher_encoded[ex.id] if kd2 else None)
                for ex in self.examples]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("training"))


def _settings(**kw: Any) -> TrainingSettings:
    base = dict(learning_rate=5e-3, batch_size=4, max_steps=2, warmup_ratio=0.0, logging_steps=1,
                lr_scheduler="constant")
    return TrainingSettings(**{**base, **kw})


def _run(setup: Setup, tmp: Path, method: str, params: dict[str, Any], *,
         settings: TrainingSettings | None = None, online: bool = False, seed: int = 7):
    student = copy.deepcopy(setup.student)
    m = METHODS[method]
    signals = m.signals(params)
    pairs = PAIRS if signals.layer_map is not None else []
    projections = losses.make_projections(pairs, 64, 64) if pairs else None
    result = train(
        student, setup.items(kd2=signals.answers), method=m, params=params, settings=settings or _settings(),
        output_dir=tmp / f"{method}-{len(list(tmp.iterdir()))}", seed=seed, pad_id=setup.pad_id,
        vocab_size=setup.vocab, cache=None if online else setup.cache,
        live_teacher=setup.teacher if online else None, layer_pairs=pairs, projections=projections,
    )
    return student, projections, result


def _losses(result) -> list[dict[str, float]]:
    keys = ("loss", "loss_ce", "loss_kd", "grad_norm")
    return [{k: e[k] for k in keys if k in e} for e in result.log_history if "loss" in e]


KD1 = {"lam": 0.0, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 8}


def test_lambda_zero_is_sft(setup: Setup, tmp_path: Path) -> None:
    """λ = 0 must be plain SFT: same weights and losses bit for bit (catches a KD term, a teacher forward,
    an extra RNG draw or a changed data order sneaking into the λ = 0 path)."""
    sft, _, sft_result = _run(setup, tmp_path, "sft", {})
    reference = _losses(sft_result)
    assert len(reference) == 2 and all(e["loss"] > 0 for e in reference)
    runs = {
        "kd1": KD1,
        "kd2": {"lam": 0.0},
        "kd3": {"lam": 0.0, "layer_map": "uniform", "loss": "mse"},
    }
    for method, params in runs.items():
        student, _, result = _run(setup, tmp_path, method, params)
        history = _losses(result)
        assert [{k: e[k] for k in ("loss", "grad_norm")} for e in history] == \
            [{k: e[k] for k in ("loss", "grad_norm")} for e in reference], method
        for (name, a), (_, b) in zip(student.state_dict().items(), sft.state_dict().items(), strict=True):
            assert torch.equal(a, b), f"{method}: {name} differs from SFT"
    # The runs did train: the weights moved away from the initial student.
    assert not torch.equal(sft.model.layers[0].self_attn.q_proj.weight,
                           setup.student.model.layers[0].self_attn.q_proj.weight)


def test_same_seed_same_run(setup: Setup, tmp_path: Path) -> None:
    a, _, ra = _run(setup, tmp_path, "kd1", dict(KD1, lam=0.5), settings=_settings(max_steps=1))
    b, _, rb = _run(setup, tmp_path, "kd1", dict(KD1, lam=0.5), settings=_settings(max_steps=1))
    assert _losses(ra) == _losses(rb)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert "loss_kd" in _losses(ra)[0] and _losses(ra)[0]["loss_kd"] > 0


def test_kd3_projections_receive_gradient(setup: Setup, tmp_path: Path) -> None:
    params = {"lam": 1.0, "layer_map": "uniform", "loss": "mse"}
    _, projections, result = _run(setup, tmp_path, "kd3", params, settings=_settings(max_steps=1))
    assert projections is not None and len(projections) == 2
    for p in projections:  # identity-initialised (equal widths); a step must move them
        assert not torch.equal(p.weight, torch.eye(64)), "KD3 projections were not trained"
    first = _losses(result)[0]
    assert first["loss_kd"] > 0
    assert first["loss"] == pytest.approx(first["loss_ce"] + first["loss_kd"], rel=1e-4)


def test_kd1_loss_normalised_over_the_global_batch(setup: Setup, tmp_path: Path) -> None:
    """batch 4 × accumulation 2 and batch 8 × 1 see the same 8 examples in step 1 and must log the same
    loss and gradient norm. Answer lengths differ per micro-batch, so averaging per-micro-batch means (or
    dividing by the accumulation steps twice) gives a different number."""
    params = dict(KD1, lam=0.5)
    _, _, split = _run(setup, tmp_path, "kd1", params,
                       settings=_settings(batch_size=4, gradient_accumulation_steps=2, max_steps=1))
    _, _, whole = _run(setup, tmp_path, "kd1", params, settings=_settings(batch_size=8, max_steps=1))
    a, b = _losses(split)[0], _losses(whole)[0]
    assert set(a) == set(b) == {"loss", "loss_ce", "loss_kd", "grad_norm"}
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=2e-4), (key, a, b)


def test_collator_looks_rows_up_by_example_id(tmp_path: Path) -> None:
    """Example i's cached rows encode i; a shuffled batch must get each example's own rows, in the row
    order forward_scored uses (row-major over the batch, answer tokens in order)."""
    rng = random.Random(1)
    vocab, k, width = 100, 3, 4
    lengths = {f"e{i}": 1 + i % 4 for i in range(10)}
    encoded = {i: _encoded(rng, i, rng.randrange(2, 9), n, vocab) for i, n in lengths.items()}
    with TeacherCacheWriter(tmp_path / "c", fingerprint_inputs={"t": 1}, vocab_size=vocab, top_k=k,
                            hidden_layers=[3], temperatures=[1.0, 2.0],
                            shard_rows=7) as writer:  # several shards
        for num, (i, n) in enumerate(lengths.items()):
            rows = torch.arange(n)
            writer.add(i, topk_indices=torch.stack([torch.full((n,), num), rows, rows], 1),
                       topk_logprobs=-(rows[:, None].float().expand(n, k) + num / 100),
                       topk_tail={t: -(rows.float() + num / 100) * t for t in (1.0, 2.0)},
                       hidden={3: torch.full((n, width), float(num)) + rows[:, None] / 8})
    cache = TeacherCache.open(tmp_path / "c")
    ids = list(lengths)
    rng.shuffle(ids)
    with pytest.raises(ValueError, match="temperature"):
        TrainCollator(0, signals=Signals(top_k=8), cache=cache)
    for method, key in (("kd1", "teacher_topk_indices"), ("kd3", "teacher_hidden_3")):
        signals = Signals(top_k=8, temperature=2.0) if method == "kd1" else Signals(layer_map="uniform")
        collator = TrainCollator(0, signals=signals, cache=cache, teacher_layers=[3])
        batch = collator([TrainItem(gold=encoded[i]) for i in ids])
        counts = (batch["labels"] != -100).sum(1).tolist()
        assert counts == [lengths[i] for i in ids]
        parts = batch[key].split(counts)
        tails = batch["teacher_topk_tail_lse"].split(counts) if method == "kd1" else parts
        assert method == "kd1" or "teacher_topk_tail_lse" not in batch
        for i, part, tail in zip(ids, parts, tails, strict=True):
            num = list(lengths).index(i)
            if method == "kd1":
                assert part[:, 0].tolist() == [num] * lengths[i]
                assert part[:, 1].tolist() == list(range(lengths[i]))
                assert torch.equal(tail, -(torch.arange(lengths[i]).float() + num / 100) * 2.0)  # T = 2's
            else:
                expected = torch.full((lengths[i], width), float(num)) + torch.arange(lengths[i])[:, None] / 8
                assert torch.allclose(part, expected, atol=1e-2)
        assert "example_ids" not in batch


def test_forward_scored_rows_on_left_padded_batch(setup: Setup) -> None:
    model = setup.teacher
    items = [setup.encoded[ex.id] for ex in setup.examples]
    batch = collate(items, setup.pad_id, padding_side="left")
    batch.pop("example_ids")
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # padding present
    with torch.no_grad():
        scored = forward_scored(model, batch, hidden_layers=[0, 2], vocab_size=setup.vocab - 10)
        logits, targets, hidden = [], [], {0: [], 2: []}
        for e in items:  # one unpadded sequence at a time, full logits, shifted by hand
            out = model(input_ids=torch.tensor([e.input_ids]), output_hidden_states=True, use_cache=False)
            pos = [p for p in range(len(e.labels) - 1) if e.labels[p + 1] != -100]
            logits.append(out.logits[0, pos, : setup.vocab - 10])
            targets += [e.labels[p + 1] for p in pos]
            for layer in hidden:
                hidden[layer].append(out.hidden_states[layer][0, pos])
    assert scored.counts.tolist() == [sum(1 for x in e.labels if x != -100) for e in items]
    assert scored.targets.tolist() == targets
    assert scored.logits.shape == (len(targets), setup.vocab - 10)
    assert torch.allclose(scored.logits, torch.cat(logits), atol=1e-4)
    for layer in hidden:
        assert torch.allclose(scored.hidden[layer], torch.cat(hidden[layer]), atol=1e-4)


def test_forward_scored_refuses_right_padding(setup: Setup) -> None:
    # A short answer followed by padding falls outside the answer window of the batch's longest answer.
    rng = random.Random(3)
    items = [_encoded(rng, "short", 3, 1, setup.vocab), _encoded(rng, "long", 10, 5, setup.vocab)]
    batch = collate(items, setup.pad_id, padding_side="right")
    batch.pop("example_ids")
    with pytest.raises(ValueError, match="left-padded"):
        forward_scored(setup.teacher, batch)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no answer tokens"):
        forward_scored(setup.teacher, batch)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_online_teacher_matches_cache_with_full_vocab(
    setup: Setup, tmp_path: Path, temperature: float
) -> None:
    """With k = V the cached top-k divergence is exact, so a live teacher must give the same KD loss (up to
    the cache's float16 log-probs): catches misaligned rows or a mis-tempered teacher."""
    params = dict(KD1, lam=0.5, temperature=temperature, top_k=setup.vocab)
    settings = _settings(batch_size=8, max_steps=1)
    _, _, cached = _run(setup, tmp_path, "kd1", params, settings=settings)
    _, _, online = _run(setup, tmp_path, "kd1", params, settings=settings, online=True)
    a, b = _losses(cached)[0], _losses(online)[0]
    assert a["loss_ce"] == b["loss_ce"]
    assert a["loss_kd"] > 0.05
    assert a["loss_kd"] == pytest.approx(b["loss_kd"], rel=1e-2, abs=1e-3)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-2, abs=1e-3)


def test_train_refuses_empty_data(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training examples"):
        train(copy.deepcopy(setup.student), [], method=METHODS["sft"], params={}, settings=_settings(),
              output_dir=tmp_path, seed=1, pad_id=setup.pad_id, vocab_size=setup.vocab)


def test_task_loss_leaves_transfer_rows_out() -> None:
    """Transfer-set rows carry the teacher's answer as target: the task CE must not read them, and it is
    normalised by the gold rows' tokens only, while KD terms see every row."""
    from kdlab.methods import LossInputs, get_method
    from kdlab.scored import Scored

    torch.manual_seed(0)
    logits, targets = torch.randn(5, 11), torch.randint(0, 11, (5,))
    scored = Scored(logits=logits, targets=targets, hidden={}, counts=torch.tensor([2, 3]))
    x = LossInputs(
        model=torch.nn.Identity(), batch={"gold_rows": torch.tensor([True, False])},
        forward_student=lambda prefix: scored, forward_teacher=lambda prefix: None, num_tokens=5,
        num_gold_tokens=2, num_teacher_tokens=1,
        params={}, layer_pairs=[], projections=None, vocab_size=11,
    )
    loss, _ = get_method("sft").loss(x)
    expected = torch.nn.functional.cross_entropy(logits[:2], targets[:2], reduction="sum") / 2
    torch.testing.assert_close(loss, expected)
    # A global batch of transfer rows only: no gold token, a task loss of 0 rather than 0/0.
    only = dataclasses.replace(x, batch={"gold_rows": torch.tensor([False, False])}, num_gold_tokens=0)
    assert float(get_method("sft").loss(only)[0]) == 0.0


def test_report_to_tensorboard_writes_the_losses(setup: Setup, tmp_path: Path) -> None:
    """Any TrainingArguments field passes through `training`: with report_to tensorboard, the run's losses
    (the method's parts included) land in TensorBoard event files under the run's trainer folder."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    params = dict(KD1, lam=0.5)
    _run(setup, tmp_path, "kd1", params, settings=_settings(report_to=["tensorboard"], max_steps=2))
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/loss_ce", "train/loss_kd"} <= set(scalars)
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]


def test_trainer_arguments_pass_through() -> None:
    from kdlab.training import training_arguments

    settings = TrainingSettings(report_to="tensorboard", optim="adafactor", save_total_limit="2")
    # The config keeps what the YAML said (it imports no transformers); the Trainer gets converted values.
    assert settings.model_extra == {"report_to": "tensorboard", "optim": "adafactor", "save_total_limit": "2"}
    args = training_arguments(settings, "unused", 3, use_cpu=True, run_name="kd1-sst2-s1-lam0.5-seed3")
    assert args.run_name == "kd1-sst2-s1-lam0.5-seed3" and args.report_to == ["tensorboard"]
    assert args.optim == "adafactor" and args.save_total_limit == 2 and args.seed == 3
    # Without pass-through fields the Trainer is set up as before: no integration reports anything.
    assert training_arguments(TrainingSettings(), "unused", 3, use_cpu=True).report_to == []


# ---------------------------------------------------------------------------------------------------------
# mixed precision: frozen weights in the compute dtype, trainable ones fp32


def _dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], set[torch.dtype]]:
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trainable


def test_lora_student_keeps_frozen_base_in_compute_dtype(tmp_path: Path) -> None:
    from kdlab.config import LoraSettings
    from kdlab.models import load_frozen, load_trainable
    from kdlab.tiny import write_tiny_llama

    path = str(write_tiny_llama(tmp_path / "tiny", num_layers=2))
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    student = load_trainable(path, finetune="lora", lora=lora, dtype="bfloat16")
    assert _dtypes(student) == ({torch.bfloat16}, {torch.float32})
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    # Full fine-tuning: every weight is a master weight, fp32 whatever the compute dtype.
    full = load_trainable(path, finetune="full", lora=lora, dtype="bfloat16")
    assert _dtypes(full) == (set(), {torch.float32})
    teacher = load_frozen(path, dtype="bfloat16")
    assert _dtypes(teacher) == ({torch.bfloat16}, set()) and not teacher.training
    # Without mixed precision nothing changes: fp32 throughout.
    assert _dtypes(load_trainable(path, finetune="lora", lora=lora)) == ({torch.float32}, {torch.float32})


def test_bf16_run_with_bf16_base_trains_the_fp32_adapters(setup: Setup, tmp_path: Path) -> None:
    """A LoRA student on a bf16 base under bf16 autocast: finite losses that move, adapters updated and still
    fp32, the base untouched and still bf16 (also KD1 against a bf16 live teacher)."""
    from kdlab.config import LoraSettings
    from kdlab.models import add_lora

    for method, params, online in (("sft", {}, False), ("kd1", dict(KD1, lam=0.5), True)):
        student = add_lora(copy.deepcopy(setup.student).to(torch.bfloat16),
                           LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
        base_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
        lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        teacher = copy.deepcopy(setup.teacher).to(torch.bfloat16).requires_grad_(False) if online else None
        result = train(student, setup.items(), method=METHODS[method], params=params,
                       settings=_settings(bf16=True, max_steps=4, learning_rate=2e-2),
                       output_dir=tmp_path / method, seed=1, pad_id=setup.pad_id, vocab_size=setup.vocab,
                       cache=None if online else setup.cache, live_teacher=teacher)
        logged = [e["loss"] for e in _losses(result)]
        assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged))), logged
        assert len(set(logged)) > 1, f"{method}: the loss never changed: {logged}"
        assert _dtypes(student) == ({torch.bfloat16}, {torch.float32})
        for n, p in student.named_parameters():
            if p.requires_grad:
                continue
            assert torch.equal(p, base_before[n]), f"{method}: frozen {n} changed"
        moved = [n for n, p in student.named_parameters()
                 if p.requires_grad and not torch.equal(p, lora_before[n])]
        assert moved, f"{method}: no adapter weight was updated"


def test_study_loads_frozen_weights_in_bf16(tiny_data_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`training.bf16` in a study: the sweep hands `train` a LoRA student with a bf16 base and fp32 adapters
    and a bf16 live teacher (cache.mode online), and the run finishes."""
    import yaml

    import kdlab.job
    from kdlab.cli import main
    from kdlab.config import preset_text

    seen: list[tuple[Any, Any]] = []
    real_train = kdlab.job.train

    def spy(student: torch.nn.Module, items: Any, **kwargs: Any) -> Any:
        teacher = kwargs.get("live_teacher")
        seen.append((_dtypes(student), None if teacher is None else _dtypes(teacher)))
        return real_train(student, items, **kwargs)

    monkeypatch.setattr(kdlab.job, "train", spy)
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"kd1": {"lambda": 0.5, "top_k": 8}}
    data["seeds"] = [1]
    data["output_dir"] = str(tmp_path / "out")
    data["training"].update(bf16=True, max_steps=2)
    data["cache"] = {"mode": "online"}
    data["bench"] = {"enabled": False}
    config = tmp_path / "bf16.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 0
    assert seen == [(({torch.bfloat16}, {torch.float32}), ({torch.bfloat16}, set()))]


def _feature_reference(hs: list[torch.Tensor], ht: list[torch.Tensor], projections: Any) -> torch.Tensor:
    """KD3's feature loss written out pair by pair in fp32 (layer-normed MSE, pairs averaged)."""
    total = torch.zeros(())
    for h_s, h_t, proj in zip(hs, ht, projections, strict=True):
        a = torch.nn.functional.layer_norm(proj(h_s.float()), (h_t.shape[-1],))
        b = torch.nn.functional.layer_norm(h_t.float(), (h_t.shape[-1],))
        total = total + (a - b).pow(2).mean(-1).sum()
    return total / len(hs)


@pytest.mark.parametrize("widths", [(64, 96), (2048, 4096)])  # toy, and TinyLlama -> Llama-2-7B
def test_fused_feature_loss_matches_per_pair_reference(widths: tuple[int, int]) -> None:
    """The batched projection (one bmm over the pairs) gives the per-pair loss and gradients in fp32."""
    d_s, d_t = widths
    torch.manual_seed(0)
    pairs = [(1, 2), (2, 4), (3, 6)]
    projections = losses.make_projections(pairs, d_s, d_t)
    hs = [torch.randn(24, d_s, requires_grad=True) for _ in pairs]
    ht = [torch.randn(24, d_t) * 5 for _ in pairs]
    fused = losses.feature_loss(hs, ht, projections, num_tokens=24)
    ref_proj = copy.deepcopy(projections)
    ref_hs = [h.detach().clone().requires_grad_(True) for h in hs]
    reference = _feature_reference(ref_hs, ht, ref_proj) / 24
    assert float(fused.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    fused.backward()
    reference.backward()
    for p, q in zip(projections, ref_proj, strict=True):
        torch.testing.assert_close(p.weight.grad, q.weight.grad, rtol=1e-4, atol=1e-7)
    for a, b in zip(hs, ref_hs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_feature_loss_runs_projections_in_the_compute_dtype() -> None:
    """bf16 student states with fp32 (master) projections: the matmul runs in bf16, the gradient reaches the
    fp32 weights, and the loss stays within bf16 rounding of the fp32 reference at the thesis widths."""
    torch.manual_seed(1)
    pairs = [(1, 1), (2, 2)]
    projections = losses.make_projections(pairs, 2048, 4096)
    hs32 = [torch.randn(16, 2048) for _ in pairs]
    ht = [torch.randn(16, 4096).half() for _ in pairs]  # the cache stores fp16
    hs = [h.bfloat16().requires_grad_(True) for h in hs32]
    projected = losses._project(hs, projections)
    assert projected.dtype == torch.bfloat16 and projected.shape == (2, 16, 4096)
    loss = losses.feature_loss(hs, ht, projections, num_tokens=16)
    assert loss.dtype == torch.float32
    reference = _feature_reference(hs32, ht, projections) / 16
    assert float(loss.detach()) == pytest.approx(float(reference), rel=2e-2)
    loss.backward()
    assert all(p.weight.grad is not None and p.weight.grad.dtype == torch.float32 for p in projections)
    assert all(p.weight.dtype == torch.float32 for p in projections)
    # Projections built in bf16 (make_projections' dtype) work too, and a module that is not a plain linear
    # map takes the per-pair path.
    half = losses.make_projections(pairs, 2048, 4096, dtype=torch.bfloat16)
    assert {p.weight.dtype for p in half} == {torch.bfloat16}
    other = torch.nn.ModuleList(torch.nn.Sequential(p) for p in copy.deepcopy(projections))
    same = losses.feature_loss([h.detach() for h in hs], ht, other, num_tokens=16)
    assert float(same) == pytest.approx(float(reference), rel=2e-2)


def test_kd3_projection_matmul_runs_in_bf16_under_mixed_precision(setup: Setup, tmp_path: Path) -> None:
    """KDTrainer runs the method's loss under the run's autocast: an fp32 (full fine-tune) student's fp32
    states are projected in bf16 when training.bf16 is on, in fp32 when it is off; both runs train."""
    seen: list[torch.dtype] = []
    real = losses._project

    def spy(hidden: list[torch.Tensor], projections: Any) -> torch.Tensor:
        out = real(hidden, projections)
        seen.append(out.dtype)
        return out

    params = {"lam": 1.0, "layer_map": "uniform", "loss": "mse"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(losses, "_project", spy)
        _, _, mixed = _run(setup, tmp_path, "kd3", params, settings=_settings(max_steps=1, bf16=True))
        mixed_seen, seen[:] = list(seen), []
        _, _, plain = _run(setup, tmp_path, "kd3", params, settings=_settings(max_steps=1))
    assert set(mixed_seen) == {torch.bfloat16} and set(seen) == {torch.float32}
    a, b = _losses(mixed)[0], _losses(plain)[0]
    assert a["loss_kd"] == pytest.approx(b["loss_kd"], rel=2e-2)  # same loss, to bf16 rounding


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path: Path) -> None:
    """A run redone under new settings (`--force`) must not continue from checkpoints made under the old
    ones; the same settings resume from the newest whole checkpoint; a half-written one is never picked."""
    from kdlab.training import SETTINGS_MARK, last_checkpoint

    trainer = tmp_path / "trainer"
    assert last_checkpoint(trainer, "aaa") is None  # a first run: the folder is marked for later
    assert (trainer / SETTINGS_MARK).read_text() == "aaa"
    for step in (2, 4):
        (trainer / f"checkpoint-{step}").mkdir()
        (trainer / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (trainer / "checkpoint-6").mkdir()  # killed before its trainer_state.json
    assert last_checkpoint(trainer, "aaa") == str(trainer / "checkpoint-4")
    assert not (trainer / "checkpoint-6").exists()
    assert last_checkpoint(trainer, "bbb") is None  # other settings: start over
    assert not list(trainer.glob("checkpoint-*"))
    assert (trainer / SETTINGS_MARK).read_text() == "bbb"
