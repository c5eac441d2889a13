"""The teacher stage: adapting the teacher to a task, and caching what the methods need from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kdlab.evaluation import predict
from kdlab.scored import forward_scored
from kdlab.tasks.base import Encoded, Example, Task, collate
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter, fingerprint

CACHE_FORMAT = 1


def cache_fingerprint_inputs(
    *,
    teacher_weights: str,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    split: str,
    example_ids: Sequence[str],
    top_k: int | None,
    hidden_layers: Sequence[int],
    answers: bool,
    dtype: str,
    hidden_dtype: str,
) -> dict[str, Any]:
    """Everything that changes what the cache holds; a cache built from other inputs is refused."""
    return {
        "format": CACHE_FORMAT,
        "teacher_weights": teacher_weights,
        "tokenizer": {"name": tokenizer.name_or_path, "vocab": len(tokenizer),
                      "hash": fingerprint({"vocab": sorted(tokenizer.get_vocab().items())})},
        "task": task.name,
        "split": split,
        "subset": fingerprint({"ids": list(example_ids)}),
        "template": task.template,
        "settings": task.settings.model_dump(mode="json"),
        "top_k": top_k,
        "hidden_layers": sorted(hidden_layers),
        "hidden_dtype": hidden_dtype,
        "answers": {"decoding": "greedy", "stop": "\\n"} if answers else None,
        "dtype": dtype,
    }


@torch.no_grad()
def build_teacher_cache(
    directory: str | Path,
    *,
    task: Task,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    encoded: Mapping[str, Encoded],
    fingerprint_inputs: dict[str, Any],
    top_k: int | None,
    hidden_layers: Sequence[int],
    answers: bool,
    batch_size: int,
    hidden_dtype: str = "float16",
    overwrite: bool = False,
) -> TeacherCache:
    """Run the teacher once over the training examples and store answers / top-k / hidden states.

    Top-k and hidden states are taken at the answer tokens of the gold encodings (`encoded`), gathered by
    `forward_scored` exactly as the student's outputs are, so rows line up token for token.
    """
    vocab = len(tokenizer)
    teacher_answers: dict[str, Any] = {}
    if answers:
        teacher_answers, _ = predict(task, teacher, tokenizer, examples, batch_size=batch_size,
                                     desc=f"{task.name} teacher answers", training_prompts=True)
    ids = [ex.id for ex in examples if ex.id in encoded]
    needs_forward = top_k is not None or bool(hidden_layers)
    teacher.eval()
    with TeacherCacheWriter(
        directory, fingerprint_inputs=fingerprint_inputs, vocab_size=vocab, top_k=top_k,
        hidden_layers=list(hidden_layers), hidden_dtype=hidden_dtype, store_answers=answers,
        overwrite=overwrite,
    ) as writer:
        order = sorted(ids, key=lambda i: len(encoded[i].input_ids))
        for start in tqdm(range(0, len(order), batch_size), desc=f"{task.name} teacher cache", leave=False):
            chunk = order[start : start + batch_size]
            rows: dict[str, dict[str, Any]] = {i: {} for i in chunk}
            if needs_forward:
                batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id, padding_side="left")
                device = next(teacher.parameters()).device
                tensors = {k: v.to(device) for k, v in batch.items() if k != "example_ids"}
                out = forward_scored(teacher, tensors, hidden_layers=hidden_layers, vocab_size=vocab)
                counts = out.counts.tolist()
                if top_k is not None:
                    values, indices = out.logits.float().log_softmax(-1).topk(top_k, dim=-1)
                    for i, v, x in zip(chunk, values.split(counts), indices.split(counts), strict=True):
                        rows[i]["topk_indices"], rows[i]["topk_logprobs"] = x, v
                for layer in hidden_layers:
                    for i, h in zip(chunk, out.hidden[layer].split(counts), strict=True):
                        rows[i].setdefault("hidden", {})[layer] = h
            for i in chunk:
                if answers:
                    rows[i]["answer"] = str(teacher_answers.get(i, ""))
                writer.add(i, **rows[i])
    return TeacherCache.open(directory, expected_fingerprint=fingerprint(fingerprint_inputs))
