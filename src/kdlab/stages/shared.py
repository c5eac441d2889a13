"""The study as its stages see it: what `Study` (the recipe, `kdlab.study`) shares with the stage modules,
the preflight, the bench and the Ray driver.

Stages are typed against this protocol, not against `Study`, so the recipe imports its stages and no stage
imports the recipe (tests/test_imports.py keeps the package free of import cycles). What a stage may read
is listed here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kdlab.config import StudentSettings, StudyConfig
    from kdlab.distributed import Ranks
    from kdlab.evaluation import GenerationOptions
    from kdlab.layout import Layout
    from kdlab.methods import Signals
    from kdlab.plan import Plan
    from kdlab.registry import Registry
    from kdlab.runner import Runner
    from kdlab.stages.data import TaskData


class StudyView(Protocol):
    config: StudyConfig
    out: Path
    layout: Layout
    data_dir: str | Path | None
    device: Any  # torch.device
    ranks: Ranks
    runner: Runner
    registry: Registry | None
    force: bool
    rebuild_cache: bool

    @property
    def plan(self) -> Plan: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def base_teacher_path(self) -> str: ...

    def data(self, name: str) -> TaskData: ...

    def teacher_path(self, task: str) -> str: ...

    def initial_weights(self, student: StudentSettings) -> str: ...

    def layer_pairs(self, student: StudentSettings, layer_map: Any, method: str) -> list[tuple[int, int]]: ...

    def grid_signals(self, method: str) -> list[Signals]: ...

    def generation(self, model_path: str | None) -> GenerationOptions: ...

    def seed(self, stage: str, run_seed: int | None = None) -> int: ...

    def command(self, name: str, *flags: str) -> str: ...

    def log(self, text: str) -> None: ...

    def provenance(self) -> dict[str, Any]: ...
