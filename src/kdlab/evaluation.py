"""Batched inference for both task kinds: scoring each label's continuation (one forward pass per batch with
the logits at the last position when every label is one token) and greedy generation with the KV cache.
Batches are grouped by prompt length so little compute goes to padding. `evaluate_splits` evaluates a model
on a task's splits and writes its prediction files.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from kdlab.scored import forward_scored, position_ids_for
from kdlab.tasks.base import IGNORE_INDEX, Encoded, Example, Task, collate, collate_prompts, encode_prompts

log = logging.getLogger("kdlab")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # prompts truncated / skipped to fit max_length
    seconds: float = 0.0


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A progress bar over `iterable`, shown while kdlab's status messages are (not under `kdlab -q`)."""
    return tqdm(iterable, disable=not log.isEnabledFor(logging.INFO), **kwargs)


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_choices(
    model: nn.Module, prompt_ids: Sequence[list[int]], choices: Sequence[Sequence[int]], *, pad_id: int,
    batch_size: int, desc: str = "scoring",
) -> list[int]:
    """Index of the choice (a label's continuation, as tokens) with the highest summed log-probability after
    each prompt; ties go to the first."""
    if all(len(c) == 1 for c in choices):
        return _score_first_tokens(model, prompt_ids, [c[0] for c in choices], pad_id=pad_id,
                                   batch_size=batch_size, desc=desc)
    device = _device(model)
    out: list[int] = [0] * len(prompt_ids)
    # Every prompt is run once per choice: about `batch_size` sequences per forward pass.
    per_batch = max(1, batch_size // len(choices))
    for rows in progress(_length_batches([len(p) for p in prompt_ids], per_batch), desc=desc, leave=False):
        sequences = [
            Encoded(f"{i}:{c}", [*prompt_ids[i], *choice], [IGNORE_INDEX] * len(prompt_ids[i]) + list(choice))
            for i in rows
            for c, choice in enumerate(choices)
        ]
        batch = collate(sequences, pad_id, padding_side="left")
        tensors = {k: v.to(device) for k, v in batch.items() if k != "example_ids"}
        scored = forward_scored(model, tensors)
        logp = scored.logits.float().log_softmax(-1).gather(1, scored.targets[:, None]).squeeze(1)
        sums = torch.stack([part.sum() for part in logp.split(scored.counts.tolist())])
        best = sums.view(len(rows), len(choices)).argmax(-1).tolist()
        for i, b in zip(rows, best, strict=True):
            out[i] = int(b)
    return out


def _score_first_tokens(
    model: nn.Module, prompt_ids: Sequence[list[int]], label_ids: Sequence[int], *, pad_id: int,
    batch_size: int, desc: str,
) -> list[int]:
    """`score_choices` when every choice is one token: one forward pass per batch, the last position only."""
    device = _device(model)
    choices = torch.tensor(list(label_ids), device=device)
    out: list[int] = [0] * len(prompt_ids)
    for rows in progress(_length_batches([len(p) for p in prompt_ids], batch_size), desc=desc, leave=False):
        batch = collate_prompts([prompt_ids[i] for i in rows], pad_id)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                       position_ids=position_ids_for(mask), logits_to_keep=1, use_cache=False).logits[:, -1]
        best = logits.float().log_softmax(-1)[:, choices].argmax(-1).tolist()
        for i, b in zip(rows, best, strict=True):
            out[i] = int(b)
    return out


def first_answer_line(text: str) -> str:
    """The answer in a generated continuation: its first line that holds non-space text, stripped.

    Models often open an answer with a newline (``"Answer:\\n Paris"``); taking the literal first line would
    turn such an answer into "" and score (or teach, for KD2) an empty answer by accident.
    """
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


class _AnswerLineEnded(StoppingCriteria):
    """Stops a row once its continuation holds non-space text followed by a newline (not at a leading one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        done = ["\n" in text.lstrip() for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate_answers` generates: `backend` hf (transformers' generate, optionally with a static KV
    cache) or vllm (vLLM's offline engine over the weights in `model_path`, which must be the weights of the
    model passed in: a saved folder, not an in-memory model that was trained since)."""

    backend: str = "hf"
    static_cache: bool = False
    model_path: str | None = None
    dtype: str = "bfloat16"


_GENERATION: contextvars.ContextVar[GenerationOptions | None] = contextvars.ContextVar(
    "kdlab_generation", default=None
)


@contextlib.contextmanager
def generation_options(options: GenerationOptions) -> Iterator[None]:
    """Generation inside the block (tasks call `generate_answers` deep inside `predict`) uses `options`."""
    token = _GENERATION.set(options)
    try:
        yield
    finally:
        _GENERATION.reset(token)


def generation_for(settings: Any, model_path: str | None) -> GenerationOptions:
    """How to generate with a model whose weights are in the folder `model_path`, under the study's
    `evaluation:` settings (None: in memory only, so the hf backend whatever `backend` says: vLLM reads
    weights from disk)."""
    backend = settings.backend if model_path else "hf"
    if backend != settings.backend:
        log.info(f"[generation] {settings.backend} needs the weights on disk; using hf for an in-memory "
                 "model")
    return GenerationOptions(backend=backend, static_cache=settings.static_cache, model_path=model_path,
                             dtype=settings.dtype)


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[list[int]], *,
    max_new_tokens: int, batch_size: int, desc: str = "generating",
) -> list[str]:
    """Greedy answers, stopping at EOS or at a newline after the answer's text (see `first_answer_line`).

    Prompts run longest first in batches of `batch_size` (little padding per batch); the backend and KV cache
    come from the enclosing `generation_options` (default: transformers, dynamic cache).
    """
    options = _GENERATION.get() or GenerationOptions()
    if options.backend == "vllm":
        with off_the_gpu(model):
            return generate_answers_vllm(options, tokenizer, prompt_ids, max_new_tokens=max_new_tokens)
    cache: dict[str, Any] = {"cache_implementation": "static"} if options.static_cache else {}
    device = _device(model)
    pad_id = tokenizer.pad_token_id
    out: list[str] = [""] * len(prompt_ids)
    for rows in progress(_length_batches([len(p) for p in prompt_ids], batch_size), desc=desc, leave=False):
        batch = collate_prompts([prompt_ids[i] for i in rows], pad_id)
        width = batch["input_ids"].shape[1]
        generated = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_AnswerLineEnded(tokenizer, width)]),
            temperature=None, top_p=None, top_k=None, **cache,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            out[i] = first_answer_line(text)
    return out


@contextlib.contextmanager
def off_the_gpu(model: nn.Module) -> Iterator[None]:
    """The HF model's weights leave the GPU while a vLLM engine runs, and come back after: the engine loads
    its own copy of the weights and sizes its KV cache from the memory free when it starts."""
    device = _device(model)
    if device.type != "cuda":
        yield
        return
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


def vllm_memory_fraction(headroom: float = 0.9) -> float:
    """`gpu_memory_utilization` for a vLLM engine: a share of the GPU memory free now. vLLM (>= 0.9) refuses
    to start when that fraction of the whole GPU is more than is free, and its default (0.9) cannot be met
    while anything else (a live teacher, another run's state) holds GPU memory."""
    if not torch.cuda.is_available():
        return headroom
    free, total = torch.cuda.mem_get_info()
    return max(0.01, round(headroom * free / total, 4))


def generate_answers_vllm(
    options: GenerationOptions, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[list[int]], *,
    max_new_tokens: int,
) -> list[str]:
    """`generate_answers` through vLLM's offline API (`vllm.LLM`, greedy `SamplingParams`). The whole answer
    budget is generated (vLLM stops at EOS; a plain "\n" stop string would also stop at a leading newline)
    and `first_answer_line` cuts it as the HF path does. Tested against a stand-in that checks the calls
    against vLLM's documented signatures (tests/vllm_standin.py); no real vLLM has run it yet."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise RuntimeError(
            "evaluation.backend: vllm needs vLLM (pip install vllm, on a CUDA machine); or use backend: hf"
        ) from None
    if options.model_path is None:
        raise ValueError("the vllm backend generates from saved weights: no model folder was given")
    llm = LLM(model=options.model_path, tokenizer=options.model_path, dtype=options.dtype,
              skip_tokenizer_init=False, seed=0, gpu_memory_utilization=vllm_memory_fraction())
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
    del llm  # the engine holds GPU memory the next training run needs
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return [first_answer_line(out.outputs[0].text) for out in outputs]


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompt_ids: Sequence[list[int]], *, temperature: float, max_new_tokens: int,
    pad_id: int, eos_id: int, seed: int,
) -> list[list[int]]:
    """One sampled continuation per prompt (token ids), from the model as it is, with its KV cache: pure
    softmax sampling at `temperature` (no top-k / top-p, whatever the model's generation config says), each
    ending at its first EOS (kept) or after `max_new_tokens`. One left-padded batch; the draw is seeded from
    `seed` inside a forked RNG, so the caller's random state (dropout, data order) is left as it was."""
    device = _device(model)
    batch = collate_prompts(list(prompt_ids), pad_id)
    width = batch["input_ids"].shape[1]
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_beams=1,
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
    )
    was_training = model.training
    model.eval()  # dropout off while sampling
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            generated = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
            )
    finally:
        model.train(was_training)
    out = []
    for row in generated[:, width:].tolist():
        answer = row[: row.index(eos_id) + 1] if eos_id in row else row
        out.append(answer)
    return out


def prepare_prompts(
    task: Task, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *, training: bool = False
) -> tuple[list[tuple[Example, str]], list[list[int]], dict[str, int]]:
    """(example, prompt) pairs that fit max_length, their token ids, and the truncated/skipped counts."""
    pairs, counts = task.build_prompts(examples, tokenizer, training=training)
    return pairs, encode_prompts([p for _, p in pairs], tokenizer), counts


def predict(
    task: Task, model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
    batch_size: int, desc: str | None = None, training_prompts: bool = False,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Predictions by example id (classification: label index, generation: answer text) and prompt-fitting
    counts.

    `training_prompts` builds the prompts as training does (a teacher answering the prompts a student is
    trained on); evaluation prompts never look at the answer.
    """
    pairs, prompt_ids, counts = prepare_prompts(task, tokenizer, examples, training=training_prompts)
    desc = desc or f"{task.name} inference"
    was_training = model.training
    model.eval()
    try:
        answers = task.answer(model, tokenizer, prompt_ids, batch_size=batch_size, desc=desc)
    finally:
        model.train(was_training)
    return {ex.id: a for (ex, _), a in zip(pairs, answers, strict=True)}, counts


def evaluate(
    task: Task, model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], *,
    batch_size: int, desc: str | None = None,
) -> EvalResult:
    start = time.perf_counter()
    predictions, counts = predict(task, model, tokenizer, examples, batch_size=batch_size, desc=desc)
    metrics = task.score(predictions, examples)
    metrics["n"] = len(examples)
    return EvalResult(metrics=metrics, predictions=predictions, counts=counts,
                      seconds=time.perf_counter() - start)


def evaluate_splits(
    task: Task,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: Mapping[str, Sequence[Example]],
    folder: Path,
    *,
    batch_size: int,
    dtype: str,
    label: str,
) -> dict[str, Any]:
    """Evaluate `model` (cast to the evaluation dtype) on each named split, writing each split's predictions
    into `folder` (`task.predictions_file`); returns the metrics by split, with the prompts truncated to fit
    and the seconds it took."""
    model.to(dtype=getattr(torch, dtype))
    metrics: dict[str, Any] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        result = evaluate(task, model, tokenizer, examples, batch_size=batch_size, desc=f"{label} {split}")
        task.write_predictions(result.predictions, folder / task.predictions_file(split))
        metrics[split] = {
            **result.metrics,
            "truncated": result.counts.get("truncated", 0),
            "seconds": round(result.seconds, 2),
        }
    return metrics
