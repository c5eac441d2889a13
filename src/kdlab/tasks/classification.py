"""Classification: the answer is one of a fixed set of labels, each a continuation of the prompt. The model's
answer is the label whose whole continuation gets the highest summed log-probability, as evaluation harnesses
score multiple choice, so labels of several tokens work. Metrics: accuracy and macro-F1.

A classification task on your own data needs no code, only a YAML block (see `tasks.data`):

    tickets:
      kind: classification
      data: {train: data/tickets.csv, eval: data/tickets_test.csv}
      text: "{subject}\\n{body}"
      label: category
      labels: {billing: " billing", outage: " outage", other: " other"}
      prompt: "Ticket: {text}\\nCategory:"
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from kdlab.errors import DataError
from kdlab.files import atomic_write_text
from kdlab.metrics import classification_scores
from kdlab.tasks.base import Example, Task, read_data_text, register_kind
from kdlab.tasks.data import DataFileTask, DataTaskSettings, Gold

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["ClassificationSettings", "ClassificationTask"]


class ClassificationSettings(DataTaskSettings):
    kind: Literal["classification"]
    label: str = Field("label", description="column of the gold label")
    labels: dict[str, str] = Field(
        ...,
        min_length=2,
        description="each label value of the data -> the text that follows the prompt for it (its "
        "continuation, usually with a leading space); the first is label 0 of predictions",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _label_values_as_text(cls, v: Any) -> Any:
        # YAML reads `{0: " no", 1: " yes"}` with integer keys; rows are matched on the values' text.
        return {str(k): val for k, val in v.items()} if isinstance(v, dict) else v


@register_kind
class ClassificationTask(DataFileTask, Task):
    kind: ClassVar[str] = "classification"
    settings_class: ClassVar[type[DataTaskSettings]] = ClassificationSettings
    default_template: ClassVar[str] = "{text}\nLabel:"
    labels_field: ClassVar[str] = "labels"  # the setting naming the labels, for messages

    settings: ClassificationSettings

    # -- labels -----------------------------------------------------------------------------------------

    @property
    def label_names(self) -> list[Any]:
        """How predictions files name each label (index i is the prediction i)."""
        return list(self.settings.labels)

    @property
    def continuations(self) -> list[str]:
        """The text that follows the prompt for each label (the target, and what is scored)."""
        return list(self.settings.labels.values())

    def choice_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Each label's continuation as tokens, encoded as training targets are (`target_ids` without eos)."""
        return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in self.continuations]

    def check(self, tokenizer: PreTrainedTokenizerBase) -> None:
        where = f"tasks.{self.name}.{self.labels_field}"
        ids = self.choice_ids(tokenizer)
        for text, toks in zip(self.continuations, ids, strict=True):
            if not toks:
                raise ValueError(f"{where}: {text!r} gives no token")
        for i, toks in enumerate(ids):
            if toks in ids[:i]:
                other = self.continuations[ids.index(toks)]
                raise ValueError(f"{where}: {other!r} and {self.continuations[i]!r} are the same tokens; "
                                 "give each label its own text")

    # -- metrics ----------------------------------------------------------------------------------------

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("accuracy", "macro_f1")

    @property
    def paired_metrics(self) -> tuple[str, ...]:
        return ("accuracy",)  # macro-F1 is no mean of per-example scores

    @property
    def per_example_note(self) -> str:
        return "correct x100"

    # -- data -------------------------------------------------------------------------------------------

    def gold_reader(self) -> Gold:
        labels = {value: i for i, value in enumerate(self.settings.labels)}
        column = self.settings.label

        def gold(row: Mapping[str, Any], where: str) -> dict[str, Any]:
            if column not in row:
                raise DataError(f"{where}: no label column {column!r} (columns: {list(row)})")
            value = str(row[column])
            if value not in labels:
                raise DataError(f"{where}: label {value!r} is not one of {list(labels)} "
                                f"(tasks.{self.name}.labels)")
            return {"label": labels[value]}

        return gold

    # -- targets ----------------------------------------------------------------------------------------

    def gold_answer(self, ex: Example) -> str:
        if ex.label is None:
            raise ValueError(f"{self.name} example {ex.id!r} has no label")
        return str(ex.label)

    def answer_target(self, answer: str | int) -> str:
        label = int(answer)
        if label not in range(len(self.continuations)):
            last = len(self.continuations) - 1
            raise ValueError(f"{self.name}: label must be one of 0..{last}, got {answer!r}")
        return self.continuations[label]

    def eval_room(self, tokenizer: PreTrainedTokenizerBase) -> int:
        return max(len(toks) for toks in self.choice_ids(tokenizer))  # the longest label is scored after it

    # -- answering and scoring --------------------------------------------------------------------------

    def answer(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[list[int]],
        *,
        batch_size: int,
        desc: str = "",
    ) -> list[Any]:
        from kdlab.evaluation import score_choices

        return score_choices(model, prompt_ids, self.choice_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                             batch_size=batch_size, desc=desc or f"{self.name} scoring")

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        labels = {ex.id: ex.label for ex in examples if ex.label is not None}
        return classification_scores(predictions, labels)

    def per_example_scores(
        self, predictions: Mapping[str, Any], examples: Sequence[Example]
    ) -> dict[str, np.ndarray]:
        return {"accuracy": np.array(
            [100.0 * (ex.id in predictions and int(predictions[ex.id]) == ex.label) for ex in examples]
        )}

    # -- prediction files: JSON lines {"id": ..., "label": <label name>} --------------------------------

    def predictions_file(self, split: str) -> str:
        return f"predictions_{split}.jsonl"

    def write_predictions(self, predictions: Mapping[str, Any], path: str | Path) -> None:
        names = self.label_names
        lines = [json.dumps({"id": str(i), "label": names[int(label)]}) for i, label in predictions.items()]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def read_predictions(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {self.label} predictions file not found")
        names = self.label_names
        shown = "|".join(json.dumps(n) for n in names)
        out: dict[str, int] = {}
        for n, line in enumerate(read_data_text(path, f"{self.label} predictions file").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, label = str(row["id"]), row["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON line "
                                f"{{\"id\": ..., \"label\": {shown}}} ({type(e).__name__}: {e})") from None
            if isinstance(label, bool) or label not in names:
                raise DataError(f"{path}:{n}: label must be {' or '.join(map(str, names))}, got {label!r}")
            if key in out:
                raise DataError(f"{path}:{n}: duplicate id {key!r}")
            out[key] = names.index(label)
        return out
