"""One Trainer for every method: it gathers the student's outputs at the answer tokens, fetches the
teacher signals the method's run reads (`Method.signals`: from the cache or a live teacher) and asks the
method for its loss.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import shutil
import time
import typing
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from kdlab import losses, seeding
from kdlab.alignment import (
    ALIGNMENT_KEYS,
    TEACHER_VIEW,
    AnswerAlignment,
    VocabularyMap,
    align_texts,
    batch_alignment,
)
from kdlab.config import TrainingSettings
from kdlab.distributed import (
    fsdp_launch_requested,
    fsdp_on_cpu,
    load_gathered,
    meta_skeleton,
    reset_accelerator_state,
    shard_frozen,
)
from kdlab.evaluation import sample_continuations
from kdlab.files import atomic_write_json, atomic_write_text
from kdlab.methods import POLICY, ROLLOUT_STEP, TEACHER_ANSWER, LossInputs, Method, Signals, TeacherBatch
from kdlab.scored import (
    SEQ_LENGTHS,
    Scored,
    answer_counts,
    forward_scored,
    is_packed,
    pack,
    packing_respected,
)
from kdlab.tasks.base import IGNORE_INDEX, Encoded, collate, target_ids
from kdlab.teacher_cache import TeacherCache

CHECKPOINT_FILE = "trainable.safetensors"
TEACHER_PROMPTS = "teacher_prompt_ids"  # batch key: each row's prompt in the teacher's tokens (rollouts)
FSDP_MODEL_PREFIX = "pytorch_model_fsdp"  # the Trainer's FSDP weights: a .bin (full) or a folder (sharded)
log = logging.getLogger("kdlab")


@dataclass
class TrainItem:
    gold: Encoded
    teacher: Encoded | None = None  # the same prompt with the teacher's answer as target (answers signal)
    # A transfer-set example: `gold` holds the teacher's answer, so only the KD losses may read it.
    transfer: bool = False
    # A teacher with its own tokenizer: `gold` in the teacher's tokens, and its answer matched to the
    # student's (`with_teacher_view`).
    teacher_view: Encoded | None = None
    alignment: AnswerAlignment | None = None


def answer_tokens(encoded: Encoded) -> list[int]:
    """The answer tokens of a sequence (target + EOS): its labels other than -100."""
    return [t for t in encoded.labels if t != IGNORE_INDEX]


def with_teacher_view(
    item: TrainItem,
    teacher_view: Encoded,
    answer: str,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
) -> TrainItem:
    """`item` for a teacher with its own tokenizer: `teacher_view` is the same prompt and `answer` (the target
    text both encodings end with) in the teacher's tokens; the answers are aligned here, once per example.
    ValueError when an encoding's answer is not the answer text tokenized (+ EOS)."""
    alignment = align_texts(answer, student_tokenizer, teacher_tokenizer)
    for name, enc, n in (("student", item.gold, alignment.student_tokens),
                         ("teacher", teacher_view, alignment.teacher_tokens)):
        got = len(answer_tokens(enc))
        if got != n:
            raise ValueError(f"example {enc.id!r}: the {name}'s encoding has {got} answer tokens, its "
                             f"tokenizer cuts {answer!r} into {n - 1} (+ EOS)")
    return dataclasses.replace(item, teacher_view=teacher_view, alignment=alignment)


class StudentModule(nn.Module):
    """The student plus the learned feature projections (methods that read hidden states), so one optimizer,
    one DDP wrapper and one state dict hold both."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList | None = None):
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.ModuleList()

    def forward(self, **kwargs: Any) -> Any:
        return self.student(**kwargs)

    # What accelerate's FSDP preparation asks of a transformers model: the blocks to shard one by one, the
    # embeddings (kept in one group when tied), and re-tying after loading on the meta device.
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.student, "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module | None:
        get = getattr(self.student, "get_input_embeddings", None)
        return get() if get is not None else None

    def get_output_embeddings(self) -> nn.Module | None:
        get = getattr(self.student, "get_output_embeddings", None)
        return get() if get is not None else None

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        if hasattr(self.student, "tie_weights"):
            self.student.tie_weights(*args, **kwargs)


class TrainCollator:
    """Left-pads gold (and teacher-answer) sequences; looks the cached teacher signals a run reads up by
    example id: top-k rows with their exact tail at the run's temperature, hidden states at `teacher_layers`.
    """

    def __init__(
        self,
        pad_id: int,
        *,
        signals: Signals,
        cache: TeacherCache | None = None,
        teacher_layers: Sequence[int] = (),
        packing: bool = False,
        keep_ids: bool = False,
        teacher_pad_id: int | None = None,
    ):
        if cache is not None and signals.top_k is not None and signals.temperature is None:
            raise ValueError("a cached top-k teacher needs the temperature of the run")
        self.pad_id = pad_id
        self.teacher_pad_id = pad_id if teacher_pad_id is None else teacher_pad_id  # a teacher view's padding
        self.signals = signals
        self.cache = cache
        self.teacher_layers = list(teacher_layers)
        self.packing = packing
        self.keep_ids = keep_ids  # a method that samples its own answers logs them by example id

    def layout(self, sequences: Sequence[Encoded], pad_id: int | None = None) -> dict[str, Any]:
        # Padded or packed (`scored.pack`): forward_scored reads either, in the same row order.
        if self.packing:
            return pack(sequences)
        return collate(sequences, self.pad_id if pad_id is None else pad_id, padding_side="left")

    def __call__(self, items: Sequence[TrainItem]) -> dict[str, torch.Tensor]:
        gold = self.layout([it.gold for it in items])
        ids = gold.pop("example_ids")
        batch = dict(gold)
        if self.keep_ids:
            batch["example_ids"] = ids
        batch["gold_rows"] = torch.tensor([not it.transfer for it in items])
        if self.signals.answers:
            teacher = self.layout([it.teacher for it in items])  # type: ignore[misc]
            for key, value in teacher.items():
                if key != "example_ids":
                    batch[TEACHER_ANSWER + key] = value
        views = [it.teacher_view for it in items]
        if any(v is not None for v in views):
            if any(v is None or it.alignment is None for v, it in zip(views, items, strict=True)):
                raise ValueError("a batch mixes examples with and without the teacher's own encoding")
            teacher = self.layout(views, self.teacher_pad_id)  # type: ignore[arg-type]
            for key, value in teacher.items():
                if key != "example_ids":
                    batch[TEACHER_VIEW + key] = value
            batch.update(batch_alignment([it.alignment for it in items],  # type: ignore[misc]
                                         [answer_tokens(it.gold) for it in items],
                                         [answer_tokens(v) for v in views]))  # type: ignore[arg-type]
            if self.keep_ids:  # the student's samples get the teacher's own prompt (`_add_rollouts`)
                batch[TEACHER_PROMPTS] = [[t for t, label in zip(v.input_ids, v.labels, strict=True)
                                           if label == IGNORE_INDEX] for v in views]  # type: ignore[union-attr]
        if self.cache is not None and self.signals.top_k is not None:
            assert self.signals.temperature is not None  # checked in __init__
            idx, lp, tail = self.cache.batch_topk_tail(ids, self.signals.temperature)
            batch["teacher_topk_indices"], batch["teacher_topk_logprobs"] = idx, lp
            batch["teacher_topk_tail_lse"] = tail
        if self.cache is not None and self.signals.layer_map is not None:
            hidden = self.cache.batch_hidden(ids)
            for layer in self.teacher_layers:
                batch[f"teacher_hidden_{layer}"] = hidden[layer]
        return batch


class KDTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        method: Method,
        params: Mapping[str, Any],
        vocab_size: int,
        layer_pairs: Sequence[tuple[int, int]] = (),
        live_teacher: nn.Module | None = None,
        tokenizer: Any = None,
        rollouts_file: Path | None = None,
        teacher_vocab_size: int | None = None,
        vocabulary: VocabularyMap | None = None,
        teacher_tokenizer: Any = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.teacher_tokenizer = teacher_tokenizer  # a teacher with its own tokenizer (samples retokenised)
        self.teacher_vocab_size = vocab_size if teacher_vocab_size is None else teacher_vocab_size
        self.vocabulary = vocabulary  # a teacher with its own tokenizer: the matched vocabulary
        self.method = method
        self.params = dict(params)
        self.signals = method.signals(params)
        self.rollout = method.rollout(params)
        if self.rollout is not None and live_teacher is None:
            raise ValueError(f"{method.name}: a method that samples its own answers needs a live teacher")
        if self.rollout is not None and tokenizer is None:
            raise ValueError(f"{method.name}: sampling answers needs the tokenizer (its EOS and pad tokens)")
        self.vocab_size = vocab_size
        self.layer_pairs = list(layer_pairs)
        self.live_teacher = live_teacher
        self.tokenizer = tokenizer
        self.rollouts_file = rollouts_file
        self._rollouts_trimmed = False
        self._policy_tokens: torch.Tensor | None = None
        # Where the time goes (see `TrainResult.cost`); the student's share is the rest of the run's time.
        self.cost: dict[str, float] = dict.fromkeys(
            ("rollout_seconds", "rollout_tokens", "rollout_samples", "empty_rollouts", "teacher_seconds",
             "teacher_tokens"), 0)
        # compute_loss divides by the global number of answer tokens, so the Trainer must not also
        # divide by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._teacher_answer_tokens: torch.Tensor | None = None
        self._gold_tokens: torch.Tensor | None = None
        self._parts: dict[str, list[float]] = defaultdict(list)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.rollout is not None and batch_samples:
            self.prepare_rollouts(batch_samples, device)
        if self.signals.answers and batch_samples:
            self._teacher_answer_tokens = self._global_count(
                sum(answer_counts(b, TEACHER_ANSWER).sum() for b in batch_samples), device
            )
        if batch_samples:
            # The task loss is normalised by the gold answer tokens only (transfer rows have no gold).
            self._gold_tokens = self._global_count(
                sum((answer_counts(b) * b["gold_rows"]).sum() for b in batch_samples), device
            )
        return batch_samples, num_items

    def _global_count(self, n: torch.Tensor, device: Any) -> torch.Tensor:
        n = n.to(device)
        return self.accelerator.gather(n).sum() if self.args.world_size > 1 else n

    def prepare_rollouts(self, batch_samples: list[dict[str, Any]], device: Any) -> None:
        """The student's samples for one optimizer step's micro-batches (a method with a `Rollout`): drawn
        once per step, before any micro-batch's backward, so every sample comes from the step's weights and
        the sampled tokens are counted (over every rank) before they are trained on."""
        assert self.rollout is not None
        step, seed = self.state.global_step, self.args.seed
        if seeding.on_policy_step(seed, step, self.rollout.student_fraction):
            for i, batch in enumerate(batch_samples):
                self._add_rollouts(batch, seeding.rollout_seed(seed, step, i, self.args.process_index))
        self._policy_tokens = self._global_count(
            sum(answer_counts(b, POLICY).sum() if POLICY + "labels" in b else torch.tensor(0)
                for b in batch_samples),
            device,
        )

    def _add_rollouts(self, batch: dict[str, Any], seed: int) -> None:
        """The student's own answers to the batch's prompts, as `POLICY` sequences (prompt masked); empty
        samples (EOS first) are counted and left out."""
        start = time.perf_counter()
        student = self.accelerator.unwrap_model(self.model)
        student = student.student if isinstance(student, StudentModule) else student
        prompts = prompt_ids(batch)
        answers = sample_continuations(
            student, prompts, temperature=self.rollout.temperature,
            max_new_tokens=self.rollout.max_new_tokens, pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id, seed=seed,
        )
        ids = batch.get("example_ids") or [str(i) for i in range(len(prompts))]
        sequences = [
            Encoded(id=i, input_ids=[*p, *a], labels=[IGNORE_INDEX] * len(p) + a)
            for i, p, a in zip(ids, prompts, answers, strict=True)
            if a and a != [self.tokenizer.eos_token_id]
        ]
        batch[ROLLOUT_STEP] = True
        views: list[Encoded] = []
        alignment: dict[str, torch.Tensor] = {}
        if sequences and TEACHER_PROMPTS in batch:
            teacher_prompts = dict(zip(ids, batch[TEACHER_PROMPTS], strict=True))
            sequences, views, alignment = self._retokenised(sequences, teacher_prompts)
        if sequences:
            layout = self.data_collator.layout(sequences)
            batch[POLICY + "example_ids"] = layout.pop("example_ids")
            device = batch["input_ids"].device
            batch.update({POLICY + k: v.to(device) for k, v in layout.items()})
            if views:
                teacher = self.data_collator.layout(views, self.data_collator.teacher_pad_id)
                teacher.pop("example_ids")
                batch.update({POLICY + TEACHER_VIEW + k: v.to(device) for k, v in teacher.items()})
                batch.update({POLICY + k: v for k, v in alignment.items()})
        self.cost["rollout_seconds"] += _elapsed(start, batch["input_ids"].device)
        self.cost["rollout_tokens"] += sum(len(a) for a in answers)
        self.cost["rollout_samples"] += len(answers)
        self.cost["empty_rollouts"] += len(answers) - len(sequences)

    def _retokenised(
        self, sequences: list[Encoded], teacher_prompts: Mapping[str, list[int]]
    ) -> tuple[list[Encoded], list[Encoded], dict[str, torch.Tensor]]:
        """The student's samples for a teacher with its own tokenizer: each answer's text, encoded again by
        the student's tokenizer (its canonical tokens, which the alignment needs; a sample already in them
        is unchanged) and by the teacher's after the teacher's own prompt, both ending with EOS, and the
        alignment of the two. A sample whose text is empty is left out."""
        student_tok, teacher_tok = self.tokenizer, self.teacher_tokenizer
        kept, views, alignments = [], [], []
        for seq in sequences:
            prompt = [t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label == IGNORE_INDEX]
            text = student_tok.decode(answer_tokens(seq), skip_special_tokens=True)
            if not text.strip():
                continue
            s_ids, t_ids = target_ids(text, student_tok), target_ids(text, teacher_tok)
            t_prompt = teacher_prompts[seq.id]
            kept.append(Encoded(seq.id, [*prompt, *s_ids], [IGNORE_INDEX] * len(prompt) + s_ids))
            views.append(Encoded(seq.id, [*t_prompt, *t_ids], [IGNORE_INDEX] * len(t_prompt) + t_ids))
            alignments.append(align_texts(text, student_tok, teacher_tok))
        if not kept:
            return [], [], {}
        alignment = batch_alignment(alignments, [answer_tokens(s) for s in kept],
                                    [answer_tokens(v) for v in views])
        return kept, views, alignment

    def _teacher_on(self, batch: Mapping[str, Any], prefix: str) -> TeacherBatch | None:
        """The teacher at the answer tokens of the sequences under `prefix`: a live teacher is run on them,
        a cache read (it holds the gold sequences only)."""
        if self.signals.top_k is None and self.signals.layer_map is None and not self.signals.live:
            return None  # the run reads no teacher distribution (answers, if any, are sequences of the batch)
        teacher_layers = [t for _, t in self.layer_pairs]
        # A teacher with its own tokenizer reads the gold sequences in its own tokens (the teacher view).
        own_view = prefix + TEACHER_VIEW + "labels" in batch
        alignment = {k: batch[prefix + k] for k in ALIGNMENT_KEYS} if own_view else None
        vocabulary = self.vocabulary if own_view else None
        if self.live_teacher is not None:
            start = time.perf_counter()
            read = prefix + TEACHER_VIEW if own_view else prefix
            # The teacher is not wrapped by accelerate, so mixed precision is entered here (a no-op without).
            with torch.no_grad(), self.accelerator.autocast():
                out = forward_scored(
                    self.live_teacher, batch, hidden_layers=teacher_layers,
                    vocab_size=self.teacher_vocab_size, prefix=read,
                )
            self.cost["teacher_seconds"] += _elapsed(start, out.logits.device)
            self.cost["teacher_tokens"] += int(sequence_tokens(batch, read))
            logits = out.logits if self.signals.top_k is not None or self.signals.live else None
            return TeacherBatch(logits=logits, hidden=out.hidden, alignment=alignment, vocabulary=vocabulary,
                                targets=out.targets)
        if prefix:
            raise ValueError(f"the cache holds the teacher on the gold answers only, not on {prefix!r} ones")
        return TeacherBatch(
            topk_indices=batch.get("teacher_topk_indices"),
            topk_logprobs=batch.get("teacher_topk_logprobs"),
            tail_lse=batch.get("teacher_topk_tail_lse"),
            hidden={t: batch[f"teacher_hidden_{t}"] for t in teacher_layers},
            alignment=alignment,
            vocabulary=vocabulary,
        )

    def _log_rollouts(self, batch: Mapping[str, Any], students: Mapping[str, Scored],
                      teachers: Mapping[str, TeacherBatch | None]) -> None:
        """A few of this step's samples with their mean per-token reverse KL(student || teacher), to
        `rollouts.jsonl` (first micro-batch of each logging step, leader only)."""
        step = self.state.global_step + 1
        if (self.rollouts_file is None or POLICY not in students or not self.is_world_process_zero()
                or (step % max(1, int(self.args.logging_steps)) and step != 1)):
            return
        teacher = teachers.get(POLICY)
        if teacher is None or teacher.logits is None or teacher.cross_tokenizer:
            return  # (across tokenizers the per-token KL has no row-by-row form: no records yet)
        if not self._rollouts_trimmed:
            # A resumed run redoes the steps after its checkpoint: their earlier records go.
            self._rollouts_trimmed = True
            kept = [line for line in _read_lines(self.rollouts_file) if json.loads(line)["step"] < step]
            atomic_write_text(self.rollouts_file, "".join(kept))
        scored = students[POLICY]
        with torch.no_grad():
            per_token = losses.reverse_kl_tokens(scored.logits.detach(), teacher.logits)
        ids = batch[POLICY + "example_ids"]
        records = []
        start = 0
        for i, n in enumerate(scored.counts.tolist()):
            if i < ROLLOUTS_LOGGED:
                answer = self.tokenizer.decode(scored.targets[start : start + n], skip_special_tokens=True)
                records.append(dict(step=step, example_id=ids[i], answer=answer, tokens=n,
                                    reverse_kl=round(float(per_token[start : start + n].mean()), 6)))
            start += n
        with open(self.rollouts_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        batch = dict(inputs)
        student_layers = [s for s, _ in self.layer_pairs]
        # Each set of sequences is run at most once per micro-batch, whichever loss term asks first.
        students: dict[str, Scored] = {}
        teachers: dict[str, TeacherBatch | None] = {}

        def student_on(prefix: str) -> Scored:
            if prefix not in students:
                layers = () if prefix else student_layers  # hidden states are matched on the gold sequences
                students[prefix] = forward_scored(
                    model, batch, hidden_layers=layers, vocab_size=self.vocab_size, prefix=prefix
                )
            return students[prefix]

        def teacher_on(prefix: str) -> TeacherBatch | None:
            if prefix not in teachers:
                teachers[prefix] = self._teacher_on(batch, prefix)
            return teachers[prefix]

        num_tokens = num_items_in_batch
        if num_tokens is None:  # outside the Trainer's accumulation loop: this batch's answer tokens
            num_tokens = int(answer_counts(batch).sum())
        answer_tokens = self._teacher_answer_tokens
        if answer_tokens is None and TEACHER_ANSWER + "labels" in batch:
            answer_tokens = int(answer_counts(batch, TEACHER_ANSWER).sum())
        gold_tokens = self._gold_tokens if num_items_in_batch is not None else None
        if gold_tokens is None:
            counts = answer_counts(batch)
            gold_tokens = int((counts * batch["gold_rows"]).sum() if "gold_rows" in batch else counts.sum())
        unwrapped = self.accelerator.unwrap_model(model)
        projections = unwrapped.projections if isinstance(unwrapped, StudentModule) else None
        # Under mixed precision the loss's own matmuls (KD3's projections) run in the compute dtype too;
        # the losses compute divergences and reductions in fp32 explicitly.
        with self.accelerator.autocast():
            loss, parts = self.method.loss(
                LossInputs(
                    model=model,
                    batch=batch,
                    forward_student=student_on,
                    forward_teacher=teacher_on,
                    num_tokens=num_tokens,
                    num_gold_tokens=gold_tokens,
                    num_teacher_tokens=answer_tokens if answer_tokens is not None else 1,
                    params=self.params,
                    layer_pairs=self.layer_pairs,
                    projections=projections,
                    vocab_size=self.vocab_size,
                    num_policy_tokens=self._policy_count(batch, num_items_in_batch),
                )
            )
        if self.rollout is not None:
            self._log_rollouts(batch, students, teachers)
        # Losses are sums over the global batch's tokens; DDP averages gradients over processes.
        if (
            self.args.average_tokens_across_devices
            and self.args.world_size > 1
            and num_items_in_batch is not None
        ):
            loss = loss * self.accelerator.num_processes
        # Logged per micro-batch as a share of the global batch; summed back per step in `log`.
        values = {name: float(value.detach()) for name, value in parts.items()}
        for name, value in values.items():
            self._parts[name].append(value)
        self._check_finite_loss(float(loss.detach()), values)
        return loss

    def _policy_count(self, batch: Mapping[str, Any], num_items_in_batch: Any) -> torch.Tensor | float:
        if POLICY + "labels" not in batch:
            return 1
        if num_items_in_batch is not None and self._policy_tokens is not None:
            return self._policy_tokens
        return int(answer_counts(batch, POLICY).sum())  # outside the accumulation loop: this batch's

    def _check_finite_loss(self, total: float, parts: Mapping[str, float]) -> None:
        """A NaN/inf loss fails the run at once (its weights would be garbage), naming the term and step."""
        if math.isfinite(total) and all(math.isfinite(v) for v in parts.values()):
            return
        bad = [f"loss_{n} = {v}" for n, v in parts.items() if not math.isfinite(v)] or [f"loss = {total}"]
        ok = [f"loss_{n} = {v:.4g}" for n, v in parts.items() if math.isfinite(v)]
        raise FloatingPointError(
            f"non-finite loss at step {self.state.global_step + 1}: {', '.join(bad)}"
            + (f" ({', '.join(ok)})" if ok else "")
            + "; check the teacher signals (`kdlab cache --verify`) and the learning rate"
        )

    # Private Trainer methods kdlab overrides, because no public hook gives what they do (the step's gradient
    # norm before the optimizer step; loading trainable-only checkpoints). The transformers range in
    # pyproject.toml is the tested one, and tests/test_trainer_hooks.py fails when an upgrade changes them.
    PRIVATE_OVERRIDES = ("_get_grad_norm", "_load_from_checkpoint")

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The pre-clipping norm of every step's gradients: a NaN/inf one would be stepped into the weights.
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        if not math.isfinite(value):
            raise FloatingPointError(
                f"non-finite gradient at step {self.state.global_step + 1}: gradient norm {value}; "
                "check the teacher signals (`kdlab cache --verify`) and the learning rate"
            )
        return norm

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_fsdp_enabled:
            # The weights of an FSDP checkpoint are the Trainer's own FSDP files (sharded by every rank, or
            # gathered on rank 0: fsdp_state_dict_type), written beside the optimizer's.
            return
        if not self.args.should_save:  # every rank holds the same replica: the first writes it
            return
        # Checkpoints hold the trainable tensors only (LoRA adapters, or every weight in full fine-tuning,
        # plus feature projections); `named_parameters` lists tied weights once, which safetensors requires.
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        tensors = {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}
        save_file(tensors, os.path.join(output_dir, CHECKPOINT_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        folder = Path(resume_from_checkpoint)
        fsdp_files = any(p.name.startswith(FSDP_MODEL_PREFIX) for p in folder.iterdir())
        if self.is_fsdp_enabled != fsdp_files:
            raise ValueError(
                f"{resume_from_checkpoint}: a checkpoint {'with' if fsdp_files else 'without'} FSDP cannot "
                f"resume a run {'with' if self.is_fsdp_enabled else 'without'} it; launch it as it was "
                "launched, or delete the run's trainer/ folder to start it over"
            )
        if self.is_fsdp_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # into the sharded model
            return
        module = self.accelerator.unwrap_model(model or self.model)
        state = load_file(folder / CHECKPOINT_FILE)
        result = module.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"{resume_from_checkpoint}: checkpoint does not fit this model "
                f"(unexpected {result.unexpected_keys[:3]})"
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts and "loss" in logs:
            micro_batches = max(len(values) for values in self._parts.values())
            steps = max(1, micro_batches // max(1, self.args.gradient_accumulation_steps))
            for name, values in self._parts.items():
                # Each rank holds its share of the global batch's sum (DDP, FSDP): add the shares up.
                total = self.accelerator.reduce(torch.tensor(sum(values), device=self.args.device), "sum")
                logs[f"loss_{name}"] = round(float(total) / steps, 6)
            self._parts.clear()
        super().log(logs, start_time)


ROLLOUTS_LOGGED = 4  # samples per logging step written to rollouts.jsonl


def _elapsed(start: float, device: torch.device) -> float:
    # GPU kernels run asynchronously: wait for them, or the time lands on whatever syncs next.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def prompt_ids(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each sequence's prompt tokens (label -100, padding dropped), padded or packed layout alike."""
    ids, labels = batch["input_ids"], batch["labels"]
    if is_packed(batch):
        rows, start = [], 0
        for n in batch[SEQ_LENGTHS].tolist():
            seq, lab = ids[0, start : start + n], labels[0, start : start + n]
            rows.append(seq[lab == IGNORE_INDEX].tolist())
            start += n
        return rows
    keep = (batch["attention_mask"] == 1) & (labels == IGNORE_INDEX)
    return [row[mask].tolist() for row, mask in zip(ids, keep, strict=True)]


def sequence_tokens(batch: Mapping[str, Any], prefix: str = "") -> int:
    """Tokens (not padding) of the sequences under `prefix`: what one forward pass over them reads."""
    if is_packed(batch, prefix):
        return int(batch[prefix + SEQ_LENGTHS].sum())
    return int(batch[prefix + "attention_mask"].sum())


class TrainingProgress(ProgressCallback):
    """The Trainer's progress bar, named "<run> train" like the run's "<run> eval" bars and hidden under
    `kdlab -q`; the losses it logs go to the "kdlab" logger at debug level (`kdlab -v`) and to
    log_history.json, never to stdout, which keeps the commands' results."""

    def __init__(self, run_name: str | None = None) -> None:
        super().__init__()
        self.description = f"{run_name} train" if run_name else "train"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.current_step = 0
        if log.isEnabledFor(logging.INFO):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:  # rank 0 only
                self.training_bar.set_description(self.description, refresh=False)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            log.debug("step %d: %s", state.global_step, {k: v for k, v in logs.items() if k != "total_flos"})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)


@dataclass
class TrainResult:
    log_history: list[dict[str, Any]]
    train_runtime: float
    steps: int
    # The trained student and projections to save and evaluate: the objects passed in, or under FSDP (which
    # shards those in place) unsharded copies gathered on rank 0, and None on the other ranks.
    model: nn.Module | None = None
    projections: nn.ModuleList | None = None
    # Where the run's time went (seconds) and how many tokens each part processed; see `KDTrainer.cost`.
    cost: dict[str, float] = dataclasses.field(default_factory=dict)


# TrainingArguments that kdlab sets itself, and those its own training fields stand for.
SET_BY_KDLAB = {
    "output_dir": "each run's own folder",
    "seed": "the run's seed (see `seeds`)",
    "data_seed": "the run's seed (see `seeds`)",
    "run_name": "the run id",
    "remove_unused_columns": "kdlab's collator",
    "use_cpu": "the study's `device`",
}
KDLAB_NAMES = {
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",
    "save_strategy": "save_steps",
}


def training_arguments(
    settings: TrainingSettings,
    output_dir: str | Path,
    seed: int,
    *,
    use_cpu: bool,
    run_name: str | None = None,
) -> TrainingArguments:
    """The Trainer's arguments: kdlab's fields mapped to TrainingArguments, then every other field the
    settings pass through (`report_to`, `optim`, ...)."""
    arguments: dict[str, Any] = dict(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        lr_scheduler_type=settings.lr_scheduler,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        max_grad_norm=settings.max_grad_norm,
        logging_steps=settings.logging_steps,
        bf16=settings.bf16,
        seed=seed,
        data_seed=seed,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        report_to=[],
        run_name=run_name,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, not replaced by an average
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Pinned host memory is allocated through the GPU driver: a CPU run must not touch the GPU.
        dataloader_pin_memory=not use_cpu,
        use_cpu=use_cpu,
        disable_tqdm=False,
    )
    arguments.update(passthrough_fields(settings))
    return TrainingArguments(**arguments)


def passthrough_fields(settings: TrainingSettings) -> dict[str, Any]:
    """The TrainingArguments fields `settings` passes through (`report_to`, `optim`, ...), converted to
    the types TrainingArguments annotates (YAML's "2" for an int field becomes 2); ValueError names the
    field."""
    hints = typing.get_type_hints(TrainingArguments)
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    checked: dict[str, Any] = {}
    for name, value in (settings.model_extra or {}).items():
        if name in SET_BY_KDLAB:
            raise ValueError(f"{name}: set by kdlab ({SET_BY_KDLAB[name]})")
        if name in KDLAB_NAMES:
            raise ValueError(f"{name}: give kdlab's `{KDLAB_NAMES[name]}` instead")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known) + list(TrainingSettings.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{name}: not a field of transformers' TrainingArguments{hint}")
        if name == "fsdp" and isinstance(value, bool):
            checked[name] = value  # transformers documents `fsdp: true` but annotates the field as str
            continue
        try:
            checked[name] = TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"{name}: {e.errors()[0]['msg']} (got {value!r})") from None
    return checked


def check_trainer_arguments(settings: TrainingSettings) -> dict[str, Any]:
    """`passthrough_fields`, then TrainingArguments built from the settings (transformers' own checks: valid
    optimizer names, strategies that fit, ...); ValueError names the field or the reason."""
    checked = passthrough_fields(settings)
    try:
        training_arguments(settings, "kdlab-check", 0, use_cpu=True)
    except Exception as e:  # transformers' own checks (valid optimizer names, strategies that fit, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"TrainingArguments refused it: {reason}") from None
    return checked


def check_packing(*models: nn.Module | None) -> None:
    """`training.packing` needs models that keep attention within each packed sequence; refuse others."""
    for model in models:
        if model is not None and not packing_respected(model):
            impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
            raise ValueError(
                f"training.packing: {type(model).__name__} (attention {impl}) lets packed sequences attend "
                "to each other; use attn_implementation sdpa, eager or flash_attention_2, or packing: false"
            )


def drop_incomplete_checkpoints(trainer: Path) -> list[str]:
    """Remove the checkpoints a killed process left half-written, so a retry resumes from the last whole
    one (the Trainer writes trainer_state.json last; `get_last_checkpoint` only looks at the folder names).
    Returns the names removed."""
    dropped = []
    for folder in sorted(trainer.glob("checkpoint-*")) if trainer.is_dir() else []:
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(folder.name)
    return dropped


SETTINGS_MARK = "kdlab_config_hash.txt"  # in a run's trainer folder: the settings of its checkpoints


def last_checkpoint(trainer_dir: Path, config_hash: str | None = None) -> str | None:
    """The checkpoint an interrupted run resumes from: the newest whole one in `trainer_dir` (half-written
    ones are removed first), or None.

    With `config_hash` (the run's), checkpoints made under other settings (a run redone with `--force`) are
    removed rather than resumed, and the folder is marked with this hash for the next resume."""
    if config_hash is not None and trainer_dir.is_dir():
        mark = trainer_dir / SETTINGS_MARK
        made_with = mark.read_text().strip() if mark.is_file() else None
        stale = sorted(trainer_dir.glob("checkpoint-*")) if made_with not in (None, config_hash) else []
        if stale:
            log.info(f"[resume] {trainer_dir}: {len(stale)} checkpoint(s) made with other settings removed")
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
    drop_incomplete_checkpoints(trainer_dir)
    if config_hash is not None:
        atomic_write_text(trainer_dir / SETTINGS_MARK, config_hash)
    return get_last_checkpoint(str(trainer_dir)) if trainer_dir.is_dir() else None


def train(
    student: PreTrainedModel | nn.Module,
    items: Sequence[TrainItem],
    *,
    method: Method,
    params: Mapping[str, Any],
    settings: TrainingSettings,
    output_dir: str | Path,
    seed: int,
    pad_id: int,
    vocab_size: int,
    cache: TeacherCache | None = None,
    live_teacher: nn.Module | None = None,
    layer_pairs: Sequence[tuple[int, int]] = (),
    projections: nn.ModuleList | None = None,
    resume_from_checkpoint: str | bool | None = None,
    run_name: str | None = None,
    tokenizer: Any = None,
    rollouts_file: str | Path | None = None,
    teacher_pad_id: int | None = None,
    teacher_vocab_size: int | None = None,
    vocabulary: VocabularyMap | None = None,
    teacher_tokenizer: Any = None,
) -> TrainResult:
    """Train `student` on `items` with `method`; the caller saves `result.model` (the student itself, or
    under FSDP its gathered copy on rank 0). `run_name` names the run where the settings' `report_to`
    integrations (TensorBoard, W&B, ...) show it.

    FSDP comes from the launch (`accelerate launch --config_file` with `distributed_type: FSDP`) or from
    the settings (`fsdp`, `fsdp_config`); `settings.teacher_sharding` says what FSDP does with the live
    teacher: "replicate" (every rank holds it whole) or "shard" (FSDP2 over the ranks). See docs/fsdp.md.

    A teacher with its own tokenizer: `items` carry its view of each example (`with_teacher_view`),
    `teacher_pad_id` and `teacher_vocab_size` are its tokenizer's, `vocabulary` the matched vocabulary,
    `teacher_tokenizer` (a method that samples) retokenises the student's samples for it."""
    if not items:
        raise ValueError("no training examples left after encoding (all skipped as too long?)")
    set_seed(seed)
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = StudentModule(student, projections)
    device = next(student.parameters()).device
    args = training_arguments(settings, output_dir, seed, use_cpu=device.type == "cpu", run_name=run_name)
    if args.ddp_find_unused_parameters is None:
        # The Trainer's default for a module that is not a PreTrainedModel is True, which breaks methods
        # that apply the projections outside the wrapped forward (DDP marks them unused, then their
        # gradients arrive). Every trainable tensor gets a gradient every step, so no search is needed.
        args.ddp_find_unused_parameters = False
    fsdp = bool(args.fsdp) or fsdp_launch_requested()
    if fsdp and method.rollout(params) is not None:
        # Sampling runs a different number of forward passes on each rank (answers end at different
        # lengths), which a sharded model cannot do without keeping every rank in lockstep.
        raise ValueError(f"{method.name}: on-policy sampling under FSDP is not supported yet; use DDP "
                         "(torchrun / accelerate launch without FSDP) or one process")
    sharding = settings.teacher_sharding
    if fsdp and args.save_only_model and args.save_strategy != "no":
        raise ValueError("save_only_model: FSDP checkpoints keep their weights with the optimizer's state")
    collator = TrainCollator(
        pad_id,
        signals=method.signals(params),
        cache=cache if live_teacher is None else None,
        teacher_layers=[t for _, t in layer_pairs],
        packing=settings.packing,
        keep_ids=method.rollout(params) is not None,
        teacher_pad_id=teacher_pad_id,
    )
    if settings.packing:
        check_packing(student, live_teacher)
    reset_accelerator_state()
    with fsdp_on_cpu():
        trainer = KDTrainer(
            model=module,
            args=args,
            train_dataset=list(items),
            data_collator=collator,
            method=method,
            params=params,
            vocab_size=vocab_size,
            layer_pairs=layer_pairs,
            live_teacher=live_teacher,
            tokenizer=tokenizer,
            rollouts_file=Path(rollouts_file) if rollouts_file is not None else None,
            teacher_vocab_size=teacher_vocab_size,
            vocabulary=vocabulary,
            teacher_tokenizer=teacher_tokenizer,
        )
    if fsdp and args.world_size > 1 and not trainer.is_fsdp_enabled:
        raise ValueError("FSDP was asked for, but accelerate chose another strategy (see docs/fsdp.md)")
    # Taken before training shards the module in place: the shape its trained weights are gathered into.
    skeleton = meta_skeleton(module) if trainer.is_fsdp_enabled else None
    if trainer.is_fsdp_enabled and live_teacher is not None and sharding == "shard":
        shard_frozen(live_teacher)
    if trainer.is_fsdp_enabled and trainer.accelerator.is_main_process:
        plugin = trainer.accelerator.state.fsdp_plugin
        log.info(
            f"[fsdp] {run_name or 'training'}: trained sharded over {args.world_size} ranks "
            f"(FSDP{plugin.fsdp_version}, checkpoints {plugin.state_dict_type.name}), live teacher "
            f"{'none' if live_teacher is None else {'shard': 'sharded', 'replicate': 'replicated'}[sharding]}"
        )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress(run_name))
    out = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    history = trainer.state.log_history
    atomic_write_json(Path(output_dir) / "log_history.json", history, indent=1)
    for entry in history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"training diverged: loss {entry['loss']} at step {entry.get('step')}")
    trained: StudentModule | None = module
    if trainer.is_fsdp_enabled:
        # Every rank takes part in the gather; rank 0 alone receives the full weights (on the CPU).
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        trained = None
        if trainer.accelerator.is_main_process:
            assert isinstance(skeleton, StudentModule)
            load_gathered(skeleton, state, device)
            trained = skeleton
        del state
    runtime = out.metrics.get("train_runtime", 0.0)
    cost = {k: round(v, 3) if isinstance(v, float) else v for k, v in trainer.cost.items()}
    cost["student_seconds"] = round(max(0.0, runtime - trainer.cost["rollout_seconds"]
                                        - trainer.cost["teacher_seconds"]), 3)
    return TrainResult(
        cost=cost,
        log_history=history,
        train_runtime=runtime,
        steps=trainer.state.global_step,
        model=trained.student if trained is not None else None,
        projections=trained.projections if trained is not None and projections is not None else None,
    )
