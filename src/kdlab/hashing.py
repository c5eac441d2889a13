"""The one hash of plain values: sha256 of canonical JSON (sorted keys, compact, no NaN), for run identity
(`identity.run_hash`), the teacher cache's fingerprint and the plan's short labels. Values are
normalised first (`plain_json`): numpy scalars, paths, tuples and sets become plain JSON, and anything
whose text would be ambiguous is refused."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def plain_json(value: Any, where: str = "inputs") -> Any:
    """Normalise to plain JSON types, refusing anything whose text form would be ambiguous."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not np.isfinite(value):
            raise TypeError(f"fingerprint input {where} is a non-finite float ({value}); not canonical JSON")
        return float(value)
    if isinstance(value, np.generic):
        return plain_json(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            # Non-str keys would silently collide with their str form after JSON encoding.
            if not isinstance(k, str):
                raise TypeError(f"fingerprint input {where} has a non-string key {k!r}; use str keys")
            out[k] = plain_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [plain_json(v, f"{where}{{}}") for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    raise TypeError(f"fingerprint input {where} has unsupported type {type(value).__name__}")


def canonical_json(inputs: Mapping[str, Any]) -> str:
    return json.dumps(
        plain_json(inputs), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_hash(inputs: Mapping[str, Any]) -> str:
    """Hex sha256 of the canonical JSON (sorted keys, compact) of ``inputs``.

    The caller chooses what goes in (teacher spec, weights hash, tokenizer, task, split, template,
    max length, k, layers, decoding, ...).  Note that ``1`` and ``1.0`` hash differently.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(f"hashed inputs must be a mapping, got {type(inputs).__name__}")
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()
