"""SQuAD v1.1: extractive QA posed generatively (greedy answer after the prompt), official EM / F1."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from kdlab.config import TaskSettings
from kdlab.errors import DataError
from kdlab.tasks.base import (
    Example,
    Task,
    load_hub,
    local_files,
    read_data_text,
    register_task,
    require_examples,
    require_file,
    resolve_data_dir,
)
from kdlab.tasks.generation import GenerationTask

__all__ = ["SquadSettings", "SquadTask", "read_squad_json"]

HUB_ID = "rajpurkar/squad"
FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
HUB_SPLITS = {"train": "train", "dev": "validation"}
ALIASES = {"validation": "dev"}


def _field(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where} has no {key!r} field")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "text", list: "a list", int: "an integer", dict: "an object"}[k] for k in kinds)


def read_squad_json(path: Path) -> list[Example]:
    """Questions of an official SQuAD v1.1 JSON file (data -> paragraphs -> qas), in file order.

    Every field kdlab reads is checked here, so a malformed file fails when it is loaded, naming the file,
    the question and the field (every question needs gold answers: training and scoring both read them).
    """
    text = read_data_text(path, "SQuAD file")
    try:
        data = json.loads(text)
    except ValueError as e:
        hint = " (a TSV file: SST-2 data belongs to the sst2 task)" if "\t" in text[:200] else ""
        raise DataError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {e}){hint}") from None
    articles = _field(data, "data", list, f"{path}: not a SQuAD v1.1 JSON file: the top level")
    out: list[Example] = []
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        for p, para in enumerate(_field(article, "paragraphs", list, where)):
            context = _field(para, "context", str, f"{where}.paragraphs[{p}]")
            for q, qa in enumerate(_field(para, "qas", list, f"{where}.paragraphs[{p}]")):
                loc = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid = str(_field(qa, "id", (str, int), f"{path}: {loc}"))
                qwhere = f"{path}: question {qid!r} ({loc})"
                question = _field(qa, "question", str, qwhere)
                answers = _field(qa, "answers", list, qwhere)
                if not answers:
                    raise DataError(f"{qwhere} has an empty 'answers' list (SQuAD v1.1 needs gold answers)")
                texts = [_field(ans, "text", str, f"{qwhere} answers[{i}]") for i, ans in enumerate(answers)]
                start = answers[0].get("answer_start")
                start = start if isinstance(start, int) and not isinstance(start, bool) else None
                out.append(Example(
                    id=qid,
                    fields={"context": context, "question": question, "title": title},
                    answers=tuple(texts),
                    answer_start=start,
                ))
    return require_examples(out, str(path))


class SquadSettings(TaskSettings):
    train_split_size: ClassVar[int | None] = 87599
    eval_split_size: ClassVar[int | None] = 10570
    max_length: int = Field(384, gt=8)
    max_new_tokens: int = Field(32, gt=0)


@register_task
class SquadTask(GenerationTask):
    name: ClassVar[str] = "squad"
    title: ClassVar[str] = "SQuAD"
    settings_class: ClassVar[type[TaskSettings]] = SquadSettings
    default_template: ClassVar[str] = "Context: {context}\nQuestion: {question}\nAnswer:"
    eval_split: ClassVar[str] = "dev"
    template_fields: ClassVar[frozenset[str] | None] = frozenset({"context", "question", "title"})
    template_setting: ClassVar[str] = "template"
    long_field: ClassVar[str] = "context"
    splits: ClassVar[tuple[str, ...]] = ("train", "dev")

    settings: SquadSettings

    def __init__(self, settings: TaskSettings | None = None, *, name: str | None = None):
        super().__init__(settings, name=name)
        if self.settings.max_new_tokens >= self.settings.max_length:
            raise ValueError(f"tasks.squad.max_new_tokens ({self.settings.max_new_tokens}) leaves no room "
                             f"for the prompt within max_length ({self.settings.max_length})")

    @property
    def metric_name(self) -> str:
        return "squad"

    # -- data -------------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None) -> list[Example]:
        split = ALIASES.get(split, split)
        if split not in self.splits:
            raise ValueError(f"squad: unknown split {split!r}; expected one of {list(self.splits)} "
                             "('validation' is accepted for dev)")
        folder = resolve_data_dir(data_dir)
        if folder is not None:
            return read_squad_json(require_file(folder / "squad" / FILES[split], f"SQuAD v1.1 {split} split"))
        rows = load_hub(HUB_ID, HUB_SPLITS[split])
        source = f"{HUB_ID} (split {HUB_SPLITS[split]!r})"
        out: list[Example] = []
        try:
            for r in rows:
                texts, starts = list(r["answers"]["text"]), list(r["answers"]["answer_start"])
                if not texts:
                    raise DataError(f"{source}: question {r['id']!r} has no gold answer")
                out.append(Example(
                    id=str(r["id"]),
                    fields={"context": r["context"], "question": r["question"],
                            "title": str(r.get("title", ""))},
                    answers=tuple(texts),
                    answer_start=int(starts[0]) if starts else None,
                ))
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: rows need columns id, context, question, answers.text, "
                            f"answers.answer_start ({type(e).__name__}: {e})") from None
        return require_examples(out, source)

    def read_references(self, path: str | Path) -> list[Example]:
        return read_squad_json(require_file(Path(path), "SQuAD v1.1 reference file"))

    def source(self, split: str, data_dir: str | Path | None = None) -> str:
        return Task.source(self, split, data_dir)

    def data_files(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        return local_files(self.name, data_dir)

    # -- training windows -------------------------------------------------------------------------------

    def cut_field(
        self,
        ex: Example,
        text: str,
        offsets: Sequence[tuple[int, int]],
        width: int,
        *,
        training: bool,
    ) -> str | None:
        """Training: a window of ``width`` context tokens centred on the answer; evaluation: the head."""
        if not training:
            return super().cut_field(ex, text, offsets, width, training=False)
        if not ex.answers or ex.answer_start is None:
            return None
        start, answer = ex.answer_start, ex.answers[0]
        end = start + len(answer)
        if not answer or text[start:end] != answer:
            return None  # the answer is not where answer_start says: no window can be trusted to hold it
        # Tokens overlapping the answer's characters.
        covering = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        if not covering:
            return None
        first, last = covering[0], covering[-1]
        span = last - first + 1
        if span > width:
            return None
        lo = max(0, min(first - (width - span) // 2, len(offsets) - width))
        hi = min(len(offsets), lo + width) - 1
        cut_start, cut_end = offsets[lo][0], offsets[hi][1]
        return text[cut_start:cut_end].strip()
