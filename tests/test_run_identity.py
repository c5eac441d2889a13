"""Run identity: a run's config hash is canonical JSON of plain values, never the text of a repr; a study
folder written by kdlab 0.1.0 (tests/fixtures/smoke_study_0.1.0, made by that release) keeps working: its
runs are matched by their old hashes once and re-keyed, neither refused nor redone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kdlab.config import EvaluationSettings, TrainingSettings, load_config, parse_config, preset_text
from kdlab.errors import RegistryError
from kdlab.identity import legacy_run_hash, run_hash
from kdlab.registry import RUN_RECORD, Registry
from kdlab.resolve import resolve_config
from kdlab.study import Study

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_study_0.1.0"


def _hashes(folder: Path) -> dict[str, str]:
    return {r.id: r.config_hash for r in Registry(folder / "registry.sqlite", readonly=True).runs()}


def _run_json_hashes(folder: Path) -> dict[str, str]:
    records = (json.loads(p.read_text()) for p in folder.glob(f"*/*/{RUN_RECORD}"))
    return {r["id"]: r["config_hash"] for r in records}


@pytest.fixture
def old_study(tmp_path: Path) -> Path:
    """A copy of the 0.1.0 study folder (moved: its registry's output_dir paths point elsewhere)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "study"))


def test_a_study_folder_of_kdlab_0_1_0_is_rekeyed_once(old_study: Path, tiny_data_dir: Path) -> None:
    before = _hashes(old_study)
    assert before == _run_json_hashes(old_study)
    study_yaml = (old_study / "study.yaml").read_text()
    config = load_config(old_study / "study.yaml")

    study = Study(config, output_dir=old_study, data_dir=tiny_data_dir)

    after = _hashes(old_study)
    assert set(after) == set(before) and after == _run_json_hashes(old_study)  # registry and run.json agree
    students_and_teachers = [i for i in before if not i.startswith("cache-")]
    assert len(students_and_teachers) == 22
    for run in students_and_teachers:
        assert after[run] != before[run], run  # every run now has today's hash...
    for run in (i for i in before if i.startswith("cache-")):
        assert after[run] == before[run]  # ...but the caches', a fingerprint of their inputs all along
    # Nothing is left to do, and nothing was redone or written besides the hashes.
    assert {status for _, status in study.run_statuses()} == {"done"}
    assert (old_study / "study.yaml").read_text() == study_yaml  # the same config: not rewritten
    assert not list(old_study.glob("study.*.yaml"))

    # The new hashes are the ones today's kdlab gives these runs: a second open changes nothing.
    Study(config, output_dir=old_study, data_dir=tiny_data_dir)
    assert _hashes(old_study) == after


def test_the_old_hashes_are_reproduced_exactly(old_study: Path, tiny_data_dir: Path) -> None:
    """legacy_run_hash gives every run of the 0.1.0 folder the hash 0.1.0 recorded (a teacher run, a grid
    run, a final run with layer pairs, under a TrainingArguments pass-through field)."""
    from kdlab.preflight import finished_runs

    recorded = _hashes(old_study)
    config = resolve_config(load_config(old_study / "study.yaml"))
    # Opened on another folder, so nothing is re-keyed: the fixture's hashes are compared as recorded.
    study = Study(config, output_dir=old_study.parent / "elsewhere", data_dir=tiny_data_dir)
    assert finished_runs(study) == []
    teacher = {run.id: run for run in study.plan.teacher["sst2"]}
    for rid in ("teacher-sst2", "teacher-sst2-zero-shot"):
        assert legacy_run_hash(*teacher[rid].hash_parts) == recorded[rid]
    kd1, kd3 = study.plan.group("squad", "s1", "kd1"), study.plan.group("squad", "s1", "kd3")
    lam1 = next(run for run in kd1.grid if run.spec.params["lam"] == 1.0)  # a grid run
    final = kd3.finals(kd3.grid[0].spec.params)[0]  # a final run (seed 2) with layer pairs
    assert final.spec.seed == 2 and final.layer_pairs
    for run in (lam1, final):
        assert run.spec.config_hash == run_hash(*run.hash_parts)
        assert legacy_run_hash(*run.hash_parts) == recorded[run.id]


def test_a_changed_setting_under_old_runs_is_still_refused(old_study: Path, tiny_data_dir: Path) -> None:
    """Re-keying matches the old hash of the same settings only: other settings are another run."""
    before = _hashes(old_study)
    data = yaml.safe_load((old_study / "study.yaml").read_text())
    data["training"]["learning_rate"] = 0.002
    with pytest.raises(RegistryError, match="changed under finished runs"):
        Study(parse_config(data), output_dir=old_study, data_dir=tiny_data_dir)
    assert _hashes(old_study) == before and _run_json_hashes(old_study) == before  # left as it was


def test_the_hash_reads_values_not_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pydantic upgrade that changes the repr, or a settings object built another way, keeps the hash."""
    config = resolve_config(parse_config(yaml.safe_load(preset_text("smoke"))))
    parts = [config.students[0], config.teacher, config.tasks["sst2"], {"lam": 0.5}, config.training,
             config.evaluation, "cached", 1234, 1]
    before = run_hash(*parts)
    monkeypatch.setattr(TrainingSettings, "__repr_args__", lambda self: [("changed", 1)])
    monkeypatch.setattr(EvaluationSettings, "__repr_args__", lambda self: [("changed", 2)])
    assert run_hash(*parts) == before
    monkeypatch.undo()
    # The same settings given in another order, or an equal float written differently: the same hash.
    same = TrainingSettings.model_validate(dict(reversed(config.training.model_dump().items())))
    assert run_hash(*parts[:4], same, *parts[5:]) == before
    # Any changed value is another run.
    other = config.training.model_copy(update={"learning_rate": 0.0011})
    assert run_hash(*parts[:4], other, *parts[5:]) != before


def test_old_hashes_of_settings_the_fixture_does_not_cover() -> None:
    """Hashes computed by kdlab 0.1.0 itself (its `Study.hash` of each part alone) for what the fixture
    study leaves at defaults: a later field set (packing, static_cache), an int given for a float field
    (0.1.0 hashed the converted 1.0), a list-valued pass-through field, a teacher's pass-through fields."""
    config = resolve_config(parse_config({
        "teacher": {"model": "tiny-llama", "training": {"adam_beta1": 1, "optim": "adamw_torch"}},
        "students": [{"name": "s1", "derive": {"num_layers": 2}}], "tasks": {"sst2": {}},
        "training": {"learning_rate": 0.001, "adam_beta1": 1, "report_to": ["tensorboard"], "packing": True,
                     "max_grad_norm": 2},
        "evaluation": {"static_cache": True},
    }))
    assert legacy_run_hash(config.training) == "b0b5078549612e1e"
    assert legacy_run_hash(config.evaluation) == "24128a4a15e46d4e"
    assert legacy_run_hash(config.teacher) == "e286268d5d7dabb4"
    assert legacy_run_hash(config.students[0]) == "cb544ac3d3947b73"


def test_an_interrupted_run_of_0_1_0_keeps_its_checkpoints(old_study: Path, tiny_data_dir: Path) -> None:
    """A run killed under 0.1.0 marked its checkpoints with its 0.1.0 hash; today's kdlab re-marks them, so
    the run resumes (`training.last_checkpoint` would remove checkpoints of another hash)."""
    import sqlite3

    from kdlab.training import SETTINGS_MARK, last_checkpoint

    run = "kd1-sst2-s1-lam1-seed1"
    old_hash = _hashes(old_study)[run]
    with sqlite3.connect(old_study / "registry.sqlite") as conn:  # as if it had been killed mid-training
        conn.execute("DELETE FROM runs WHERE id = ?", (run,))
    conn.close()
    trainer = old_study / "runs" / run / "trainer"
    (old_study / "runs" / run / RUN_RECORD).unlink()
    (trainer / "checkpoint-2").mkdir(parents=True)
    (trainer / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (trainer / SETTINGS_MARK).write_text(old_hash)

    study = Study(load_config(old_study / "study.yaml"), output_dir=old_study, data_dir=tiny_data_dir)
    new_hash = next(r.spec.config_hash for r in study.plan.runs() if r.id == run)
    assert (trainer / SETTINGS_MARK).read_text() == new_hash != old_hash
    assert last_checkpoint(trainer, new_hash) == str(trainer / "checkpoint-2")
