"""The cache stage: what the teacher knows, computed once per task and stored for every run that reads it
(teacher_cache/<task>): its greedy answers, top-k log-probs with an exact tail per temperature, hidden states
at the mapped layers, all at the answer tokens of the training (and transfer) examples. What it holds is the
union of what the study's runs read (`Method.signals`); it is fingerprinted, checksummed, built beside its
place and claimed in the registry like a run, so two processes never build it together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kdlab.errors import CacheError
from kdlab.evaluation import generation_options, predict, progress
from kdlab.hashing import canonical_hash
from kdlab.models import hash_model_files, load_model
from kdlab.registry import RunSpec
from kdlab.scored import forward_scored
from kdlab.tasks.base import Encoded, Example, Task, collate, encode
from kdlab.teacher_cache import REBUILD_HINT, TeacherCache, TeacherCacheWriter

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView

# 2: exact top-k tails per temperature (fp32) and the empty-answer policy of answer targets.
CACHE_FORMAT = 2
EMPTY_ANSWER_POLICIES = ("gold", "drop")


def degenerate_answer(text: str) -> bool:
    """True when a generated answer is no usable target: empty after strip, or no letter or digit."""
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

    `temperatures` are those whose exact top-k tails the cache stores (None: no top-k);
    `empty_answers` is the policy for empty or degenerate teacher answers (see `build_teacher_cache`).
    """
    if empty_answers not in EMPTY_ANSWER_POLICIES:
        raise ValueError(f"empty_answers must be one of {EMPTY_ANSWER_POLICIES}, got {empty_answers!r}")
    return {
        "format": CACHE_FORMAT,
        "teacher_weights": teacher_weights,
        "tokenizer": {
            "name": tokenizer.name_or_path,
            "vocab": len(tokenizer),
            "hash": canonical_hash({"vocab": sorted(tokenizer.get_vocab().items())}),
        },
        "task": task.name,
        "split": split,
        "subset": canonical_hash({"ids": list(example_ids)}),
        "template": task.template,
        "settings": task.settings.model_dump(mode="json"),
        "top_k": top_k,
        "hidden_layers": sorted(hidden_layers),
        "hidden_dtype": hidden_dtype,
        "temperatures": None if temperatures is None else sorted({float(t) for t in temperatures}),
        "answers": {"decoding": "greedy", "stop": "newline after text", "empty": empty_answers}
        if answers
        else None,
        # Transfer examples are labelled by the teacher's own answers (see `build_teacher_cache`).
        "transfer": canonical_hash({"ids": list(transfer_ids)}) if transfer_ids else None,
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
    which makes a cached top-k divergence at T exact (`losses.kd_divergence_topk`).

    Answers (targets of the methods that read them) that are empty or degenerate (`degenerate_answer`)
    follow `empty_answers`: "gold" stores the example's gold target (`task.target_text`) instead, "drop"
    stores none (`TeacherCache.answer` returns None). The counts go to the manifest's "answers" entry.

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
        teacher_answers, _ = predict(
            task,
            teacher,
            tokenizer,
            examples,
            batch_size=batch_size,
            desc=f"{task.name} teacher answers",
            training_prompts=True,
        )
    encoded = dict(encoded)
    transfer_answers, transfer_stats = _label_transfer(
        task, teacher, tokenizer, transfer, batch_size, encoded
    )
    by_id = {ex.id: ex for ex in list(examples) + list(transfer)}
    ids = [ex.id for ex in examples if ex.id in encoded] + list(transfer_answers)
    needs_forward = top_k is not None or bool(hidden_layers)
    stats: dict[str, Any] = {"total": 0, "empty": 0, "policy": empty_answers, "replaced": 0, "dropped": 0}
    teacher.eval()
    with TeacherCacheWriter(
        directory,
        fingerprint_inputs=fingerprint_inputs,
        vocab_size=vocab,
        top_k=top_k,
        hidden_layers=list(hidden_layers),
        hidden_dtype=hidden_dtype,
        store_answers=answers or bool(transfer_answers),
        temperatures=temps,
        overwrite=overwrite,
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
                    rows[i]["answer"] = teacher_answer(
                        task, by_id[i], teacher_answers.get(i, ""), empty_answers, stats
                    )
                writer.add(i, **rows[i])
        if answers or transfer:
            writer.answer_stats = dict(stats, transfer=transfer_stats) if transfer else stats
    return TeacherCache.open(directory, expected_fingerprint=canonical_hash(fingerprint_inputs))


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
    raw, _ = predict(
        task,
        teacher,
        tokenizer,
        transfer,
        batch_size=batch_size,
        desc=f"{task.name} teacher labels the transfer set",
    )
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


# ---------------------------------------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class CacheContents:
    """What a task's teacher cache holds: the union of what every run of the study reads from it."""

    answers: bool  # the teacher's greedy answers
    top_k: int | None  # top-k log-probs (the largest k of any run)...
    temperatures: list[float] | None  # ...with an exact tail per temperature
    hidden_layers: list[int]  # hidden states at these teacher layers


def cache_contents(study: StudyView) -> CacheContents | None:
    """What the teacher cache must hold for every grid point of every method and every student; None: no
    method reads the teacher, or the teacher runs live (`cache.mode: online`)."""
    if study.config.cache.mode == "online":
        return None
    answers, top_k, temperatures, layers = False, None, set(), set()
    for group in study.plan.groups:
        for run in group.grid:
            signals = run.signals
            if signals.live:  # scored by the live teacher during training, never cached
                continue
            answers |= signals.answers
            if signals.top_k is not None:
                top_k = max(top_k or 0, signals.top_k)
                temperatures.add(float(signals.temperature))
            layers |= {t for _, t in run.layer_pairs}
    if not (answers or top_k or layers):
        return None
    return CacheContents(answers, top_k, sorted(temperatures) if top_k else None, sorted(layers))


def verify_caches(study: StudyView) -> list[tuple[str, Path, str | None]]:
    """`kdlab cache --verify`: hash every file of each task's teacher cache against its manifest.
    (task, folder, None when intact, else the error naming the file and the repair command). Integrity
    only: whether a cache still fits the config is checked when a run uses it."""
    if cache_contents(study) is None:
        return []
    results: list[tuple[str, Path, str | None]] = []
    for name in study.config.tasks:
        directory = study.layout.teacher_cache(name)
        try:
            TeacherCache.open(directory, verify="hash")
            results.append((name, directory, None))
        except CacheError as e:
            results.append((name, directory, repair_hint(study, str(e))))
    return results


def repair_hint(study: StudyView, message: str) -> str:
    """A cache error naming the command that rebuilds this study's cache."""
    return message.replace(
        REBUILD_HINT,
        f"rebuild it with `{study.command('cache', '--rebuild')}` (or add --rebuild-cache to this command)",
    )


def run_cache(study: StudyView, name: str) -> TeacherCache | None:
    """Task `name`'s teacher cache, built if it is missing (or, asked to, rebuilt if it fails verification);
    None when the study needs none."""
    contents = cache_contents(study)
    if contents is None:
        return None
    empty_answers = study.config.cache.empty_answers  # empty/degenerate teacher answers as targets
    data = study.data(name)
    teacher_dir = study.teacher_path(name)
    inputs = cache_fingerprint_inputs(
        teacher_weights=hash_model_files(teacher_dir),  # == hash_directory, large files read once
        tokenizer=study.tokenizer,
        task=data.task,
        split=data.task.train_split,
        example_ids=[e.id for e in data.train],
        top_k=contents.top_k,
        hidden_layers=contents.hidden_layers,
        answers=contents.answers,
        dtype=study.config.evaluation.dtype,
        hidden_dtype=study.config.cache.hidden_dtype,
        temperatures=contents.temperatures,
        empty_answers=empty_answers,
        transfer_ids=[e.id for e in data.transfer],
    )
    directory = study.layout.teacher_cache(name)
    expected = canonical_hash(inputs)
    # A cache that fails verification (another fingerprint, a missing, truncated or corrupt file) is
    # rebuilt when asked, else refused with the command that rebuilds it; one that never finished (no
    # manifest) is simply built again.
    failed_verification = False
    if study.ranks.share((directory / "manifest.json").is_file()):
        try:
            return TeacherCache.open(directory, expected_fingerprint=expected, expected_inputs=inputs)
        except CacheError as e:
            if not study.rebuild_cache:
                e.args = (repair_hint(study, str(e)),)
                raise
            reason = str(e).splitlines()[0].split("; rebuild it")[0]
            study.log(f"[cache] {name}: {reason}; rebuilding it as asked")
            failed_verification = True

    def build() -> dict[str, Any]:
        study.log(f"[cache] {name}: building the teacher cache in {directory}")
        teacher = load_model(teacher_dir, dtype=study.config.evaluation.dtype, device=study.device)
        with generation_options(study.generation(teacher_dir)):  # the teacher's answers (KD2, transfer set)
            cache = build_teacher_cache(
                directory,
                task=data.task,
                teacher=teacher,
                tokenizer=study.tokenizer,
                examples=data.train,
                encoded=data.encoded,
                fingerprint_inputs=inputs,
                top_k=contents.top_k,
                hidden_layers=contents.hidden_layers,
                answers=contents.answers,
                batch_size=study.config.evaluation.batch_size,
                hidden_dtype=study.config.cache.hidden_dtype,
                overwrite=True,  # whatever is there failed verification: built beside, then swapped in
                temperatures=contents.temperatures or (),
                empty_answers=empty_answers,
                transfer=data.transfer,
            )
        stats = {"examples": len(cache), "answer_tokens": cache.num_tokens, "fields": list(cache.fields)}
        if "topk" in cache.fields:
            # Top-k arrays plus the fp32 tail of every temperature; the parts are kept too.
            stats["topk_bytes_per_token"] = cache.bytes_per_token()
            stats["kd1_bytes_per_token_parts"] = cache.bytes_per_token_parts()  # the registry's key since v1
        if cache.manifest.get("answers"):
            stats["answers"] = cache.manifest["answers"]
        return {"cache": stats}

    # Claimed in the registry like any run, so two processes never build the same cache at once.
    spec = RunSpec(
        id=f"cache-{name}",
        kind="teacher",
        task=name,
        method="cache",
        student="teacher",
        stage="teacher",
        params={"fingerprint": expected},
        seed=None,
        config_hash=expected[:16],
        output_dir=str(directory),
    )
    # The registry says done but the cache is gone or broken: rebuild it.
    study.runner.redo_if_lost(spec, not failed_verification and (directory / "manifest.json").is_file())
    study.runner.execute_required(spec, build)
    return TeacherCache.open(directory, expected_fingerprint=expected, expected_inputs=inputs)
