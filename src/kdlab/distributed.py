"""Rank coordination for a study launched with several processes (`accelerate launch`, `torchrun`).

Every rank walks the same sequence of stages and runs. Rank 0 (the leader) alone talks to the registry,
evaluates, builds caches and writes files; it decides whether each run goes ahead and shares the decision,
so all ranks enter a training run together (the Trainer then shards the batches across them) and none
waits on a collective the others skipped. With one process every call here is a no-op.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel


def hide_gpus_from_cpu_study(device: str) -> None:
    """A `device: cpu` command hides the machine's GPUs from this process (before CUDA starts), since torch
    itself still reaches for a visible GPU (pinned memory, the optimizer's stream queries) and a multi-rank
    CPU launch then fails in the GPU driver. The CLI calls this; the Python API leaves the environment to
    its caller."""
    if device == "cpu" and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


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


def fsdp_launch_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with an FSDP config sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def reset_accelerator_state() -> None:
    """Forget the previous Trainer's accelerate state (the process group stays), so that each run's own
    settings decide FSDP or DDP: accelerate keeps the first Accelerator's choice for the whole process, so a
    run with `fsdp` after one without (a teacher adaptation, say) would silently train with DDP."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


@contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """While a Trainer builds its Accelerator: a multi-process CPU state that was handed an FSDP plugin
    becomes an FSDP state.

    accelerate (1.15) enables FSDP on accelerators only; on CPUs it keeps MULTI_CPU and the Trainer wraps
    the model in DDP instead, silently. torch's FSDP2 runs on CPUs over gloo, and everything after the state
    (fsdp2_prepare_model, the FSDP checkpoint functions, get_state_dict) works there, so this is what lets
    a CPU launch (tests, debugging) shard for real. Only FSDP2: FSDP1 on CPUs needs a device for
    `sync_module_states` in accelerate.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if fsdp_plugin.fsdp_version != 2:
                raise ValueError("FSDP on CPUs needs FSDP2 (fsdp_version: 2)")
            # Both shared states, as accelerate itself records it: a later AcceleratorState() copies the
            # PartialState's type over its own.
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        AcceleratorState.__init__ = original  # type: ignore[method-assign]


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose parameters live on the meta device (no memory): the shape an FSDP-trained
    module is gathered back into, since FSDP shards the original in place. Buffers are copied for real,
    as the non-persistent ones (rotary frequencies) are in no state dict."""
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    return copy.deepcopy(module, memo)


def load_gathered(skeleton: torch.nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill a `meta_skeleton` with a full state dict (the gathered FSDP weights) and move it to `device`.
    Weights the state dict lists once for two tied names are tied again."""
    result = skeleton.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"gathered weights do not fit the model (unexpected {result.unexpected_keys[:3]})")
    for module in skeleton.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()  # assign=True gave each tied name its own tensor
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"gathered weights miss {left[:3]}")
    skeleton.to(device)


def shard_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen model (the live teacher) with FSDP2 over every rank: each block (the model's
    `_no_split_modules`) is gathered for its forward and freed after it, then the rest as the root. Every
    rank must then call its forward together, as the training loop does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no blocks (_no_split_modules) to shard")
    # On the teacher's own device type: FSDP2's default mesh is on CUDA whenever a GPU is visible.
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model
