"""On-policy methods (gkd, opd) through the trainer and a study, on tiny models built in code.

Rollouts are drawn inside the training step from the student's current weights; these tests check what
that promises: the off-policy limit equals online kd1, on-policy steps train on samples only, samples are
reproducible (across processes, after kill -9 and resume) and differ between seeds, nothing reaches the
teacher's or the sampler's gradients, and training moves the student toward what the teacher prefers on the
student's own samples.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from kdlab import seeding
from kdlab.config import ConfigError, TrainingSettings, parse_config, preset_text
from kdlab.methods import METHODS, POLICY, LossInputs
from kdlab.methods.gkd import GKD
from kdlab.models import derive_student
from kdlab.resolve import resolve_config
from kdlab.scored import answer_counts
from kdlab.tasks.base import Encoded
from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainItem, train

GKD_PARAMS = dict(lam=0.5, temperature=2.0, divergence="forward_kl", jsd_beta=0.5, student_fraction=0.0,
                  seq_kd=False, sample_temperature=1.0, max_new_tokens=5)
OPD_PARAMS = dict(lam=1.0, discount=0.5, sample_temperature=1.0, max_new_tokens=5)


class Models:
    def __init__(self) -> None:
        self.tokenizer = build_tiny_tokenizer()
        self.vocab = len(self.tokenizer)
        self.teacher = build_tiny_llama(self.tokenizer, num_layers=4, seed=0).eval()
        with torch.no_grad():  # a peaked teacher, so KD terms are not all near zero
            self.teacher.model.norm.weight.mul_(8.0)
        self.student = derive_student(self.teacher, [0, 3])
        rng = random.Random(0)
        self.items = []
        for i in range(8):
            prompt = [1] + [rng.randrange(4, self.vocab) for _ in range(rng.randrange(4, 12))]
            answer = [rng.randrange(4, self.vocab) for _ in range(rng.randrange(1, 5))] + [2]
            gold = Encoded(f"ex{i}", prompt + answer, [-100] * len(prompt) + answer)
            self.items.append(TrainItem(gold=gold))


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


def _settings(**kw: Any) -> TrainingSettings:
    base = dict(learning_rate=5e-3, batch_size=4, max_steps=3, warmup_ratio=0.0, logging_steps=1,
                lr_scheduler="constant")
    return TrainingSettings(**{**base, **kw})


def _train(models: Models, out: Path, method: Any, params: dict, *, teacher: nn.Module | None = None,
           seed: int = 7, **settings: Any):
    student = copy.deepcopy(models.student)
    result = train(
        student, models.items, method=method, params=params, settings=_settings(**settings),
        output_dir=out / "trainer", seed=seed, pad_id=models.tokenizer.pad_token_id, vocab_size=models.vocab,
        live_teacher=teacher if teacher is not None else models.teacher, tokenizer=models.tokenizer,
        rollouts_file=out / "rollouts.jsonl",
    )
    return student, result


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_student_fraction_zero_trains_exactly_as_online_kd1(models: Models, tmp_path: Path,
                                                            divergence: str) -> None:
    gkd_params = dict(GKD_PARAMS, divergence=divergence)
    kd1_params = dict(lam=0.5, temperature=2.0, divergence=divergence, jsd_beta=0.5, top_k=models.vocab)
    gkd, gkd_result = _train(models, tmp_path / "gkd", METHODS["gkd"], gkd_params)
    kd1, _ = _train(models, tmp_path / "kd1", METHODS["kd1"], kd1_params)
    assert gkd_result.steps == 3
    assert _same_weights(gkd, kd1)
    assert not _same_weights(gkd, models.student)  # it did train
    assert gkd_result.cost["rollout_samples"] == 0  # and never sampled


class SpyGKD(GKD):
    """GKD that records, per micro-batch, whether the step was on-policy and which sequences each loss
    term ran the student on."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.teacher_graphs: list[bool] = []

    def loss(self, x: LossInputs):
        prefixes: list[str] = []
        forward = x.forward_student

        def recording(prefix: str):
            prefixes.append(prefix)
            return forward(prefix)

        x.forward_student = recording
        out = super().loss(x)
        policy = POLICY + "labels" in x.batch
        if policy:
            teacher = x.forward_teacher(POLICY)
            self.teacher_graphs.append(teacher.logits.requires_grad or teacher.logits.grad_fn is not None)
        self.calls.append(dict(on_policy=x.on_policy, prefixes=prefixes,
                               policy_labels=x.batch.get(POLICY + "labels"), gold_labels=x.batch["labels"],
                               policy_tokens=int(answer_counts(x.batch, POLICY).sum()) if policy else 0,
                               normaliser=float(x.num_policy_tokens)))
        return out


def test_student_fraction_one_trains_only_on_sampled_answers(models: Models, tmp_path: Path) -> None:
    spy = SpyGKD()
    _, result = _train(models, tmp_path, spy, dict(GKD_PARAMS, lam=1.0, student_fraction=1.0), max_steps=4)
    assert len(spy.calls) == 4
    for call in spy.calls:
        assert call["on_policy"] and call["prefixes"] == [POLICY]  # the gold sequences are never run
        assert call["policy_labels"] is not None
        assert not torch.equal(call["policy_labels"], call["gold_labels"])
    assert result.cost["rollout_samples"] == 16 and result.cost["rollout_tokens"] > 0
    assert result.cost["teacher_tokens"] > 0 and result.cost["student_seconds"] > 0


def test_empty_samples_are_counted_not_trained_on(models: Models, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import kdlab.training

    real = kdlab.training.sample_continuations
    eos = models.tokenizer.eos_token_id

    def half_empty(*args: Any, **kwargs: Any) -> list[list[int]]:
        answers = real(*args, **kwargs)
        return [[eos] if i % 2 else a for i, a in enumerate(answers)]  # every second sample is EOS alone

    monkeypatch.setattr(kdlab.training, "sample_continuations", half_empty)
    spy = SpyGKD()
    _, result = _train(models, tmp_path, spy, dict(GKD_PARAMS, lam=1.0, student_fraction=1.0), max_steps=2)
    assert result.cost["rollout_samples"] == 8 and result.cost["empty_rollouts"] == 4
    for call in spy.calls:
        assert call["policy_labels"].shape[0] == 2  # two of each batch's four samples are trained on

    # Every sample empty: the step trains nothing (λ = 1), the weights stay where they were.
    monkeypatch.setattr(kdlab.training, "sample_continuations", lambda *a, **k: [[eos]] * len(a[1]))
    student, result = _train(models, tmp_path / "empty", METHODS["gkd"],
                             dict(GKD_PARAMS, lam=1.0, student_fraction=1.0), max_steps=2)
    assert result.cost["empty_rollouts"] == 8
    assert _same_weights(student, models.student)


def test_packed_batches_train_as_padded_ones(models: Models, tmp_path: Path) -> None:
    """`training.packing`: the samples (drawn from left-padded prompts either way) are packed like the gold
    rows, and the run ends where the padded one does."""
    params = dict(GKD_PARAMS, lam=0.5, student_fraction=1.0, divergence="jsd")
    padded, padded_result = _train(models, tmp_path / "padded", METHODS["gkd"], params)
    packed, packed_result = _train(models, tmp_path / "packed", METHODS["gkd"], params, packing=True)
    assert packed_result.cost["rollout_tokens"] == padded_result.cost["rollout_tokens"] > 0
    losses_of = [[e["loss"] for e in r.log_history if "loss" in e] for r in (padded_result, packed_result)]
    assert losses_of[0] == pytest.approx(losses_of[1], rel=1e-5)
    for a, b in zip(padded.state_dict().values(), packed.state_dict().values(), strict=True):
        # Adam turns float-rounding differences of near-zero gradients into steps of up to ~lr/100.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not _same_weights(padded, models.student)


def test_on_policy_under_fsdp_is_refused(models: Models, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FSDP"):
        _train(models, tmp_path, METHODS["opd"], OPD_PARAMS, fsdp="full_shard")


def test_sampled_tokens_normalise_over_the_global_batch(models: Models, tmp_path: Path) -> None:
    """With gradient accumulation the KD term on samples is divided by the sampled answer tokens of the
    whole optimizer step (both micro-batches), not of one micro-batch nor by the gold tokens."""
    spy = SpyGKD()
    _train(models, tmp_path, spy, dict(GKD_PARAMS, lam=1.0, student_fraction=1.0), max_steps=2,
           batch_size=2, gradient_accumulation_steps=2)
    assert len(spy.calls) == 4
    for first, second in (spy.calls[0:2], spy.calls[2:4]):
        total = first["policy_tokens"] + second["policy_tokens"]
        assert first["normaliser"] == second["normaliser"] == total
        assert first["policy_tokens"] != total


def test_student_fraction_half_follows_the_seeded_coin(models: Models, tmp_path: Path) -> None:
    spy = SpyGKD()
    _train(models, tmp_path, spy, dict(GKD_PARAMS, student_fraction=0.5), max_steps=8, seed=11)
    share = sum(seeding.on_policy_step(11, step, 0.25) for step in range(2000)) / 2000
    assert share == pytest.approx(0.25, abs=0.03)
    expected = [seeding.on_policy_step(11, step, 0.5) for step in range(8)]
    assert [c["on_policy"] for c in spy.calls] == expected
    assert 0 < sum(expected) < 8  # both kinds of step occur
    for call in spy.calls:
        assert (POLICY in call["prefixes"]) == call["on_policy"]


def test_no_gradient_reaches_the_teacher_or_the_sampling_pass(models: Models, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = copy.deepcopy(models.teacher).requires_grad_(True)  # trainable-looking, on purpose
    before = copy.deepcopy(teacher.state_dict())
    seen: list[tuple[bool, bool]] = []
    real_generate = type(models.student).generate

    def spying_generate(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), self.training))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(models.student), "generate", spying_generate)
    spy = SpyGKD()
    on_policy = dict(GKD_PARAMS, student_fraction=1.0, divergence="reverse_kl")
    for name, method, params in (("gkd", spy, on_policy), ("opd", METHODS["opd"], OPD_PARAMS)):
        _train(models, tmp_path / name, method, params, teacher=teacher)
    assert seen and all(not grad and not training for grad, training in seen)  # no grad, dropout off
    assert spy.teacher_graphs and not any(spy.teacher_graphs)  # the teacher's pass builds no graph
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- reproducibility of rollouts


def test_sampling_is_seeded_and_leaves_the_callers_random_state(models: Models) -> None:
    from kdlab.evaluation import sample_continuations

    seeds = {seeding.rollout_seed(s, step, mb, rank) for s in (1, 2) for step in (0, 1) for mb in (0, 1)
             for rank in (0, 1)}
    assert len(seeds) == 16  # run seed, step, micro-batch and rank each change the draw
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    tok = models.tokenizer

    def sample(seed: int) -> list[list[int]]:
        return sample_continuations(models.student, prompts, temperature=1.0, max_new_tokens=6,
                                    pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=seed)

    state = torch.get_rng_state()
    first = sample(5)
    assert torch.equal(torch.get_rng_state(), state)  # dropout and data order draws are not disturbed
    assert sample(5) == first and sample(6) != first
    assert all(0 < len(a) <= 6 for a in first)



SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, random
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from kdlab.config import TrainingSettings
    from kdlab.methods import METHODS
    from kdlab.models import derive_student
    from kdlab.tasks.base import Encoded
    from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer
    import kdlab.training as training

    out, seed, kill_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tok = build_tiny_tokenizer()
    teacher = build_tiny_llama(tok, num_layers=4, seed=0).eval()
    student = derive_student(teacher, [0, 3])
    rng = random.Random(0)
    items = []
    for i in range(12):
        p = [1] + [rng.randrange(4, len(tok)) for _ in range(rng.randrange(4, 12))]
        a = [rng.randrange(4, len(tok)) for _ in range(3)] + [2]
        items.append(training.TrainItem(gold=Encoded(f"ex{i}", p + a, [-100] * len(p) + a)))
    if kill_at:  # killed after step kill_at logged its samples, before its checkpoint is written
        real = training.KDTrainer._save_checkpoint
        def killing(self, *args, **kwargs):
            if self.state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)
        training.KDTrainer._save_checkpoint = killing
    settings = TrainingSettings(learning_rate=5e-3, batch_size=4, max_steps=5, warmup_ratio=0.0,
                                logging_steps=1, lr_scheduler="constant", save_steps=1)
    params = dict(lam=0.5, temperature=1.0, divergence="reverse_kl", jsd_beta=0.5, student_fraction=0.6,
                  seq_kd=False, sample_temperature=1.0, max_new_tokens=5)
    trainer_dir = out / "trainer"
    last = training.last_checkpoint(trainer_dir, "h")
    training.train(student, items, method=METHODS["gkd"], params=params, settings=settings,
                   output_dir=trainer_dir, seed=seed, pad_id=tok.pad_token_id, vocab_size=len(tok),
                   live_teacher=teacher, tokenizer=tok, rollouts_file=out / "rollouts.jsonl",
                   resume_from_checkpoint=last)
    save_file({k: v.contiguous() for k, v in student.named_parameters()}, out / "student.safetensors")
    """
)


def _script_run(tmp: Path, out: Path, seed: int, kill_at: int = 0) -> int:
    script = tmp / "rollout_run.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(out), str(seed), str(kill_at)],
                          env=dict(os.environ), capture_output=True, timeout=600).returncode


def test_rollouts_are_reproducible_across_processes_and_a_kill(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run in three fresh processes (one uninterrupted; one SIGKILLed after step 4 logged its
    samples but before checkpoint-4, and resumed from checkpoint-3 by another, which redoes step 4) draws the
    same samples, records each once, and ends with the same weights; another seed draws other samples."""
    import runpy

    from safetensors.torch import load_file

    a, killed, other = (tmp_path / n for n in ("a", "killed", "other"))
    assert _script_run(tmp_path, a, seed=3) == 0
    assert _script_run(tmp_path, killed, seed=3, kill_at=4) == -signal.SIGKILL
    trainer = killed / "trainer"
    assert (trainer / "checkpoint-3").is_dir() and not (trainer / "checkpoint-4").exists()
    assert '"step": 4' in (killed / "rollouts.jsonl").read_text()  # step 4's samples were logged
    assert _script_run(tmp_path, killed, seed=3) == 0  # resumed from checkpoint-3
    monkeypatch.setattr(sys, "argv", ["rollout_run.py", str(other), "4", "0"])
    runpy.run_path(str(tmp_path / "rollout_run.py"), run_name="__main__")

    def rollouts(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "rollouts.jsonl").read_text().splitlines()]

    reference = rollouts(a)
    steps = {r["step"] for r in reference}
    assert min(steps) <= 3 and 4 in steps  # on-policy steps before the kill and at the redone step
    assert rollouts(killed) == reference  # the resumed steps drew the same samples, recorded once
    weights = load_file(a / "student.safetensors")
    resumed = load_file(killed / "student.safetensors")
    assert all(torch.equal(v, resumed[k]) for k, v in weights.items())
    assert [r["answer"] for r in rollouts(other)] != [r["answer"] for r in reference]


# --------------------------------------------------------------------------- behaviour


class PreferringTeacher(nn.Module):
    """A teacher that strongly prefers one token at every position (its logits + a large bias there)."""

    def __init__(self, base: nn.Module, token: int, bias: float = 12.0) -> None:
        super().__init__()
        self.base, self.token, self.bias = base, token, bias

    def forward(self, **kwargs: Any) -> Any:
        out = self.base(**kwargs)
        out.logits[..., self.token] += self.bias
        return out


def _mean_logprob_on_own_samples(student: nn.Module, models: Models, token: int) -> float:
    """The student's mean log-probability of `token` at every position of answers it samples itself."""
    from kdlab.evaluation import sample_continuations
    from kdlab.scored import forward_scored
    from kdlab.tasks.base import collate
    from kdlab.training import prompt_ids

    tok = models.tokenizer
    gold = collate([it.gold for it in models.items], tok.pad_token_id, padding_side="left")
    prompts = prompt_ids(gold)
    answers = sample_continuations(student, prompts, temperature=1.0, max_new_tokens=5,
                                   pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=123)
    seqs = [Encoded(str(i), p + a, [-100] * len(p) + a)
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True)) if a]
    batch = collate(seqs, tok.pad_token_id, padding_side="left")
    with torch.no_grad():
        scored = forward_scored(student.eval(), batch, vocab_size=models.vocab)
    return float(torch.log_softmax(scored.logits.float(), -1)[:, token].mean())


def test_on_policy_training_moves_the_student_toward_the_teachers_choice(models: Models,
                                                                          tmp_path: Path) -> None:
    """The teacher is the student itself plus a strong preference for one token: on-policy reverse KL raises
    the student's log-probability of that token at the positions of its own samples (≈ -6.2 before)."""
    token = 100
    base = build_tiny_llama(models.tokenizer, num_layers=4, seed=0).eval()  # not peaked: a smooth student
    student = derive_student(base, [0, 3])
    teacher = PreferringTeacher(copy.deepcopy(student), token, bias=5.0).eval()
    local = copy.copy(models)
    local.student = student
    params = dict(GKD_PARAMS, lam=1.0, temperature=1.0, divergence="reverse_kl", student_fraction=1.0)
    before = _mean_logprob_on_own_samples(copy.deepcopy(student), local, token)
    trained, _ = _train(local, tmp_path, METHODS["gkd"], params, teacher=teacher, max_steps=12,
                        learning_rate=1e-2)
    after = _mean_logprob_on_own_samples(trained, local, token)
    assert after > before + 2.0, (before, after)


# --------------------------------------------------------------------------- config and study


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"student_fraction": [0.5, 1.5]}, "student_fraction"),
     ({"sample_temperature": 0}, "sample_temperature"), ({"divergence": "kl"}, "divergence")],
)
def test_bad_on_policy_settings_are_refused_naming_the_field(settings: dict, field: str) -> None:
    data = yaml.safe_load(preset_text("smoke"))
    data["methods"] = {"sft": {}, "gkd": settings}
    with pytest.raises(ConfigError, match=rf"methods\.gkd.*{field}"):
        resolve_config(parse_config(data))
    data["methods"] = {"sft": {}, "opd": {"discount": 2.0}}
    with pytest.raises(ConfigError, match=r"methods\.opd.*discount"):
        resolve_config(parse_config(data))


def test_refused_on_policy_config_writes_nothing(tmp_path: Path, tiny_data_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli import main

    data = yaml.safe_load(preset_text("smoke"))
    data["methods"] = {"sft": {}, "gkd": {"max_new_tokens": 0}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--data-dir", str(tiny_data_dir)]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    assert not out.exists()


def test_study_with_cached_kd1_and_live_gkd(tmp_path: Path, tiny_data_dir: Path) -> None:
    """One study, three methods: the cache is built for kd1 alone (its top-k, no answers), gkd trains against
    the live teacher on its own samples, and the report compares all three with SFT."""
    import pandas as pd

    from kdlab.cli import main
    from kdlab.registry import Registry

    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 8},
                       "gkd": {"lambda": 0.5, "max_new_tokens": 4}}
    data["seeds"] = [1]
    out = tmp_path / "out"
    data["output_dir"] = str(out)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 0

    manifest = json.loads((out / "teacher_cache" / "sst2" / "manifest.json").read_text())
    inputs = manifest["fingerprint_inputs"]
    assert manifest["fields"] == ["topk"]  # kd1's top-k alone: nothing of gkd is cached
    assert inputs["top_k"] == 8 and inputs["temperatures"] == [2.0] and inputs["answers"] is None
    registry = Registry(out / "registry.sqlite")
    gkd = registry.get("gkd-sst2-s1-lam0.5-seed1")
    assert gkd is not None and gkd.status == "done"
    assert gkd.metrics["rollout_samples"] > 0 and gkd.metrics["teacher_tokens"] > 0
    assert registry.get("kd1-sst2-s1-lam0.5-seed1").metrics["rollout_samples"] == 0
    assert (out / "runs" / gkd.id / "rollouts.jsonl").read_text().strip()
    results = pd.read_csv(out / "results.csv")
    assert {"sft", "kd1", "gkd"} <= set(results["method"])
    for column in ("rollout_seconds", "teacher_seconds", "student_seconds"):
        assert column in results.columns
    summary = (out / "summary.md").read_text()
    assert "gkd" in summary and "kd1" in summary


def test_a_method_can_run_on_some_tasks_only(tmp_path: Path, tiny_data_dir: Path) -> None:
    """`methods.<name>.tasks` (the demo runs gkd on SQuAD alone): no run of it is planned on other tasks, its
    runs' params and hashes do not carry the list, and an unknown task is refused naming the field."""
    from kdlab.layout import Layout
    from kdlab.plan import build_plan

    data = yaml.safe_load(preset_text("smoke"))
    data["methods"] = {"sft": {}, "gkd": {"lambda": 0.5, "tasks": ["squad"]}}
    config = resolve_config(parse_config(data))
    plan = build_plan(config, Layout(tmp_path), lambda student, layer_map, method: [])
    groups = {(g.task, g.method) for g in plan.groups}
    assert ("squad", "gkd") in groups and ("sst2", "gkd") not in groups and ("sst2", "sft") in groups
    gkd = next(g for g in plan.groups if g.method == "gkd")
    assert "tasks" not in gkd.grid[0].spec.params
    data["methods"]["gkd"]["tasks"] = ["squad", "mnli"]
    with pytest.raises(ConfigError, match=r"methods\.gkd\.tasks: 'mnli'"):
        resolve_config(parse_config(data))
