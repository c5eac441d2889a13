"""Run identity: a run's config hash is the sha256 of canonical JSON (sorted keys, plain values: every
pydantic model as `model_dump(mode="json")`) of what changes its result. A finished run whose recorded hash
differs from the one the config gives now was another run.

kdlab 0.1.0 hashed the text of pydantic's repr for some inputs (`str(config.training)`), so its hashes
changed with pydantic and with every field added to a settings model. `legacy_run_hash` reproduces those
hashes, so a study folder written by 0.1.0 is matched once and its runs re-keyed (`rekey_finished_runs`)
instead of refused as changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from kdlab.config import EvaluationSettings, StudentSettings, TeacherSettings, TrainingSettings
from kdlab.files import atomic_write_text
from kdlab.hashing import canonical_hash
from kdlab.registry import Registry, RunRecord, local_run_folder, write_run_record

HASH_CHARS = 16  # the config hash is a prefix of the sha256


def plain(value: Any) -> Any:
    """`value` as plain JSON values: pydantic models dumped in JSON mode, containers walked."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def run_hash(*parts: Any) -> str:
    """A run's config hash from its inputs (settings models, dicts, numbers, strings)."""
    return canonical_hash({"parts": [plain(p) for p in parts]})[:HASH_CHARS]


# ---------------------------------------------------------------------------------------------------------
# kdlab 0.1.0's hashes, kept only to recognise the runs of older study folders

# Fields 0.1.0 left out of a settings model's text and dumps while at their default (added after studies had
# run); the text of the settings is pydantic 2's repr as 0.1.0 saw it.
_LATER = {
    TrainingSettings: ("packing", "attn_implementation", "teacher_sharding"),
    EvaluationSettings: ("backend", "static_cache", "benchmarks"),
}


def _later_defaults_dropped(settings: BaseModel) -> list[tuple[str, Any]]:
    later = _LATER.get(type(settings), ())
    fields = type(settings).model_fields
    return [(name, getattr(settings, name)) for name in fields
            if name not in later or getattr(settings, name) != fields[name].default]


def _trainer_extras(settings: TrainingSettings) -> dict[str, Any]:
    """The TrainingArguments pass-through fields as 0.1.0 stored them: converted by their annotations."""
    if not settings.model_extra:
        return {}
    from kdlab.training import check_trainer_arguments

    return check_trainer_arguments(settings)


def _legacy_training_dump(settings: TrainingSettings) -> dict[str, Any]:
    data = {name: to_jsonable_python(v) for name, v in _later_defaults_dropped(settings)}
    return data | to_jsonable_python(_trainer_extras(settings))


def _legacy_text(settings: TrainingSettings | EvaluationSettings) -> str:
    """pydantic 2's `str(model)` as 0.1.0 hashed it: `name=repr(value)` for each field, then the extras."""
    items = _later_defaults_dropped(settings)
    if isinstance(settings, TrainingSettings):
        items += list(_trainer_extras(settings).items())
    return " ".join(f"{name}={value!r}" for name, value in items)


def _legacy_part(part: Any) -> Any:
    if isinstance(part, TrainingSettings | EvaluationSettings):
        return _legacy_text(part)
    if isinstance(part, StudentSettings | TeacherSettings):
        data = part.model_dump(mode="json")
        if data.get("revision") is None:
            data.pop("revision")  # an unset revision was left out
        if isinstance(part, TeacherSettings):
            data["training"] = _legacy_training_dump(part.training)
        return data
    return plain(part)


def legacy_run_hash(*parts: Any) -> str:
    """The config hash kdlab 0.1.0 gave a run with these inputs."""
    return canonical_hash({"parts": [json.loads(json.dumps(_legacy_part(p), default=str)) for p in parts]})[
        :HASH_CHARS
    ]


@dataclass(frozen=True)
class Rekey:
    """A finished run recorded under its 0.1.0 hash, and the hash it has now."""

    record: RunRecord
    new_hash: str


def runs_to_rekey(finished: Sequence[RunRecord], planned: Mapping[str, Sequence[Any]]) -> list[Rekey]:
    """The finished runs whose recorded hash is not today's hash of their planned inputs (`planned`: run id
    → hash parts) but is the hash kdlab 0.1.0 gave those inputs: the same runs, recorded by an older kdlab."""
    out = []
    for record in finished:
        parts = planned.get(record.id)
        if parts is None:
            continue
        new = run_hash(*parts)
        if record.config_hash != new and record.config_hash == legacy_run_hash(*parts):
            out.append(Rekey(record, new))
    return out


def rekey_checkpoints(runs: Iterable[tuple[Path, Sequence[Any]]]) -> list[Path]:
    """An interrupted run's checkpoints are marked with its config hash (`training.last_checkpoint` removes
    those of other settings): a mark holding the 0.1.0 hash of the run's inputs gets today's hash, so the run
    resumes instead of starting over. `runs`: (run folder, hash inputs). Returns the folders re-marked."""
    from kdlab.training import SETTINGS_MARK

    done = []
    for folder, parts in runs:
        mark = folder / "trainer" / SETTINGS_MARK
        if mark.is_file() and mark.read_text().strip() == legacy_run_hash(*parts):
            atomic_write_text(mark, run_hash(*parts))
            done.append(folder)
    return done


def rekey_finished_runs(registry: Registry, study_dir: Path, rekeys: Sequence[Rekey]) -> list[str]:
    """Record each run's new hash in the registry and in the run.json its folder keeps (so a registry rebuilt
    from the folders agrees). Returns the ids re-keyed."""
    done = []
    for rekey in rekeys:
        if not registry.rekey(rekey.record.id, rekey.record.config_hash, rekey.new_hash):
            continue  # another process re-keyed (or redid) it first
        folder = local_run_folder(study_dir, rekey.record.output_dir)
        if folder is not None and folder.is_dir():
            write_run_record(folder, replace(registry.get(rekey.record.id), output_dir=str(folder)))
        done.append(rekey.record.id)
    return done
