"""kdlab's paths on a CUDA device, compared with the same computation on the CPU: the losses, forward_scored
(padded and packed), one training step through `train()`, a teacher cache built on the GPU, greedy
generation. Skipped without CUDA (`pytest -m cuda` selects them on a GPU machine).

fp32 throughout with TF32 off, so the devices agree to float rounding; the bf16 test checks that a
mixed-precision run trains on the GPU rather than matching the CPU bit for bit.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab import losses
from kdlab.config import LoraSettings, TrainingSettings
from kdlab.evaluation import GenerationOptions, generate_answers, generation_options
from kdlab.methods import METHODS
from kdlab.models import add_lora
from kdlab.scored import forward_scored, pack
from kdlab.stages.cache import build_teacher_cache
from kdlab.tasks import SST2Task
from kdlab.tasks.base import Encoded, Example, collate
from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainItem, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_matmuls() -> Iterator[None]:
    """TF32 would round matmul inputs to 10 mantissa bits on the GPU: off, so fp32 means fp32 on both."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class Models:
    def __init__(self) -> None:
        self.tokenizer = build_tiny_tokenizer()
        self.vocab = len(self.tokenizer)
        self.teacher = build_tiny_llama(self.tokenizer, num_layers=4, seed=0).eval()
        with torch.no_grad():  # peaked: top-k order and greedy tokens are not decided by rounding
            self.teacher.model.norm.weight.mul_(8.0)
        self.student = build_tiny_llama(self.tokenizer, num_layers=2, seed=1)
        rng = random.Random(0)
        self.encoded = []
        for i, (p, a) in enumerate([(5, 1), (12, 4), (8, 7), (20, 2), (9, 3), (15, 5)]):
            prompt = [1] + [rng.randrange(4, self.vocab) for _ in range(p - 1)]
            answer = [rng.randrange(4, self.vocab) for _ in range(a - 1)] + [2]
            self.encoded.append(Encoded(f"ex{i}", prompt + answer, [-100] * p + answer))


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


def _on(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.parametrize("vocab", [512, 32000])
def test_losses_match_cpu(vocab: int) -> None:
    torch.manual_seed(0)
    n, k = 40, 32
    student = torch.randn(n, vocab) * 3
    teacher = torch.randn(n, vocab) * 3
    targets = torch.randint(0, vocab, (n,))
    logp = torch.log_softmax(teacher, -1)
    top = logp.topk(k, -1)
    tail = torch.logsumexp((logp / 2.0).scatter(1, top.indices, float("-inf")), -1)
    hs = [torch.randn(n, 64) for _ in range(3)]
    ht = [torch.randn(n, 96) for _ in range(3)]
    projections = losses.make_projections([(1, 1), (2, 2), (3, 3)], 64, 96)

    def compute(device: str) -> list[torch.Tensor]:
        out = []
        for div in losses.DIVERGENCES:
            out.append(losses.kd_divergence_full(student.to(device), teacher.to(device), temperature=2.0,
                                                 divergence=div, num_tokens=n))
            out.append(losses.kd_divergence_topk(student.to(device), top.indices.to(device),
                                                 top.values.to(device), tail_lse=tail.to(device),
                                                 temperature=2.0, divergence=div, num_tokens=n))
        out.append(losses.cross_entropy_tokens(student.to(device), targets.to(device), num_tokens=n))
        out.append(losses.feature_loss([h.to(device) for h in hs], [h.to(device) for h in ht],
                                       copy.deepcopy(projections).to(device), num_tokens=n))
        return [x.detach().cpu() for x in out]

    for a, b in zip(compute("cpu"), compute(CUDA), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_forward_scored_matches_cpu_padded_and_packed(models: Models) -> None:
    cpu_model, gpu_model = models.student, copy.deepcopy(models.student).to(CUDA)
    for batch in (collate(models.encoded, 0, padding_side="left"), pack(models.encoded)):
        batch.pop("example_ids")
        with torch.no_grad():
            a = forward_scored(cpu_model.eval(), batch, hidden_layers=[1, 2], vocab_size=models.vocab)
            b = forward_scored(gpu_model.eval(), _on(batch, CUDA), hidden_layers=[1, 2],
                               vocab_size=models.vocab)
        assert torch.equal(a.targets, b.targets.cpu()) and torch.equal(a.counts, b.counts.cpu())
        torch.testing.assert_close(b.logits.cpu(), a.logits, rtol=1e-4, atol=1e-4)
        for layer in (1, 2):
            torch.testing.assert_close(b.hidden[layer].cpu(), a.hidden[layer], rtol=1e-4, atol=1e-4)


def _one_step(models: Models, device: str, method: str, params: dict[str, Any], tmp: Path,
              **kwargs: Any) -> tuple[torch.nn.Module, dict[str, float]]:
    student = copy.deepcopy(models.student).to(device)
    teacher = kwargs.pop("live_teacher", None)
    settings = TrainingSettings(learning_rate=0.05, batch_size=6, max_steps=1, warmup_ratio=0.0,
                                logging_steps=1, lr_scheduler="constant", optim="sgd", **kwargs)
    result = train(student, [TrainItem(gold=e) for e in models.encoded], method=METHODS[method],
                   params=params, settings=settings, output_dir=tmp / f"{method}-{device}", seed=3, pad_id=0,
                   vocab_size=models.vocab, live_teacher=None if teacher is None else teacher.to(device))
    logged = next(e for e in result.log_history if "loss" in e)
    return student.cpu(), logged


@pytest.mark.parametrize("packing", [False, True])
def test_training_step_matches_cpu(models: Models, tmp_path: Path, packing: bool) -> None:
    """One SGD step of SFT and of KD1 against a live teacher, on each device: same logged losses, same
    weights after the step (SGD: a step proportional to the gradient, so weights compare gradients)."""
    kd1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 8}
    for method, params, extra in (("sft", {}, {}), ("kd1", kd1, {"live_teacher": models.teacher})):
        cpu, a = _one_step(models, "cpu", method, params, tmp_path, packing=packing, **extra)
        gpu, b = _one_step(models, CUDA, method, params, tmp_path, packing=packing,
                           **{k: copy.deepcopy(v) for k, v in extra.items()})
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (method, key, a, b)
        for (name, wa), (_, wb) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
            torch.testing.assert_close(wb, wa, rtol=1e-4, atol=1e-6, msg=f"{method}: {name}")


def test_teacher_cache_built_on_gpu_matches_cpu(models: Models, tmp_path: Path) -> None:
    examples = [Example(e.id, {"sentence": "x"}) for e in models.encoded]
    caches = {}
    for i, device in enumerate(("cpu", CUDA)):
        caches[i] = build_teacher_cache(
            tmp_path / f"cache{i}", task=SST2Task(), teacher=copy.deepcopy(models.teacher).to(device),
            tokenizer=models.tokenizer, examples=examples, encoded={e.id: e for e in models.encoded},
            fingerprint_inputs={"test": "cuda"}, top_k=16, hidden_layers=[2, 4], answers=False, batch_size=4,
            temperatures=[2.0],
        )
    ids = [e.id for e in reversed(models.encoded)]
    idx_a, lp_a, tail_a = caches[0].batch_topk_tail(ids, 2.0)
    idx_b, lp_b, tail_b = caches[1].batch_topk_tail(ids, 2.0)
    # The top entries agree; the last of the 16 may swap with the 17th on a rounding-level tie.
    assert torch.equal(torch.as_tensor(idx_a)[:, :8], torch.as_tensor(idx_b)[:, :8])
    torch.testing.assert_close(torch.as_tensor(lp_b).float()[:, :8], torch.as_tensor(lp_a).float()[:, :8],
                               rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.as_tensor(tail_b), torch.as_tensor(tail_a), rtol=1e-3, atol=1e-3)
    hidden_a, hidden_b = caches[0].batch_hidden(ids), caches[1].batch_hidden(ids)
    for layer in (2, 4):
        a, b = (torch.as_tensor(h[layer]).float() for h in (hidden_a, hidden_b))
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_greedy_generation_matches_cpu(models: Models) -> None:
    """The same answers on both devices, and with a static KV cache on the GPU (`evaluation.static_cache`)."""
    prompts = [e.input_ids[: e.labels.count(-100)] for e in models.encoded]
    kw: dict[str, Any] = dict(max_new_tokens=8, batch_size=4)
    cpu = generate_answers(models.teacher, models.tokenizer, prompts, **kw)
    gpu_model = copy.deepcopy(models.teacher).to(CUDA)
    gpu = generate_answers(gpu_model, models.tokenizer, prompts, **kw)
    assert gpu == cpu
    with generation_options(GenerationOptions(static_cache=True)):
        static = generate_answers(gpu_model, models.tokenizer, prompts, **kw)
    assert static == cpu


def test_bf16_lora_run_trains_on_gpu(models: Models, tmp_path: Path) -> None:
    """A bf16 base with fp32 adapters under bf16 autocast on the GPU: finite losses that move, adapters
    updated and still fp32, the base bf16 and untouched."""
    student = add_lora(copy.deepcopy(models.student).to(CUDA, torch.bfloat16),
                       LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    settings = TrainingSettings(learning_rate=2e-2, batch_size=3, max_steps=4, warmup_ratio=0.0,
                                logging_steps=1, lr_scheduler="constant", bf16=True)
    result = train(student, [TrainItem(gold=e) for e in models.encoded], method=METHODS["sft"], params={},
                   settings=settings, output_dir=tmp_path, seed=1, pad_id=0, vocab_size=models.vocab)
    logged = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged))) and len(set(logged)) > 1
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters() if p.requires_grad)
