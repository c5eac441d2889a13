"""Shared pieces of the bench scripts: the machine line, SST-2-like batches, teacher/student pairs, verdicts.

Not a test module: each script prints figures against an issue's target.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab import losses
from kdlab.config import TrainingSettings
from kdlab.methods import get_method
from kdlab.models import (
    SMOLLM2_ALIAS,
    derive_student,
    evenly_spaced_layers,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from kdlab.tasks import SST2Settings, SST2Task
from kdlab.tasks.base import Encoded, Example, encode
from kdlab.teacher_cache import TeacherCache
from kdlab.tiny import write_tiny_llama
from kdlab.training import KDTrainer, StudentModule, TrainCollator, TrainItem, training_arguments

_TEXT = ("the film is a charming and often affecting journey with fine performances and a moving story "
          "but the plot is dull the acting is worse and the jokes fall flat in a boring terrible mess "
          "great fun best worst love hate funny sad happy old new first last")
_WORDS = _TEXT.split()


def machine_line(device: str = "cpu") -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}, "
            f"load average {load[0]:.2f} (other processes share the CPUs when it exceeds what this uses)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="torch device the models run on: cpu (default), cuda, cuda:1, mps")


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the time the work took rather than its launch."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def sst2_like_example(i: int, *, words: int = 30) -> Example:
    """Review number `i` (the same every time): SST-2 style, `words` words, about 40 prompt tokens with the
    SmolLM2 tokenizer at 30 words."""
    rng = random.Random(i)
    return Example(id=f"train-{i}", fields={"sentence": " ".join(rng.choice(_WORDS) for _ in range(words))},
                   label=i % 2)


def sst2_like_examples(n: int, *, words: int = 30) -> list[Example]:
    return [sst2_like_example(i, words=words) for i in range(n)]


def encode_sst2(examples: list[Example], tokenizer: PreTrainedTokenizerBase, *,
                max_length: int = 128) -> tuple[SST2Task, dict[str, Encoded]]:
    """Gold training encodings, built as the study builds them (training prompts, label word + eos)."""
    task = SST2Task(SST2Settings(max_length=max_length))
    pairs, _ = task.build_prompts(examples, tokenizer, training=True)
    encoded = {ex.id: enc for ex, p in pairs if (enc := encode(task, ex, p, tokenizer)) is not None}
    return task, encoded


def teacher_and_student(tiny: bool, student_layers: int, workdir: Path) -> tuple[
        PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase, list[int]]:
    """The teacher (SmolLM2-135M-Instruct, or a 6-layer tiny Llama) and a student derived from
    `student_layers` evenly spaced teacher blocks, as the study derives it."""
    path = str(write_tiny_llama(workdir / "tiny", num_layers=6)) if tiny else \
        resolve_model_path(SMOLLM2_ALIAS)
    tokenizer = load_tokenizer(path)
    teacher = load_model(path)
    layers = evenly_spaced_layers(teacher.config.num_hidden_layers, student_layers)
    return teacher, derive_student(teacher, layers), tokenizer, layers


# ---------------------------------------------------------------------------------------------------------
# one training step, as the Trainer takes it

PARAMS = {
    "sft": {},
    "kd1": {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "top_k": 32},
    "kd3": {"lam": 0.5, "loss": "mse", "layer_map": "uniform"},
    # On-policy: every step samples the student's own answers (16 tokens at most) for the live teacher.
    "gkd": {"lam": 0.5, "temperature": 1.0, "divergence": "reverse_kl", "jsd_beta": 0.5,
            "student_fraction": 1.0, "seq_kd": False, "sample_temperature": 1.0, "max_new_tokens": 16},
    "opd": {"lam": 0.5, "discount": 0.0, "sample_temperature": 1.0, "max_new_tokens": 16},
}


@dataclass
class StepRunner:
    trainer: KDTrainer
    module: StudentModule
    optimizer: torch.optim.Optimizer
    max_grad_norm: float
    device: str = "cpu"

    def step(self, items: Sequence[TrainItem]) -> float:
        """Collate (cache reads included, as in the DataLoader), `KDTrainer.training_step` (forward_scored,
        the method's loss, backward), clip, AdamW step; returns seconds (GPU work waited for)."""
        synchronize(self.device)
        begin = time.perf_counter()
        batch = self.trainer.data_collator(list(items))
        num_items = (batch["labels"][..., 1:] != -100).sum()
        if self.trainer.rollout is not None:  # on-policy: the student samples this step's answers first
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self.trainer.prepare_rollouts([batch], self.device)
        self.trainer.training_step(self.module, batch, num_items_in_batch=num_items)
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - begin


def step_runner(method_name: str, student: nn.Module, *, pad_id: int, vocab_size: int,
                cache: TeacherCache | None, pairs: Sequence[tuple[int, int]], teacher_width: int,
                workdir: Path, params: dict[str, Any] | None = None, device: str = "cpu",
                settings: TrainingSettings | None = None,
                live_teacher: nn.Module | None = None, tokenizer: Any = None) -> StepRunner:
    """A KDTrainer for `method_name` on `student` (KD3 gets its learned projections), with its optimizer.

    `student` (and `live_teacher`) must already be on `device`; `settings` default to the study's (AdamW,
    lr 2e-4, max_grad_norm 1.0, fp32); give `TrainingSettings(bf16=True, packing=True, ...)` to time those.
    """
    method = get_method(method_name)
    params = params if params is not None else PARAMS[method_name]
    signals = method.signals(params)
    use_pairs = list(pairs) if signals.layer_map is not None else []
    projections = (losses.make_projections(use_pairs, student.config.hidden_size, teacher_width).to(device)
                   if use_pairs else None)
    module = StudentModule(student, projections)
    settings = settings or TrainingSettings()
    collator = TrainCollator(pad_id, signals=signals, cache=cache if live_teacher is None else None,
                             teacher_layers=[t for _, t in use_pairs], packing=settings.packing,
                             keep_ids=method.rollout(params) is not None)
    args = training_arguments(settings, workdir / method_name, 0, use_cpu=torch.device(device).type == "cpu")
    trainer = KDTrainer(model=module, args=args, train_dataset=[], data_collator=collator, method=method,
                        params=params, vocab_size=vocab_size,
                        layer_pairs=use_pairs, live_teacher=live_teacher, tokenizer=tokenizer)
    return StepRunner(trainer, module, trainer.create_optimizer(module), settings.max_grad_norm, device)
