"""Rank coordination for a study launched with several processes (`accelerate launch`, `torchrun`).

Every rank walks the same sequence of stages and runs. Rank 0 (the leader) alone talks to the registry,
evaluates, builds caches and writes files; it decides whether each run goes ahead and shares the decision,
so all ranks enter a training run together (the Trainer then shards the batches across them) and none
waits on a collective the others skipped. With one process every call here is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Ranks:
    def __init__(self, *, cpu: bool = False) -> None:
        self.size = world_size()
        self.rank = 0
        self.device: torch.device | None = None
        self._state = None
        if self.size > 1:
            from accelerate import PartialState

            # Joins the process group (NCCL on GPUs; on CPUs accelerate needs cpu=True to use gloo).
            self._state = PartialState(cpu=cpu)
            self.rank = self._state.process_index
            self.device = self._state.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def share(self, value: Any) -> Any:
        """The leader's `value`, on every rank."""
        if self._state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, on every rank (in rank order)."""
        if self._state is None:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])
