"""The data stage: each task's train / selection / transfer / eval subsets, drawn from its splits by
`data_seed`, and the training examples encoded once for every run (data/<task>.json lists the ids)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from kdlab.config import TaskSettings
from kdlab.tasks.base import Encoded, Example, Task, encode, split_train_selection, subset, transfer_subset


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    selection: list[Example]
    eval: list[Example]
    transfer: list[Example]  # training inputs without gold labels: only the KD losses use them
    prompts: dict[str, str]  # training prompts by example id
    encoded: dict[str, Encoded]  # gold training encodings by example id
    counts: dict[str, int]  # prompts truncated, examples skipped (too long)

    def manifest(self, data_seed: int) -> dict[str, Any]:
        """data/<task>.json: which examples every stage used (the report reads the eval ids back)."""
        return {
            "task": self.task.name,
            "data_seed": data_seed,
            "counts": self.counts,
            "train": [e.id for e in self.train],
            "selection": [e.id for e in self.selection],
            "eval": [e.id for e in self.eval],
            "transfer": [e.id for e in self.transfer],
        }

    def summary(self) -> str:
        truncated, skipped = self.counts.get("truncated", 0), self.counts.get("skipped", 0)
        return (
            f"[data] {self.task.name}: train {len(self.encoded)} (truncated {truncated}, skipped {skipped}), "
            f"selection {len(self.selection)}, eval {len(self.eval)}"
            + (f", transfer {len(self.transfer)}" if self.transfer else "")
        )


def load_task_data(
    task: Task,
    settings: TaskSettings,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | Path | None,
    data_seed: int,
) -> TaskData:
    """Subsets (the selection split held out of the training split, the transfer set after both) and the
    gold training encodings, with training prompts fitted to max_length."""
    pool = task.load(task.train_split, data_dir)
    train, selection = split_train_selection(pool, settings.train_size, settings.selection_size, data_seed)
    transfer = transfer_subset(
        pool, settings.train_size, settings.selection_size, settings.transfer_size, data_seed
    )
    evaluation = subset(task.load(task.eval_split, data_dir), settings.eval_size, data_seed)
    pairs, counts = task.build_prompts(train, tokenizer, training=True)
    prompts = {ex.id: p for ex, p in pairs}
    encoded = {}
    for ex, p in pairs:
        enc = encode(task, ex, p, tokenizer)
        if enc is None:
            counts["skipped"] = counts.get("skipped", 0) + 1
        else:
            encoded[ex.id] = enc
    return TaskData(task, train, selection, evaluation, transfer, prompts, encoded, counts)
