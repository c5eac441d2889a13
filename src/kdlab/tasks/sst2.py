"""SST-2 (GLUE): binary sentiment, scored by comparing the log-prob of each label word's first token."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdlab.config import SST2Settings
from kdlab.errors import DataError
from kdlab.metrics import accuracy
from kdlab.tasks.base import (
    Example,
    Task,
    atomic_write_text,
    load_hub,
    read_data_text,
    require_examples,
    require_file,
    resolve_data_dir,
    shown,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["SST2Task"]

HUB_ID = "stanfordnlp/sst2"


def read_tsv(path: Path, split: str) -> list[Example]:
    """An SST-2 ``sentence<TAB>label`` file; ids are ``{split}-{row}`` with 0-based data rows."""
    text = read_data_text(path, "SST-2 file")
    # The GLUE files are not CSV-quoted: QUOTE_NONE keeps a sentence's quote characters as text.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header != ["sentence", "label"]:
        got = "an empty file" if header is None else shown("\t".join(header))
        hint = " (a JSON file: SQuAD data belongs to the squad task)" if text.lstrip().startswith("{") else ""
        raise DataError(f"{path}: expected the GLUE SST-2 header 'sentence<TAB>label', got {got}{hint}")
    out: list[Example] = []
    for row_index, row in enumerate(reader):
        if len(row) != 2 or row[1] not in ("0", "1"):
            raise DataError(f"{path}: data row {row_index} is not 'sentence<TAB>0|1': {shown(repr(row))}")
        sentence = row[0].strip()  # some train rows carry a trailing space
        out.append(Example(id=f"{split}-{row_index}", fields={"sentence": sentence}, label=int(row[1])))
    return require_examples(out, str(path))


class SST2Task(Task):
    name: ClassVar[str] = "sst2"
    metric: ClassVar[str] = "accuracy"
    settings_class: ClassVar[type[SST2Settings]] = SST2Settings
    default_template: ClassVar[str] = "Review: {sentence}\nSentiment:"
    eval_split: ClassVar[str] = "validation"
    generative: ClassVar[bool] = False
    template_fields: ClassVar[frozenset[str]] = frozenset({"sentence"})
    long_field: ClassVar[str] = "sentence"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation")

    settings: SST2Settings

    # -- data -------------------------------------------------------------------------------------------

    def load(self, split: str, data_dir: str | Path | None = None) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"sst2: unknown split {split!r}; expected one of {list(self.splits)}")
        folder = resolve_data_dir(data_dir)
        if folder is not None:
            return read_tsv(require_file(folder / "sst2" / f"{split}.tsv", f"SST-2 {split} split"), split)
        rows = load_hub(HUB_ID, split)
        source = f"{HUB_ID} (split {split!r})"
        try:
            # Hub rows carry their GLUE row index in `idx`, the same number as the TSV data row.
            out = [Example(id=f"{split}-{int(r['idx'])}", fields={"sentence": str(r["sentence"]).strip()},
                           label=int(r["label"])) for r in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source}: rows need columns idx, sentence, label (0|1) ({type(e).__name__}: "
                            f"{e})") from None
        return require_examples(out, source)

    def read_references(self, path: str | Path) -> list[Example]:
        path = require_file(Path(path), "SST-2 reference file")
        # The split name in the ids comes from the file name (validation.tsv -> validation-0, ...).
        return read_tsv(path, path.stem)

    # -- targets ----------------------------------------------------------------------------------------

    def gold_answer(self, ex: Example) -> str:
        if ex.label is None:
            raise ValueError(f"sst2 example {ex.id!r} has no label")
        return str(ex.label)

    def answer_target(self, answer: str | int) -> str:
        label = int(answer)
        if label not in range(len(self.settings.label_words)):
            raise ValueError(f"sst2: label must be 0 or 1, got {answer!r}")
        return self.settings.label_words[label]

    def label_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """First token of each label word: the scorer compares these tokens' log-probs after the prompt."""
        ids: list[int] = []
        for word in self.settings.label_words:
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ValueError(f"tasks.sst2.label_words: {word!r} gives no token")
            ids.append(int(toks[0]))
        if len(set(ids)) != len(ids):
            raise ValueError(f"tasks.sst2.label_words {self.settings.label_words!r} share their first token "
                             f"({ids}); choose words that start with different tokens")
        return ids

    def eval_room(self) -> int:
        return 1  # one label token is scored after the prompt

    # -- scoring and prediction files -------------------------------------------------------------------

    def score(self, predictions: Mapping[str, Any], examples: Sequence[Example]) -> dict[str, float]:
        labels = {ex.id: ex.label for ex in examples if ex.label is not None}
        return accuracy(predictions, labels)

    def write_predictions(self, predictions: Mapping[str, Any], path: str | Path) -> None:
        lines = [json.dumps({"id": str(i), "label": int(label)}) for i, label in predictions.items()]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def read_predictions(self, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: SST-2 predictions file not found")
        out: dict[str, int] = {}
        for n, line in enumerate(read_data_text(path, "SST-2 predictions file").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, label = str(row["id"]), row["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON line "
                                f"{{\"id\": ..., \"label\": 0|1}} ({type(e).__name__}: {e})") from None
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{path}:{n}: label must be 0 or 1, got {label!r}")
            if key in out:
                raise DataError(f"{path}:{n}: duplicate id {key!r}")
            out[key] = label
        return out
