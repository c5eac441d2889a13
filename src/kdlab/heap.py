"""The import-time objects of a kdlab process, frozen out of the garbage collector's view.

A full garbage collection walks every tracked object alive. Once torch, transformers and peft are imported
that is about 450 000 objects (functions, classes, module dicts) and 0.19 s a collection on one CPU core, and
every run collects several times: the runner after the run, accelerate at the end of `Trainer.train`, the
evaluation after a vLLM engine. On a tiny study that was a third of its time. Those objects live as long as
the process, so freezing them (`gc.freeze`) loses nothing; objects made after the freeze (models, tensors,
data) are collected as before.

Only where kdlab owns the process: the CLI's commands that run a study (before their imports) and a Ray
worker's task. An object frozen is never freed through a reference cycle, so the Python API leaves its
caller's collector alone (a notebook's model, deleted later, must stay collectable).
"""

from __future__ import annotations

import gc

_frozen = False


def freeze_imports() -> None:
    """Once per process, before its first run: import the libraries every run loads, collect, and freeze what
    is alive then."""
    global _frozen
    if _frozen:
        return
    enabled = gc.isenabled()
    # Off while importing: the collector would otherwise walk the growing heap again and again (about 1 s
    # of a process's 5 s of imports).
    gc.disable()
    try:
        import peft  # noqa: F401  (with transformers' Trainer: the bulk of a run's imports)
        import torch  # noqa: F401
        from transformers import Trainer  # noqa: F401
    finally:
        if enabled:
            gc.enable()
    gc.collect()
    gc.freeze()
    _frozen = True
