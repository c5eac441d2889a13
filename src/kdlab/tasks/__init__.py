"""Task registry: name -> Task class, matching the task sections of a study config."""

from __future__ import annotations

from kdlab.config import TaskSettings
from kdlab.tasks.base import (
    DataUnavailableError,
    Encoded,
    Example,
    Task,
    collate,
    collate_prompts,
    encode,
    encode_prompt,
    resolve_data_dir,
    split_train_selection,
    subset,
)
from kdlab.tasks.squad import SquadTask
from kdlab.tasks.sst2 import SST2Task

__all__ = [
    "TASKS",
    "DataUnavailableError",
    "Encoded",
    "Example",
    "SST2Task",
    "SquadTask",
    "Task",
    "collate",
    "collate_prompts",
    "encode",
    "encode_prompt",
    "get_task",
    "resolve_data_dir",
    "split_train_selection",
    "subset",
]

TASKS: dict[str, type[Task]] = {"sst2": SST2Task, "squad": SquadTask}


def get_task(name: str, settings: TaskSettings | None = None) -> Task:
    """The task called ``name`` with its settings (None: the task's defaults)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
    return cls(settings)
