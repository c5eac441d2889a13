"""The teacher stage: adapting the teacher to a task, and caching what the methods need from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kdlab.evaluation import predict, progress
from kdlab.scored import forward_scored
from kdlab.tasks.base import Encoded, Example, Task, collate, encode
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter, fingerprint

# 2: exact top-k tails per KD1 temperature (fp32) and the empty-answer policy of KD2 targets.
CACHE_FORMAT = 2
EMPTY_ANSWER_POLICIES = ("gold", "drop")


def degenerate_answer(text: str) -> bool:
    """True when a generated answer is no usable KD2 target: empty after strip, or no letter or digit."""
    return not any(ch.isalnum() for ch in text)


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
    temperatures: Sequence[float] | None,
    empty_answers: str = "gold",
    transfer_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything that changes what the cache holds; a cache built from other inputs is refused.

    `temperatures` are the KD1 temperatures whose exact top-k tails the cache stores (None: no KD1);
    `empty_answers` is the policy for empty or degenerate teacher answers (see `build_teacher_cache`).
    """
    if empty_answers not in EMPTY_ANSWER_POLICIES:
        raise ValueError(f"empty_answers must be one of {EMPTY_ANSWER_POLICIES}, got {empty_answers!r}")
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
        "temperatures": None if temperatures is None else sorted({float(t) for t in temperatures}),
        "answers": {"decoding": "greedy", "stop": "newline after text", "empty": empty_answers}
        if answers else None,
        # Transfer examples are labelled by the teacher's own answers (see `build_teacher_cache`).
        "transfer": fingerprint({"ids": list(transfer_ids)}) if transfer_ids else None,
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
    temperatures: Sequence[float] = (),
    empty_answers: str = "gold",
    transfer: Sequence[Example] = (),
) -> TeacherCache:
    """Run the teacher once over the training examples and store answers / top-k / hidden states.

    Top-k and hidden states are taken at the answer tokens of the gold encodings (`encoded`), gathered by
    `forward_scored` exactly as the student's outputs are, so rows line up token for token.

    For every temperature T in `temperatures` the cache also stores, per answer token, the fp32
    `logsumexp` over the tokens outside the top-k of `logp / T` (`logp` = log_softmax of the fp32 logits),
    which makes the cached KD1 divergence at T exact (`losses.kd_divergence_topk`).

    KD2 answers that are empty or degenerate (`degenerate_answer`) follow `empty_answers`: "gold" stores
    the example's gold target (`task.target_text`) instead, "drop" stores none (`TeacherCache.answer`
    returns None). The counts go to the manifest's "answers" entry.

    `transfer` examples (a transfer set: inputs whose gold labels are never read) are answered by the
    teacher first; each non-degenerate answer becomes the example's target, and top-k / hidden states are
    taken at its tokens. Their answers are always stored (students rebuild the same encodings from them);
    degenerate ones are dropped, counted under "answers" → "transfer".
    """
    if empty_answers not in EMPTY_ANSWER_POLICIES:
        raise ValueError(f"empty_answers must be one of {EMPTY_ANSWER_POLICIES}, got {empty_answers!r}")
    temps = sorted({float(t) for t in temperatures})
    vocab = len(tokenizer)
    teacher_answers: dict[str, Any] = {}
    if answers:
        teacher_answers, _ = predict(task, teacher, tokenizer, examples, batch_size=batch_size,
                                     desc=f"{task.name} teacher answers", training_prompts=True)
    encoded = dict(encoded)
    transfer_answers, transfer_stats = _label_transfer(task, teacher, tokenizer, transfer, batch_size,
                                                       encoded)
    by_id = {ex.id: ex for ex in list(examples) + list(transfer)}
    ids = [ex.id for ex in examples if ex.id in encoded] + list(transfer_answers)
    needs_forward = top_k is not None or bool(hidden_layers)
    stats: dict[str, Any] = {"total": 0, "empty": 0, "policy": empty_answers, "replaced": 0, "dropped": 0}
    teacher.eval()
    with TeacherCacheWriter(
        directory, fingerprint_inputs=fingerprint_inputs, vocab_size=vocab, top_k=top_k,
        hidden_layers=list(hidden_layers), hidden_dtype=hidden_dtype,
        store_answers=answers or bool(transfer_answers),
        temperatures=temps, overwrite=overwrite,
    ) as writer:
        order = sorted(ids, key=lambda i: len(encoded[i].input_ids))
        batches = range(0, len(order), batch_size)
        for start in progress(batches, desc=f"{task.name} teacher cache", leave=False):
            chunk = order[start : start + batch_size]
            rows: dict[str, dict[str, Any]] = {i: {} for i in chunk}
            if needs_forward:
                batch = collate([encoded[i] for i in chunk], tokenizer.pad_token_id, padding_side="left")
                device = next(teacher.parameters()).device
                tensors = {k: v.to(device) for k, v in batch.items() if k != "example_ids"}
                out = forward_scored(teacher, tensors, hidden_layers=hidden_layers, vocab_size=vocab)
                counts = out.counts.tolist()
                if top_k is not None:
                    logp = out.logits.float().log_softmax(-1)
                    values, indices = logp.topk(top_k, dim=-1)
                    tails = {temp: _tail_lse(logp, indices, temp).split(counts) for temp in temps}
                    parts = zip(chunk, values.split(counts), indices.split(counts), strict=True)
                    for n, (i, v, x) in enumerate(parts):
                        rows[i]["topk_indices"], rows[i]["topk_logprobs"] = x, v
                        if temps:
                            rows[i]["topk_tail"] = {temp: tail[n] for temp, tail in tails.items()}
                for layer in hidden_layers:
                    for i, h in zip(chunk, out.hidden[layer].split(counts), strict=True):
                        rows[i].setdefault("hidden", {})[layer] = h
            for i in chunk:
                if i in transfer_answers:
                    rows[i]["answer"] = transfer_answers[i]
                elif answers:
                    rows[i]["answer"] = teacher_answer(task, by_id[i], teacher_answers.get(i, ""),
                                                   empty_answers, stats)
                writer.add(i, **rows[i])
        if answers or transfer:
            writer.answer_stats = dict(stats, transfer=transfer_stats) if transfer else stats
    return TeacherCache.open(directory, expected_fingerprint=fingerprint(fingerprint_inputs))


def _label_transfer(
    task: Task,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    transfer: Sequence[Example],
    batch_size: int,
    encoded: dict[str, Encoded],
) -> tuple[dict[str, str], dict[str, int]]:
    """The teacher's answers to the transfer examples, and their encodings added to `encoded` in place."""
    if not transfer:
        return {}, {}
    raw, _ = predict(task, teacher, tokenizer, transfer, batch_size=batch_size,
                     desc=f"{task.name} teacher labels the transfer set")
    labelled: dict[str, str] = {}
    stats = {"total": len(transfer), "kept": 0, "degenerate": 0, "too_long": 0}
    for ex in transfer:
        item = transfer_item(task, tokenizer, ex, raw.get(ex.id))
        if item is None:
            stats["degenerate" if ex.id in raw and degenerate_answer(str(raw[ex.id])) else "too_long"] += 1
            continue
        labelled[ex.id], encoded[ex.id] = str(raw[ex.id]), item
        stats["kept"] += 1
    return labelled, stats


def transfer_item(
    task: Task, tokenizer: PreTrainedTokenizerBase, example: Example, answer: Any
) -> Encoded | None:
    """A transfer example encoded with the teacher's answer as its target (None: no usable answer, or the
    prompt with that answer does not fit). The cache builder and the student runs both build it here, so the
    cached rows and the student's rows are the same tokens. Its prompt is built as for evaluation, which
    never looks at the gold answer (training prompts may choose a SQuAD window around it)."""
    if answer is None or degenerate_answer(str(answer)):
        return None
    pairs, _ = task.build_prompts([example], tokenizer, training=False)
    if not pairs:
        return None
    return encode(task, example, pairs[0][1], tokenizer, target=task.answer_target(str(answer)))


def _tail_lse(logp: torch.Tensor, topk_indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N] fp32 logsumexp over the tokens outside the top-k of `logp / T` (-inf when there are none)."""
    tempered = (logp / temperature).scatter(1, topk_indices, float("-inf"))
    return torch.logsumexp(tempered, dim=-1)


def teacher_answer(
    task: Task, example: Example, answer: Any, policy: str, stats: dict[str, Any] | None = None
) -> str | None:
    """The teacher's answer to one training example as a target, applying the empty-answer policy (and
    counting in `stats`)."""
    text = str(answer)
    stats = stats if stats is not None else {"total": 0, "empty": 0, "replaced": 0, "dropped": 0}
    stats["total"] += 1
    if not degenerate_answer(text):
        return text
    stats["empty"] += 1
    if policy == "drop":
        stats["dropped"] += 1
        return None
    stats["replaced"] += 1
    return task.gold_answer(example)
