"""Seeds and determinism: the one place that says which seed each stage of a study draws from.

A study's numbers must follow from its config alone, in any process. Every stage that draws random numbers
seeds every generator (Python, NumPy, torch on every device) right before it draws, from `stage_seed`:

    data subsets (train / selection / transfer / eval)   data_seed
    teacher adaptation (LoRA init, data order, dropout)  seeds[0]
    derived students' construction                       seeds[0]
    student runs (LoRA init, KD3 projections, order)     the run's own seed
    on-policy rollouts (which steps, the samples)        the run's seed, optimizer step, micro-batch, rank
    bootstrap resampling in the report                   seeds[0]

The seeds used are recorded in the registry (each run's `seed`) and in `provenance.json` (the report lists
them). `deterministic: true` additionally asks for deterministic GPU kernels (`configure_determinism`).
"""

from __future__ import annotations

import hashlib
import os
import random

import torch
from transformers import set_seed

STUDY_STAGES = ("teacher", "student-init", "bootstrap")


def stage_seed(seeds: list[int], data_seed: int, stage: str, run_seed: int | None = None) -> int:
    """The seed a stage draws from (see the module docstring); `run_seed` is a student run's own seed."""
    if stage == "data":
        return data_seed
    if stage == "student":
        if run_seed is None:
            raise ValueError("a student run's seed is its own: pass run_seed")
        return run_seed
    if stage in STUDY_STAGES:
        return seeds[0]
    raise ValueError(f"unknown stage {stage!r}; expected data, student or one of {STUDY_STAGES}")


def _mix(*parts: int) -> int:
    # A stable 63-bit hash of integers (Python's hash() of tuples is stable too, but not documented as such).
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rollout_seed(run_seed: int, step: int, micro_batch: int, rank: int = 0) -> int:
    """The seed of the student's samples for one micro-batch of one optimizer step: a run redone, resumed
    after a kill or run in another process draws the same samples; another seed draws others."""
    return _mix(run_seed, step, micro_batch, rank)


def on_policy_step(run_seed: int, step: int, student_fraction: float) -> bool:
    """Whether the student samples this optimizer step's answers (probability `student_fraction`), decided
    from the run's seed and the step alone, so every rank and a resumed run agree."""
    if student_fraction >= 1.0:
        return True
    if student_fraction <= 0.0:
        return False
    return random.Random(_mix(run_seed, step, -1)).random() < student_fraction


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and every CUDA device) before a stage draws."""
    set_seed(seed)


def configure_determinism(enabled: bool) -> None:
    """Deterministic kernels for GPU runs (CPU kernels used here are deterministic already).

    cuBLAS needs a fixed workspace to be reproducible, so CUBLAS_WORKSPACE_CONFIG must be set before the first
    cuBLAS call; the memory-efficient and flash SDPA backwards accumulate with atomics, so attention
    falls back to the math kernel. `warn_only=False`: an op without a deterministic kernel fails loudly
    instead of silently breaking the promise.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if torch.cuda.is_available():
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
