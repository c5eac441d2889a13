"""Task registry: the built-in tasks by name (sst2, squad) and the task kinds (classification, generation)
that a task defined in the study YAML alone names with `kind:`."""

from __future__ import annotations

from typing import Any

from kdlab.config import TaskSettings
from kdlab.tasks.base import (
    KINDS,
    TASKS,
    DataUnavailableError,
    Encoded,
    Example,
    Task,
    collate,
    collate_prompts,
    encode,
    encode_prompt,
    register_kind,
    register_task,
    resolve_data_dir,
    split_train_selection,
    subset,
)
from kdlab.tasks.classification import ClassificationSettings, ClassificationTask
from kdlab.tasks.generation import GenerationSettings, GenerationTask
from kdlab.tasks.squad import SquadSettings, SquadTask
from kdlab.tasks.sst2 import SST2Settings, SST2Task

__all__ = [
    "KINDS",
    "TASKS",
    "ClassificationSettings",
    "ClassificationTask",
    "DataUnavailableError",
    "Encoded",
    "Example",
    "GenerationSettings",
    "GenerationTask",
    "SST2Settings",
    "SST2Task",
    "SquadSettings",
    "SquadTask",
    "Task",
    "collate",
    "collate_prompts",
    "encode",
    "encode_prompt",
    "get_task",
    "register_kind",
    "register_task",
    "resolve_data_dir",
    "settings_class",
    "split_train_selection",
    "subset",
]


def settings_class(name: str, body: Any) -> type[TaskSettings]:
    """The settings model of the `tasks.<name>` section: its kind's when it names one, else the built-in
    task's."""
    kind = body.get("kind") if isinstance(body, dict) else getattr(body, "kind", None)
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"tasks.{name}.kind: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
        return KINDS[kind].settings_class
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}, or a task of your own "
                         f"data with `kind:` ({', '.join(sorted(KINDS))})")
    return TASKS[name].settings_class


def get_task(name: str, settings: TaskSettings | None = None) -> Task:
    """The task called `name` with its settings (None: a built-in task's defaults)."""
    kind = getattr(settings, "kind", None)
    if kind is not None:
        return KINDS[kind](settings, name=name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](settings)
