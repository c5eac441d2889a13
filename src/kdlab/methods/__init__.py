"""The method registry: every module of this package defines one method (sft, kd1, kd2, kd3, ...); modules
named in a study's `plugins:` add more.

A new method is one module holding a `Method` subclass decorated with `@register`:

    from kdlab.methods import LossInputs, Method, MixedSettings, Signals, register, task_ce

    @register
    class TopOne(Method):
        name = "top1"                       # the key under `methods:` and the first part of run ids
        settings = MixedSettings            # grid axes: lambda
        def signals(self, params):          # what a run reads from the teacher (cached or live)
            return Signals(top_k=1, temperature=1.0)
        def loss(self, x: LossInputs):
            ...
"""

from __future__ import annotations

import importlib
import pkgutil

from kdlab.methods.base import (
    METHODS,
    POLICY,
    ROLLOUT_STEP,
    TEACHER_ANSWER,
    Label,
    LossInputs,
    LossParts,
    Method,
    MethodSettings,
    MixedSettings,
    Rollout,
    Signals,
    TeacherBatch,
    register,
    task_ce,
)

__all__ = [
    "METHODS",
    "POLICY",
    "ROLLOUT_STEP",
    "TEACHER_ANSWER",
    "Label",
    "LossInputs",
    "LossParts",
    "Method",
    "MethodSettings",
    "MixedSettings",
    "Rollout",
    "Signals",
    "TeacherBatch",
    "baseline",
    "get_method",
    "register",
    "task_ce",
]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)} (a method of another "
                         "package is named under `plugins:`)")
    return METHODS[name]


def baseline() -> Method:
    """The method the report compares every other with (SFT); teachers are adapted with it too."""
    return next(m for m in METHODS.values() if m.baseline)


def _register_package_methods() -> None:
    # The built-ins in table order, then any other module dropped into this package.
    first = ("sft", "kd1", "kd2", "kd3", "gkd", "opd")
    found = [m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    for name in [*first, *sorted(set(found) - set(first))]:
        importlib.import_module(f"{__name__}.{name}")  # its `@register` adds it


_register_package_methods()
