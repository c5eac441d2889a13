"""What every task shares: examples, the Task interface, prompt encoding, subsets and batch collation.

Design notes:
- Prompt and target are tokenized separately (prompt with the tokenizer's special tokens, target without,
  then eos), so the label mask is exact and evaluation feeds the model the very same prompt ids as training
  (``encode_prompt`` is the one place that makes them).
- Prompts are fitted to ``settings.max_length`` by cutting one long field of the template (SST-2: the
  sentence, SQuAD: the context) at token boundaries of a fast tokenizer's offset mapping, then re-checking
  the whole prompt, since tokens of a cut field need not add up exactly inside the template.
- Subsets are prefixes of one seeded permutation, so they are deterministic, a larger subset contains a
  smaller one, and the selection set does not move when the training size changes.
"""

from __future__ import annotations

import os
import random
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kdlab.config import TaskSettings
from kdlab.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DATA_LAYOUT",
    "DataError",
    "KINDS",
    "TASKS",
    "DataUnavailableError",
    "Encoded",
    "Example",
    "Task",
    "collate",
    "collate_prompts",
    "encode",
    "encode_prompt",
    "load_hub",
    "local_files",
    "register_kind",
    "register_task",
    "resolve_data_dir",
    "split_train_selection",
    "subset",
    "template_names",
    "transfer_subset",
]

DATA_ENV = "KDLAB_DATA_DIR"
DATA_LAYOUT = ("sst2/train.tsv", "sst2/validation.tsv", "squad/train-v1.1.json", "squad/dev-v1.1.json")
IGNORE_INDEX = -100
# A prompt that still overshoots after a cut is cut again by the overshoot; a few rounds always settle.
_FIT_ROUNDS = 8


class DataUnavailableError(DataError):
    """No local data folder was given and the Hugging Face hub could not provide the data."""


@dataclass(frozen=True)
class Example:
    id: str
    fields: dict[str, str]
    answers: tuple[str, ...] = ()
    label: int | None = None
    answer_start: int | None = None


@dataclass(frozen=True)
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------------------------------------------------
# data location


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data folder to read: the argument, else $KDLAB_DATA_DIR, else None (load from the hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV, "").strip()
    return Path(env).expanduser() if env else None


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: {what} not found; a kdlab data folder holds {', '.join(DATA_LAYOUT)}"
        )
    return path


def read_data_text(path: Path, what: str) -> str:
    """A data file's text; bytes that are not UTF-8 fail with the file, the offset and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        raise DataError(
            f"{path}: {what} is not UTF-8 text (byte 0x{bad} at offset {e.start}); re-save it as UTF-8"
        ) from None


def require_examples(examples: list[Example], source: str) -> list[Example]:
    """``examples``, refusing an empty dataset by name (an empty split would only fail later, unnamed)."""
    if not examples:
        raise DataError(f"{source}: no examples (empty dataset)")
    return examples


def shown(text: str, limit: int = 60) -> str:
    """A short repr of file content for an error message (a JSON file can be one huge line)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def load_hub(hub_id: str, split: str, config: str | None = None) -> Any:
    """``datasets.load_dataset(hub_id, config, split=split)``, turning any failure into a
    DataUnavailableError."""
    try:
        import datasets

        if config is not None:
            return datasets.load_dataset(hub_id, config, split=split)
        return datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, missing package, hub error: all mean "no data here"
        reason = (str(e).strip().splitlines() or [""])[0]  # one line: hub errors can span many
        raise DataUnavailableError(
            f"could not load {hub_id} (split {split!r}) from the Hugging Face hub "
            f"({type(e).__name__}: {reason}). Point kdlab at local files instead with --data-dir DIR or the "
            f"{DATA_ENV} environment variable, where DIR holds {', '.join(DATA_LAYOUT)}"
        ) from e


# ---------------------------------------------------------------------------------------------------------
# encoding


def _strip_added_eos(ids: list[int], prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # Some tokenizers append eos to every sequence; a prompt must not end the sequence before the answer.
    eos_id = tokenizer.eos_token_id
    eos = tokenizer.eos_token
    if eos_id is not None and ids and ids[-1] == eos_id and not (eos and prompt.rstrip().endswith(eos)):
        return ids[:-1]
    return ids


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Prompt ids exactly as training and evaluation feed them: special tokens added, no trailing eos."""
    return _strip_added_eos(list(tokenizer(prompt, add_special_tokens=True)["input_ids"]), prompt, tokenizer)


def encode_prompts(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """``encode_prompt`` for many prompts in one (fast, batched) tokenizer call."""
    if not prompts:
        return []
    batch = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return [_strip_added_eos(list(ids), p, tokenizer) for ids, p in zip(batch, prompts, strict=True)]


def target_ids(target: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Target tokens (no special tokens) followed by eos, so the model learns to stop."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; kdlab needs one to end the target")
    return [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def encode(
    task: Task,
    example: Example,
    prompt: str,
    tokenizer: PreTrainedTokenizerBase,
    target: str | None = None,
) -> Encoded | None:
    """Prompt + target (+ eos) with labels -100 on the prompt; None when longer than max_length (skip it).

    ``target`` overrides the gold target (e.g. a teacher's answer via ``task.answer_target``).
    """
    p_ids = encode_prompt(prompt, tokenizer)
    t_ids = target_ids(task.target_text(example) if target is None else target, tokenizer)
    if len(p_ids) + len(t_ids) > task.settings.max_length:
        return None
    return Encoded(id=example.id, input_ids=p_ids + t_ids, labels=[IGNORE_INDEX] * len(p_ids) + t_ids)


def _pad(rows: Sequence[Sequence[int]], value: int, width: int, side: str) -> list[list[int]]:
    if side == "right":
        return [list(r) + [value] * (width - len(r)) for r in rows]
    return [[value] * (width - len(r)) + list(r) for r in rows]


def _check_side(padding_side: str) -> None:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def collate(
    features: Sequence[Encoded],
    pad_id: int,
    *,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, Any]:
    """Pad a batch to its own longest sequence (never to max_length).

    Returns long tensors ``input_ids``, ``attention_mask``, ``labels`` and the list ``example_ids``. Padded
    positions get label -100 by position, so padding is never trained on even when pad_id == eos_id.
    """
    import torch

    if not features:
        raise ValueError("collate: empty batch")
    _check_side(padding_side)
    width = max(len(f.input_ids) for f in features)
    for f in features:
        if len(f.labels) != len(f.input_ids):
            raise ValueError(f"example {f.id!r}: {len(f.labels)} labels for {len(f.input_ids)} input ids")
    ids = _pad([f.input_ids for f in features], pad_id, width, padding_side)
    labels = _pad([f.labels for f in features], IGNORE_INDEX, width, padding_side)
    mask = _pad([[1] * len(f.input_ids) for f in features], 0, width, padding_side)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "example_ids": [f.id for f in features],
    }


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Any]:
    """Pad prompts for generation/scoring: left padding puts every prompt's end in the last column."""
    import torch

    if not prompt_ids:
        raise ValueError("collate_prompts: empty batch")
    _check_side(padding_side)
    width = max(len(p) for p in prompt_ids)
    return {
        "input_ids": torch.tensor(_pad(prompt_ids, pad_id, width, padding_side), dtype=torch.long),
        "attention_mask": torch.tensor(_pad([[1] * len(p) for p in prompt_ids], 0, width, padding_side),
                                       dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------------
# subsets


def _permutation(n: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(n), n)


def subset(examples: Sequence[Example], size: int | None, seed: int) -> list[Example]:
    """``size`` examples chosen by ``seed`` (None: all), kept in their original order.

    A larger size with the same seed contains the smaller one's examples.
    """
    if size is None:
        return list(examples)
    if size < 0 or size > len(examples):
        raise ValueError(f"subset size {size} is not possible: only {len(examples)} examples are available")
    keep = sorted(_permutation(len(examples), seed)[:size])
    return [examples[i] for i in keep]


def split_train_selection(
    examples: Sequence[Example],
    train_size: int | None,
    selection_size: int,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """Disjoint (train, selection) sets, each in original order.

    The selection set (held out to choose hyper-parameters) is the head of the seeded permutation, so it does
    not change with ``train_size``; the training set follows it (None: every remaining example).
    """
    n = len(examples)
    if selection_size < 0 or (train_size is not None and train_size < 0):
        raise ValueError("train_size and selection_size must be >= 0")
    need = selection_size + (train_size or 0)
    if need > n:
        raise ValueError(f"train_size + selection_size = {need} is not possible: "
                         f"only {n} examples are available")
    perm = _permutation(n, seed)
    sel = sorted(perm[:selection_size])
    rest = perm[selection_size:]
    train = sorted(rest if train_size is None else rest[:train_size])
    return [examples[i] for i in train], [examples[i] for i in sel]


def transfer_subset(
    examples: Sequence[Example],
    train_size: int | None,
    selection_size: int,
    transfer_size: int,
    seed: int,
) -> list[Example]:
    """The transfer set: ``transfer_size`` examples after the selection and training sets in the same seeded
    permutation as `split_train_selection`, so it is disjoint from both and does not move when only its own
    size changes. Its gold labels are never read (the teacher labels it)."""
    if transfer_size == 0:
        return []
    if train_size is None:
        raise ValueError("a transfer set needs a train_size: it is drawn from the rest of the training split")
    start = selection_size + train_size
    if start + transfer_size > len(examples):
        raise ValueError(f"train_size + selection_size + transfer_size = {start + transfer_size} is not "
                         f"possible: only {len(examples)} examples are available")
    perm = _permutation(len(examples), seed)
    return [examples[i] for i in sorted(perm[start:start + transfer_size])]


# ---------------------------------------------------------------------------------------------------------
# tasks


class Task(ABC):
    """One task: its data, prompt template and targets here; how it answers, is scored and writes its
    predictions in its kind (`ClassificationTask`, `GenerationTask`)."""

    name: ClassVar[str] = ""  # a built-in task's registry key; a task defined in YAML is named by its key
    kind: ClassVar[str]
    title: ClassVar[str] = ""  # how tables and figures name it ("": its name)
    settings_class: ClassVar[type[TaskSettings]]
    default_template: ClassVar[str]
    train_split: ClassVar[str] = "train"
    eval_split: ClassVar[str]
    # Fields the template may use (None: the data's columns, checked when it is loaded), and the one that is
    # cut when a prompt is too long.
    template_fields: ClassVar[frozenset[str] | None]
    long_field: ClassVar[str]
    template_setting: ClassVar[str] = "template"  # what the settings call the template, for messages

    def __init__(self, settings: TaskSettings | None = None, *, name: str | None = None):
        if settings is None:
            settings = self.settings_class()
        if not isinstance(settings, self.settings_class):
            raise TypeError(f"task {self.name or name!r} needs {self.settings_class.__name__}, "
                            f"got {type(settings).__name__}")
        self.name = name or type(self).name
        self.settings = settings
        self.template = settings.template or self.default_template
        self._check_template(self.template)

    @property
    def label(self) -> str:
        return self.title or self.name

    def _check_template(self, template: str) -> None:
        where = f"tasks.{self.name}.{self.template_setting}"
        names = template_names(template, where)
        unknown = names - self.template_fields if self.template_fields is not None else set()
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; "
                             f"allowed: {sorted(self.template_fields or ())}")
        if self.long_field not in names:
            raise ValueError(f"{where}: must contain {{{self.long_field}}}")

    # -- metrics ----------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def metrics(self) -> tuple[str, ...]:
        """The metrics `score` returns (percentages), the first the one grid settings are chosen on."""

    @property
    def metric(self) -> str:
        """The metric the best grid setting is chosen on."""
        return self.metrics[0]

    @property
    def paired_metrics(self) -> tuple[str, ...]:
        """The metrics that are means of per-example scores, so the report can compare systems pairwise."""
        return self.metrics

    @property
    @abstractmethod
    def per_example_note(self) -> str:
        """What a per-example score is, for the report ("correct x100")."""

    # -- data -------------------------------------------------------------------------------------------

    @abstractmethod
    def load(self, split: str, data_dir: str | Path | None = None) -> list[Example]:
        """All examples of a split (`train_split` or `eval_split`)."""

    @abstractmethod
    def read_references(self, path: str | Path) -> list[Example]:
        """Examples with gold answers from one file in the task's own format (for ``kdlab score``)."""

    def source(self, split: str, data_dir: str | Path | None = None) -> str:
        """Where ``split`` is read from, for messages ("in DIR", "on the hub", a file)."""
        folder = resolve_data_dir(data_dir)
        return f"in {folder}" if folder is not None else "on the hub"

    def data_files(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        """The local files the task reads (name -> path), for provenance; none when it reads the hub."""
        return {}

    # -- targets ----------------------------------------------------------------------------------------

    def target_text(self, ex: Example) -> str:
        """The gold target appended after the prompt (without eos)."""
        return self.answer_target(self.gold_answer(ex))

    @abstractmethod
    def answer_target(self, answer: str | int) -> str:
        """A predicted answer (e.g. a teacher's) as target text."""

    @abstractmethod
    def gold_answer(self, ex: Example) -> str:
        """The gold answer in the form predictions take (what `answer_target` accepts)."""

    # -- prompts ----------------------------------------------------------------------------------------

    def format_prompt(self, ex: Example, **override: str) -> str:
        return self.template.format(**{**ex.fields, **override})

    def prompt_budget(self, ex: Example, tokenizer: PreTrainedTokenizerBase, *, training: bool) -> int:
        """Tokens the prompt may use: max_length minus what follows it (target + eos, or the answer room)."""
        if training:
            return self.settings.max_length - len(target_ids(self.target_text(ex), tokenizer))
        return self.settings.max_length - self.eval_room(tokenizer)

    @abstractmethod
    def eval_room(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Tokens kept free after an evaluation prompt (the longest label / the generated answer)."""

    def cut_field(
        self,
        ex: Example,
        text: str,
        offsets: Sequence[tuple[int, int]],
        width: int,
        *,
        training: bool,
    ) -> str | None:
        """The long field cut to at most ``width`` of its tokens; None: skip the example.

        Default: training skips (a cut input may no longer match its label), evaluation keeps the head.
        """
        if training or width <= 0:
            return None
        return text[: offsets[min(width, len(offsets)) - 1][1]]

    def build_prompts(
        self,
        examples: Sequence[Example],
        tokenizer: PreTrainedTokenizerBase,
        *,
        training: bool,
    ) -> tuple[list[tuple[Example, str]], dict[str, int]]:
        """Template each example so that it fits max_length; returns kept pairs (input order) and counts.

        ``counts["truncated"]``: prompts whose long field was cut; ``counts["skipped"]``: examples dropped.
        """
        prompts = [self.format_prompt(ex) for ex in examples]
        lengths = [len(ids) for ids in encode_prompts(prompts, tokenizer)]
        kept: list[tuple[Example, str]] = []
        counts = {"truncated": 0, "skipped": 0}
        for ex, prompt, n in zip(examples, prompts, lengths, strict=True):
            budget = self.prompt_budget(ex, tokenizer, training=training)
            if n <= budget:
                kept.append((ex, prompt))
                continue
            fitted = self._fit(ex, tokenizer, budget, training=training)
            if fitted is None:
                counts["skipped"] += 1
            else:
                counts["truncated"] += 1
                kept.append((ex, fitted))
        return kept, counts

    def _fit(
        self, ex: Example, tokenizer: PreTrainedTokenizerBase, budget: int, *, training: bool
    ) -> str | None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("cutting a long prompt needs a fast tokenizer (offset mapping); "
                             f"{type(tokenizer).__name__} is not one")
        text = ex.fields[self.long_field]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        if not offsets:
            return None
        overhead = len(encode_prompt(self.format_prompt(ex, **{self.long_field: ""}), tokenizer))
        width = budget - overhead
        for _ in range(_FIT_ROUNDS):
            if width <= 0:
                return None
            cut = self.cut_field(ex, text, offsets, width, training=training)
            if cut is None:
                return None
            prompt = self.format_prompt(ex, **{self.long_field: cut})
            n = len(encode_prompt(prompt, tokenizer))
            if n <= budget:
                return prompt
            width -= n - budget
        return None

    # -- answering, scoring and prediction files (the kind's) -------------------------------------------

    def check(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise ValueError naming the setting when the task cannot work with this tokenizer."""
        return None

    @abstractmethod
    def answer(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[list[int]],
        *,
        batch_size: int,
        desc: str = "",
    ) -> list[Any]:
        """The model's answer to each encoded prompt, in the form predictions take."""

    def answer_tokens(self, answers: Sequence[Any], tokenizer: PreTrainedTokenizerBase) -> int:
        """Tokens the model produced for ``answers`` beyond the prompts (throughput counts them)."""
        return 0

    @abstractmethod
    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        """The task's metrics (percentages) of ``predictions`` (id -> prediction) over ``examples``."""

    @abstractmethod
    def per_example_scores(
        self, predictions: Mapping[str, Any], examples: Sequence[Example]
    ) -> dict[str, np.ndarray]:
        """Each of `paired_metrics` per example (x100, ``examples`` order; a missing prediction scores 0),
        whose means are what `score` reports."""

    @abstractmethod
    def predictions_file(self, split: str) -> str:
        """The file name of a split's predictions in a run folder."""

    @abstractmethod
    def read_predictions(self, path: str | Path) -> dict[str, Any]: ...

    @abstractmethod
    def write_predictions(self, predictions: Mapping[str, Any], path: str | Path) -> None: ...


TASKS: dict[str, type[Task]] = {}  # built-in tasks by name (sst2, squad)
KINDS: dict[str, type[Task]] = {}  # task kinds by name: what a task defined in YAML (`kind:`) is


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a built-in task (a class with its own data) to the registry."""
    TASKS[cls.name] = cls
    return cls


def register_kind(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task kind, which a YAML block names with `kind:`."""
    KINDS[cls.kind] = cls
    return cls


def local_files(task: str, data_dir: str | Path | None) -> dict[str, Path]:
    """A built-in task's files in the kdlab data folder (`DATA_LAYOUT`) that are there."""
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return {}
    return {f: folder / f for f in DATA_LAYOUT if f.startswith(task + "/") and (folder / f).is_file()}


def template_names(template: str, where: str) -> set[str]:
    """The fields a format string uses; ValueError naming `where` when it is not a format string."""
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"{where}: not a valid format string ({e}); "
                         "write literal braces as {{ }}") from None
