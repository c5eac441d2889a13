"""SQuAD v1.1: extractive QA posed generatively (greedy answer after the prompt), official EM / F1."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from kdlab.config import SquadSettings, TaskSettings
from kdlab.metrics import squad_scores
from kdlab.tasks.base import Example, Task, atomic_write_text, load_hub, require_file, resolve_data_dir

__all__ = ["SquadTask", "read_squad_json"]

HUB_ID = "rajpurkar/squad"
FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
HUB_SPLITS = {"train": "train", "dev": "validation"}
ALIASES = {"validation": "dev"}


def read_squad_json(path: Path) -> list[Example]:
    """Questions of an official SQuAD v1.1 JSON file (data -> paragraphs -> qas), in file order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        articles = data["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {e})") from None
    out: list[Example] = []
    for article in articles:
        title = str(article.get("title", ""))
        for para in article["paragraphs"]:
            context = para["context"]
            for qa in para["qas"]:
                answers = qa.get("answers", [])
                out.append(Example(
                    id=str(qa["id"]),
                    fields={"context": context, "question": qa["question"], "title": title},
                    answers=tuple(a["text"] for a in answers),
                    answer_start=int(answers[0]["answer_start"]) if answers else None,
                ))
    return out


class SquadTask(Task):
    name: ClassVar[str] = "squad"
    metric: ClassVar[str] = "f1"
    settings_class: ClassVar[type[SquadSettings]] = SquadSettings
    default_template: ClassVar[str] = "Context: {context}\nQuestion: {question}\nAnswer:"
    eval_split: ClassVar[str] = "dev"
    generative: ClassVar[bool] = True
    template_fields: ClassVar[frozenset[str]] = frozenset({"context", "question", "title"})
    long_field: ClassVar[str] = "context"
    splits: ClassVar[tuple[str, ...]] = ("train", "dev")

    settings: SquadSettings

    def __init__(self, settings: TaskSettings | None = None):
        super().__init__(settings)
        if self.settings.max_new_tokens >= self.settings.max_length:
            raise ValueError(f"tasks.squad.max_new_tokens ({self.settings.max_new_tokens}) leaves no room "
                             f"for the prompt within max_length ({self.settings.max_length})")

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
        out: list[Example] = []
        for r in rows:
            texts, starts = list(r["answers"]["text"]), list(r["answers"]["answer_start"])
            out.append(Example(
                id=str(r["id"]),
                fields={"context": r["context"], "question": r["question"], "title": str(r.get("title", ""))},
                answers=tuple(texts),
                answer_start=int(starts[0]) if starts else None,
            ))
        return out

    def read_references(self, path: str | Path) -> list[Example]:
        return read_squad_json(require_file(Path(path), "SQuAD v1.1 reference file"))

    # -- targets ----------------------------------------------------------------------------------------

    def gold_answer(self, ex: Example) -> str:
        if not ex.answers:
            raise ValueError(f"squad question {ex.id!r} has no gold answer")
        return ex.answers[0]

    def answer_target(self, answer: str | int) -> str:
        # One space after "Answer:", as a decoder would produce it; stray spaces in the data are dropped.
        return " " + str(answer).strip()

    def eval_room(self) -> int:
        return self.settings.max_new_tokens

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

    # -- scoring and prediction files -------------------------------------------------------------------

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        return squad_scores(predictions, {ex.id: ex.answers for ex in examples})

    def write_predictions(self, predictions: Mapping[str, Any], path: str | Path) -> None:
        # The official format: one JSON object {question id: answer text}.
        data = {str(k): str(v) for k, v in predictions.items()}
        atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=0) + "\n")

    def read_predictions(self, path: str | Path) -> dict[str, Any]:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected the official SQuAD predictions format, "
                             "one JSON object {\"question id\": \"answer text\"}")
        return data
