"""Generation: the answer is text the model writes greedily after the prompt (its first line), scored against
every gold answer with a metric: SQuAD's exact match and F1, exact match alone, or ROUGE-L.

A generation task on your own data needs no code, only a YAML block (see `tasks.data`):

    faq:
      kind: generation
      data: {train: data/faq.jsonl, eval: data/faq_test.jsonl}
      text: "{question}"
      answer: answer              # a column of text, or of lists of gold answers
      metric: rouge_l             # squad (EM and F1) | exact_match | rouge_l
      prompt: "Question: {text}\\nAnswer:"
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from kdlab.errors import DataError
from kdlab.files import atomic_write_text
from kdlab.metrics import ANSWER_METRICS, SHORT_NAMES, answer_scores
from kdlab.tasks.base import Example, Task, read_data_text, register_kind
from kdlab.tasks.data import DataFileTask, DataTaskSettings, Gold

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationSettings", "GenerationTask"]


class GenerationSettings(DataTaskSettings):
    kind: Literal["generation"]
    answer: str = Field("answer", description="column of the gold answer: text, or a list of gold answers")
    metric: Literal["squad", "exact_match", "rouge_l"] = Field(
        "squad",
        description="squad: SQuAD v1.1 exact match and F1; exact_match: SQuAD-normalised exact match; "
        "rouge_l: ROUGE-L F-measure. Each example counts its best gold answer",
    )
    max_new_tokens: int = Field(32, gt=0, description="longest answer generated, in tokens")

    @model_validator(mode="after")
    def _room_for_the_prompt(self) -> GenerationSettings:
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) leaves no room for the prompt within "
                             f"max_length ({self.max_length})")
        return self


@register_kind
class GenerationTask(DataFileTask, Task):
    kind: ClassVar[str] = "generation"
    settings_class: ClassVar[type[DataTaskSettings]] = GenerationSettings
    default_template: ClassVar[str] = "{text}\nAnswer:"

    settings: GenerationSettings

    @property
    def metric_name(self) -> str:
        """Which of `metrics.ANSWER_METRICS` scores the answers."""
        return self.settings.metric

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(ANSWER_METRICS[self.metric_name])

    @property
    def metric(self) -> str:
        return self.metrics[-1]  # SQuAD's F1 (the finer of its two); the one metric otherwise

    @property
    def per_example_note(self) -> str:
        names = " and ".join(SHORT_NAMES.get(m, m) for m in self.paired_metrics)
        return f"{names} x100, max over the gold answers"

    # -- data -------------------------------------------------------------------------------------------

    def gold_reader(self) -> Gold:
        column = self.settings.answer

        def gold(row: Mapping[str, Any], where: str) -> dict[str, Any]:
            if column not in row:
                raise DataError(f"{where}: no answer column {column!r} (columns: {list(row)})")
            value = row[column]
            answers = [str(a) for a in value] if isinstance(value, list | tuple) else [str(value)]
            answers = [a for a in answers if a.strip()]
            if not answers:
                raise DataError(f"{where}: no gold answer in column {column!r}")
            return {"answers": tuple(answers)}

        return gold

    # -- targets ----------------------------------------------------------------------------------------

    def gold_answer(self, ex: Example) -> str:
        if not ex.answers:
            raise ValueError(f"{self.name} example {ex.id!r} has no gold answer")
        return ex.answers[0]

    def answer_target(self, answer: str | int) -> str:
        # One space after the prompt, as a decoder would produce it; stray spaces in the data are dropped.
        return " " + str(answer).strip()

    def eval_room(self, tokenizer: PreTrainedTokenizerBase) -> int:
        return self.settings.max_new_tokens

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
        from kdlab.evaluation import generate_answers

        return generate_answers(model, tokenizer, prompt_ids, max_new_tokens=self.settings.max_new_tokens,
                                batch_size=batch_size, desc=desc or f"{self.name} generation")

    def answer_tokens(self, answers: Sequence[Any], tokenizer: PreTrainedTokenizerBase) -> int:
        # The answer re-encoded, plus the token that stopped it.
        return sum(len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) + 1 for a in answers)

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        scores = answer_scores(predictions, {ex.id: ex.answers for ex in examples},
                               ANSWER_METRICS[self.metric_name])
        return {m: scores[m] for m in self.metrics}

    def per_example_scores(
        self, predictions: Mapping[str, Any], examples: Sequence[Example]
    ) -> dict[str, np.ndarray]:
        functions = ANSWER_METRICS[self.metric_name]
        out: dict[str, list[float]] = {m: [] for m in self.metrics}
        for ex in examples:
            pred = predictions.get(ex.id)
            for m in self.metrics:
                missing = pred is None or not ex.answers
                out[m].append(0.0 if missing else 100.0 * max(functions[m](str(pred), g) for g in ex.answers))
        return {m: np.array(v) for m, v in out.items()}

    # -- prediction files: one JSON object {example id: answer text}, SQuAD's official format ----------

    def predictions_file(self, split: str) -> str:
        return f"predictions_{split}.json"

    def write_predictions(self, predictions: Mapping[str, Any], path: str | Path) -> None:
        data = {str(k): str(v) for k, v in predictions.items()}
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=0) + "\n")

    def read_predictions(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {self.label} predictions file not found")
        text = read_data_text(path, f"{self.label} predictions file")
        try:
            data = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(f"{path}: expected one JSON object {{\"example id\": \"answer text\"}} (the "
                            "official SQuAD predictions format)")
        return data
