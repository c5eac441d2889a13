"""Your own data: the settings every task defined in YAML alone shares, and reading its rows (CSV, TSV, JSON
lines, Parquet, or a hub dataset split) through `datasets`.

    tasks:
      tickets:
        kind: classification                                          # or generation
        data: {train: data/tickets.csv, eval: data/tickets_test.csv}  # or {hub: ORG/NAME, split: S}
        text: "{subject}\\n{body}"                                     # the prompt's {text}, from columns
        prompt: "Ticket: {text}\\nCategory:"

Relative file paths are read from the working directory. Example ids are the `id:` column's values, else
`<split>-<row>` (0-based data rows), so subsets stay the same when the file is read again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from kdlab.config import Strict, TaskSettings
from kdlab.errors import DataError
from kdlab.models import cache_root
from kdlab.tasks.base import Example, load_hub, require_examples, template_names

Gold = Callable[[Mapping[str, Any], str], dict[str, Any]]  # a row and where it is -> Example keywords

__all__ = ["DataFileTask", "DataFiles", "DataTaskSettings", "HubData", "read_examples", "source_name"]

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class HubData(Strict):
    hub: str = Field(..., description="dataset id on the Hugging Face hub (ORG/NAME)")
    split: str = Field(..., description="the dataset's split to read (train, test, validation, ...)")
    config: str | None = Field(None, description="the dataset's configuration, if it has several")


class DataFiles(Strict):
    train: str | HubData = Field(..., description="training rows: a data file (.csv, .tsv, .jsonl, .parquet) "
                                 "or a hub split")
    eval: str | HubData = Field(..., description="evaluation rows, reported on")


class DataTaskSettings(TaskSettings):
    """What every task defined in YAML alone has besides the common sizes."""

    # Sizes are known once the data is read: preflight checks them against the files.
    train_split_size: ClassVar[int | None] = None
    eval_split_size: ClassVar[int | None] = None

    data: DataFiles
    text: str = Field("{text}", description="the prompt's {text} field, a template over the data's columns")
    id: str | None = Field(None, description="column of stable example ids (default: <split>-<row>)")
    template: str | None = Field(None, alias="prompt", description="the prompt, a template over {text} and "
                                 "the data's columns; the answer follows it")


def source_name(source: str | HubData) -> str:
    if isinstance(source, HubData):
        config = f", config {source.config!r}" if source.config else ""
        return f"{source.hub} (split {source.split!r}{config})"
    return source


def _read_rows(source: str | HubData, cache_dir: Path) -> list[dict[str, Any]]:
    """Every row of a data file or hub split, through `datasets` (its Arrow cache under `cache_dir`)."""
    if isinstance(source, HubData):
        return list(load_hub(source.hub, source.split, config=source.config))
    path = Path(source).expanduser()
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {', '.join(FORMATS)}, or "
                        "{hub: ORG/NAME, split: SPLIT} for a hub dataset")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found (relative paths are read from {Path.cwd()})")
    import datasets

    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        rows = datasets.load_dataset(kind, data_files=str(path.resolve()), split="train",
                                     cache_dir=str(cache_dir), **options)
    except Exception as e:  # unreadable or malformed: one line naming the file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read it as {kind} ({type(e).__name__}: {reason})") from None
    return list(rows)


def read_examples(
    source: str | HubData,
    split: str,
    settings: DataTaskSettings,
    prompt_fields: set[str],
    gold: Gold,
    cache_dir: Path,
) -> list[Example]:
    """The examples of one split: `settings.text` formatted from each row's columns, the other columns the
    prompt names kept as fields, the gold answer from `gold(row, where)` (Example keyword arguments)."""
    name = source_name(source)
    rows = _read_rows(source, cache_dir)
    require_examples(rows, name)
    columns = list(rows[0])
    needed = (template_names(settings.text, "text") | (prompt_fields - {"text"}))
    if settings.id is not None:
        needed.add(settings.id)
    missing = sorted(needed - set(columns))
    if missing:
        raise DataError(f"{name}: no column(s) {missing} (columns: {columns}); the task's text, prompt and "
                        "id name columns")
    out: list[Example] = []
    seen: set[str] = set()
    for row_index, row in enumerate(rows):
        where = f"{name}: data row {row_index}"
        key = f"{split}-{row_index}" if settings.id is None else str(row[settings.id])
        if key in seen:
            raise DataError(f"{where}: duplicate id {key!r} (column {settings.id!r})")
        seen.add(key)
        values = {c: "" if v is None else str(v) for c, v in row.items()}
        fields = {c: values[c] for c in prompt_fields - {"text"}}
        fields["text"] = settings.text.format(**values).strip()
        out.append(Example(id=key, fields=fields, **gold(row, where)))
    return out


class DataFileTask:
    """What a task kind does with the data of a YAML block (`DataTaskSettings`): its train and eval rows, read
    with `read_examples`. A kind mixes this in before `Task` and says how a row gives its gold answer
    (`gold_reader`); a task with its own file format (sst2.py, squad.py) overrides these methods."""

    eval_split: ClassVar[str] = "eval"
    template_fields: ClassVar[frozenset[str] | None] = None  # any column of the data
    long_field: ClassVar[str] = "text"
    template_setting: ClassVar[str] = "prompt"

    name: str
    template: str
    train_split: ClassVar[str]
    settings: DataTaskSettings

    def gold_reader(self) -> Gold:
        """The function that reads a row's gold answer as Example keyword arguments, or raises DataError."""
        raise NotImplementedError

    def _source(self, split: str) -> str | HubData:
        if split not in (self.train_split, self.eval_split):
            raise ValueError(f"{self.name}: unknown split {split!r}; expected {self.train_split} or "
                             f"{self.eval_split}")
        return self.settings.data.train if split == self.train_split else self.settings.data.eval

    def _read(self, source: str | HubData, split: str) -> list[Example]:
        fields = template_names(self.template, f"tasks.{self.name}.prompt")
        datasets_cache = cache_root() / "datasets"
        return read_examples(source, split, self.settings, fields, self.gold_reader(), datasets_cache)

    def load(self, split: str, data_dir: str | Path | None = None) -> list[Example]:
        return self._read(self._source(split), split)

    def read_references(self, path: str | Path) -> list[Example]:
        return self._read(str(path), Path(path).stem)

    def source(self, split: str, data_dir: str | Path | None = None) -> str:
        return f"in {source_name(self._source(split))}"

    def data_files(self, data_dir: str | Path | None = None) -> dict[str, Path]:
        files = (self.settings.data.train, self.settings.data.eval)
        return {f: Path(f).expanduser() for f in files if isinstance(f, str)}
