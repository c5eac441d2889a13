"""SST-2 (GLUE): binary sentiment, a classification task read from the GLUE TSV files or the hub."""

from __future__ import annotations

import csv
import io
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
    shown,
)
from kdlab.tasks.classification import ClassificationTask

__all__ = ["SST2Settings", "SST2Task"]

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


class SST2Settings(TaskSettings):
    train_split_size: ClassVar[int | None] = 67349
    eval_split_size: ClassVar[int | None] = 872
    label_words: list[str] = Field(
        default_factory=lambda: [" negative", " positive"], min_length=2, max_length=2
    )


@register_task
class SST2Task(ClassificationTask):
    name: ClassVar[str] = "sst2"
    title: ClassVar[str] = "SST-2"
    settings_class: ClassVar[type[TaskSettings]] = SST2Settings
    default_template: ClassVar[str] = "Review: {sentence}\nSentiment:"
    eval_split: ClassVar[str] = "validation"
    template_fields: ClassVar[frozenset[str] | None] = frozenset({"sentence"})
    template_setting: ClassVar[str] = "template"
    long_field: ClassVar[str] = "sentence"
    labels_field: ClassVar[str] = "label_words"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation")

    settings: SST2Settings

    @property
    def label_names(self) -> list[Any]:
        return list(range(len(self.settings.label_words)))  # GLUE's 0 (negative) and 1 (positive)

    @property
    def continuations(self) -> list[str]:
        return list(self.settings.label_words)

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

    def source(self, split: str, data_dir: str | Path | None = None) -> str:
        return Task.source(self, split, data_dir)

    def data_files(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        return local_files(self.name, data_dir)
