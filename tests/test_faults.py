"""Fault drills: damaged caches and registries are caught and repaired, bad input fails before any work with
one line and exit code 2, a NaN fails its run, and a study killed at any stage resumes without redoing
finished work.

Most drills damage a private copy of one small finished study (the `mini` fixture: SST-2, SFT and KD1, an
unadapted tiny teacher) and run the command a user would, in process. Concurrent workers are drilled in
test_study.py (`test_two_sweeps_share_the_study`) and test_registry.py; a kill during a student run in
test_study.py (the smoke study); here the other stages are killed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import kdlab.report
import kdlab.stages.cache
from kdlab.cli import main
from kdlab.config import TrainingSettings, preset_text
from kdlab.errors import RegistryError
from kdlab.methods import METHODS
from kdlab.registry import REGISTRY_NAME, RUN_RECORD, Registry, rebuild_registry
from kdlab.stages.cache import build_teacher_cache
from kdlab.tasks import SST2Task
from kdlab.tasks.base import Encoded, Example
from kdlab.teacher_cache import CacheError, TeacherCache, TeacherCacheWriter
from kdlab.tiny import build_tiny_llama
from kdlab.training import KDTrainer, TrainItem, train

KD1_RUN = "kd1-sst2-s1-lam0.5-seed1"
STUDENT_RUNS = {"sft-sst2-s1-seed1", KD1_RUN}




def _config(out: Path, **changes: Any) -> dict[str, Any]:
    """The smoke preset cut down: SST-2, SFT and KD1, one seed, an unadapted teacher, no bench."""
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "top_k": 8}}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    data["output_dir"] = str(out)
    data.update(changes)
    return data


def _write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Mini:
    out: Path
    data_dir: Path


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Mini:
    root = tmp_path_factory.mktemp("faults")
    config = _write_config(root / "mini.yaml", _config(root / "out"))
    assert main(["sweep", str(config), "--data-dir", str(tiny_data_dir)]) == 0
    return Mini(root / "out", tiny_data_dir)


@pytest.fixture
def study(mini: Mini, tmp_path: Path) -> Path:
    """A private copy of the finished mini study, to damage."""
    out = tmp_path / "study"
    shutil.copytree(mini.out, out)
    return out


def _sweep(study: Path, mini: Mini, *flags: str) -> int:
    return main(["sweep", "--out", str(study), "--data-dir", str(mini.data_dir), *flags])


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    """Registry rows without what a rebuild cannot know (owner, heartbeat) or moves (output_dir)."""
    drop = {"owner", "heartbeat", "output_dir"}
    return {r.id: {k: v for k, v in r.__dict__.items() if k not in drop}
            for r in Registry(path / REGISTRY_NAME, readonly=True).runs()}


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("kdlab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _named_command(err: str) -> list[str]:
    """The repair command an error message names, as argv for `main`."""
    found = re.search(r"`(kdlab (?:cache|registry) [^`]*)`", err)
    assert found, err
    return shlex.split(found.group(1))[1:]


# ---------------------------------------------------------------------------------------------------------
# teacher cache: damage is caught, named, and repaired


def _small_cache(path: Path) -> None:
    rng = np.random.default_rng(0)
    with TeacherCacheWriter(path, fingerprint_inputs={"t": 1}, vocab_size=64, top_k=4, store_answers=True,
                            temperatures=[2.0], shard_rows=12) as writer:
        for i in range(10):
            lp = -np.sort(rng.random((3, 4)).astype(np.float32), axis=1) - 0.1
            writer.add(f"ex{i}", answer=f"a{i}", topk_indices=rng.integers(0, 64, (3, 4)), topk_logprobs=lp,
                       topk_tail={2.0: np.full(3, -3.0, dtype=np.float32)})


def _overwrite(path: Path, offset: int = 128, n: int = 64) -> None:
    """64 bytes of 0xFF (fp16 NaN) over the data, keeping the size: only a hash sees it."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * n)


def _edit_manifest(cache: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped bytes": lambda c: _overwrite(c / "shard-00000.topk_lp.npy"),
    "truncated shard": lambda c: os.truncate(c / "shard-00000.topk_idx.npy", 100),
    "deleted index": lambda c: (c / "index.json").unlink(),
    "edited fingerprint": lambda c: _edit_manifest(c, lambda m: m.update(fingerprint="0" * 64)),
    "deleted manifest": lambda c: (c / "manifest.json").unlink(),
}
NAMED = {
    "flipped bytes": "shard-00000.topk_lp.npy is corrupt",
    "truncated shard": "shard-00000.topk_idx.npy has 100",
    "deleted index": "index.json is missing",
    "edited fingerprint": "does not match its inputs",
    "deleted manifest": "incomplete or absent",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    _small_cache(cache)
    DAMAGE[damage](cache)
    with pytest.raises(CacheError, match=re.escape(NAMED[damage])):
        TeacherCache.open(cache)  # the first open in this process hashes every file


def test_hashes_are_checked_once_per_process_sizes_always(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _small_cache(cache)
    TeacherCache.open(cache)  # hashed here
    _overwrite(cache / "shard-00001.topk_lp.npy")
    TeacherCache.open(cache)  # same manifest, same process: sizes only (a new process hashes again)
    with pytest.raises(CacheError, match="shard-00001.topk_lp.npy is corrupt"):
        TeacherCache.open(cache, verify="hash")  # `kdlab cache --verify`
    os.truncate(cache / "answers.jsonl", 5)
    with pytest.raises(CacheError, match="answers.jsonl has 5 bytes"):
        TeacherCache.open(cache, verify="size")


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", ".hidden.npy"])
def test_manifest_entries_stay_inside_the_cache_folder(tmp_path: Path, name: str) -> None:
    cache = tmp_path / "cache"
    _small_cache(cache)
    _edit_manifest(cache, lambda m: m["shards"][0]["files"].update(topk_idx=name))
    with pytest.raises(CacheError, match="not a file of the cache folder"):
        TeacherCache.open(cache)
    _small_cache(tmp_path / "old")
    _edit_manifest(tmp_path / "old", lambda m: m.pop("checksums"))  # a cache of an older kdlab
    with pytest.raises(CacheError, match="no file checksums"):
        TeacherCache.open(tmp_path / "old")


def test_killed_builds_leave_nothing_behind(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _small_cache(cache)
    dead = tmp_path / ".cache.building-999999999-abcd1234"  # a killed rebuild of a dead process
    swapped = tmp_path / ".cache.old-abcd1234"  # killed between the swap's two renames
    for folder in (dead, swapped):
        folder.mkdir()
        (folder / "shard-00000.topk_idx.npy").write_bytes(b"x")
    rebuild = TeacherCacheWriter(cache, fingerprint_inputs={"t": 2}, vocab_size=64, top_k=4, overwrite=True)
    rebuild.abort()  # a rebuild that fails: the cache it would have replaced stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert len(TeacherCache.open(cache)) == 10  # the old cache is intact


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_study_cache_is_refused_then_repaired_by_the_named_command(
    study: Path, mini: Mini, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = study / "teacher_cache" / "sst2"
    before = Registry(study / REGISTRY_NAME, readonly=True).get("cache-sst2")
    DAMAGE[damage](cache)
    if damage == "deleted manifest":  # an unfinished build: built again without being asked
        assert _sweep(study, mini) == 0
    else:
        assert _sweep(study, mini) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert NAMED[damage] in line and str(cache) in line
        command = _named_command(line)
        assert command[:3] == ["cache", "--out", str(study)] and "--rebuild" in command
        assert main(command) == 0
        assert _sweep(study, mini) == 0
    registry = Registry(study / REGISTRY_NAME)
    after = registry.get("cache-sst2")
    assert after.status == "done" and after.finished_at > before.finished_at  # rebuilt
    assert all(registry.get(r).attempts == 1 for r in STUDENT_RUNS)  # the student runs were not redone
    capsys.readouterr()
    assert main(["cache", "--out", str(study), "--verify"]) == 0
    assert "intact" in capsys.readouterr().out
    assert sorted(p.name for p in cache.parent.iterdir()) == ["sst2"]  # nothing left beside it
    assert (cache / RUN_RECORD).is_file()


def test_cache_verify_reports_a_corrupt_shard(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _overwrite(study / "teacher_cache" / "sst2" / "shard-00000.topk_lp.npy")
    assert main(["cache", "--out", str(study), "--verify"]) == 2
    out = capsys.readouterr().out
    assert "FAILED" in out and "shard-00000.topk_lp.npy is corrupt" in out and "--rebuild" in out


# ---------------------------------------------------------------------------------------------------------
# non-finite losses and gradients fail the run


def test_nan_teacher_signal_fails_the_run_never_done(study: Path, mini: Mini,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's drill: NaN in a shard that still passes verification (checksums updated to match), the
    KD1 run deleted and redone. It fails naming the loss term and step; every other run is kept."""
    cache = study / "teacher_cache" / "sst2"
    lp = cache / "shard-00000.topk_lp.npy"
    _overwrite(lp)
    digest = hashlib.sha256(lp.read_bytes()).hexdigest()
    _edit_manifest(cache, lambda m: m["checksums"]["shard-00000.topk_lp.npy"].update(sha256=digest))
    shutil.rmtree(study / "runs" / KD1_RUN)
    for path in study.glob(REGISTRY_NAME + "*"):
        path.unlink()  # "deleted from the registry": the others come back from their run folders
    assert _sweep(study, mini) == 1
    captured = capsys.readouterr()
    assert f"[failed] {KD1_RUN}: FloatingPointError: non-finite loss at step" in captured.err
    assert "rebuilt from" in captured.err
    assert captured.out == ""  # stdout keeps results only: no status, no Trainer log lines
    registry = Registry(study / REGISTRY_NAME)
    run = registry.get(KD1_RUN)
    assert run.status == "failed" and run.metrics is None
    assert re.search(r"non-finite loss at step \d+: loss_kd = nan", run.error)
    assert not (study / "runs" / KD1_RUN / RUN_RECORD).exists()
    sft = registry.get("sft-sst2-s1-seed1")
    assert sft.status == "done" and sft.attempts == 1


@pytest.fixture(scope="module")
def tiny_kd(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Any]:
    """A tiny teacher's cache over four examples, and a student: what `train` needs for KD1."""
    tok = tiny_tokenizer
    teacher = build_tiny_llama(tok, num_layers=2, seed=0).eval()
    examples = [Example(f"ex{i}", {"sentence": "x"}) for i in range(4)]
    encoded = {}
    for i, ex in enumerate(examples):
        prompt, answer = [1, 5 + i, 6, 7, 8], [9 + i, 10, tok.eos_token_id]
        encoded[ex.id] = Encoded(ex.id, prompt + answer, [-100] * len(prompt) + answer)
    root = tmp_path_factory.mktemp("tiny_kd")
    build_teacher_cache(root / "cache", task=SST2Task(), teacher=teacher, tokenizer=tok, examples=examples,
                        encoded=encoded, fingerprint_inputs={"tiny": 1}, top_k=8, hidden_layers=[],
                        answers=False, batch_size=4, temperatures=[2.0])
    return {"tok": tok, "cache": root / "cache", "items": [TrainItem(gold=e) for e in encoded.values()]}


def _train(tiny_kd: dict[str, Any], tmp_path: Path, method: str, cache: TeacherCache | None = None,
           hook: bool = False) -> None:
    tok = tiny_kd["tok"]
    student = build_tiny_llama(tok, num_layers=1, seed=1)
    if hook:
        student.model.embed_tokens.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    params = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 8}
    settings = TrainingSettings(learning_rate=1e-3, batch_size=4, max_steps=2, warmup_ratio=0.0,
                                logging_steps=1)
    train(student, tiny_kd["items"], method=METHODS[method], params=params if method == "kd1" else {},
          settings=settings, output_dir=tmp_path / "trainer", seed=1, pad_id=tok.pad_token_id,
          vocab_size=len(tok), cache=cache)


def test_non_finite_loss_names_the_term_and_step(tiny_kd: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_kd["cache"], cache)
    lp = cache / "shard-00000.topk_lp.npy"
    _overwrite(lp, n=lp.stat().st_size - 128)  # every log-prob NaN
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1: loss_kd = nan \(loss_ce = "):
        _train(tiny_kd, tmp_path, "kd1", TeacherCache.open(cache, verify="size"))  # hashes skipped


def test_non_finite_gradient_fails_the_run(tiny_kd: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 1: gradient norm nan"):
        _train(tiny_kd, tmp_path, "sft", hook=True)


def test_nan_is_logged_as_nan() -> None:
    from kdlab.training import training_arguments

    args = training_arguments(TrainingSettings(), "unused", 1, use_cpu=True)
    assert args.logging_nan_inf_filter is False  # the Trainer would log the mean of earlier losses instead


# ---------------------------------------------------------------------------------------------------------
# the registry: rebuilt from the run folders, and a broken one is refused with one line


def test_deleted_registry_is_rebuilt_and_no_run_is_redone(study: Path, mini: Mini, no_training: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = _rows(study)
    assert {"teacher-sst2-zero-shot", "cache-sst2"} | STUDENT_RUNS == set(before)
    for path in study.glob(REGISTRY_NAME + "*"):
        path.unlink()
    assert main(["status", str(study)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert _named_command(line) == ["registry", "rebuild", "--out", str(study)]
    assert _sweep(study, mini) == 0  # rebuilt automatically: the file is missing, the run folders are there
    assert "rebuilt from 4 finished run folder(s)" in capsys.readouterr().err
    assert _rows(study) == before  # exactly the rows it had: ids, params, hashes, metrics, times, attempts
    assert main(["status", str(study)]) == 0


def test_junk_registry_is_refused_then_rebuilt_by_the_named_command(
    study: Path, mini: Mini, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _rows(study)
    (study / REGISTRY_NAME).write_bytes(b"not a database " * 100)
    snapshot = _snapshot(study)
    for argv in (["status", str(study)], ["sweep", "--out", str(study), "--data-dir", str(mini.data_dir)]):
        assert main(argv) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "not a usable run registry" in line
    assert _snapshot(study) == snapshot  # refused: the folder is as it was
    assert main(_named_command(line)) == 0
    backups = list(study.glob(REGISTRY_NAME + ".bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes().startswith(b"not a database")
    assert _rows(study) == before
    assert _sweep(study, mini) == 0


def test_readable_registry_rebuild_keeps_runs_without_records(study: Path) -> None:
    """Runs finished before kdlab kept run.json: `kdlab registry rebuild` writes their records first."""
    before = _rows(study)
    for record in study.glob(f"*/*/{RUN_RECORD}"):
        record.unlink()
    result = rebuild_registry(study)
    assert set(result.restored) == set(before) and result.backup is not None
    assert _rows(study) == before


def test_read_only_registry_is_refused_but_status_reads_it(study: Path, mini: Mini,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = study / REGISTRY_NAME
    if os.geteuid() != 0:
        path.chmod(0o444)
    else:  # root writes to any file: open every connection read-only instead, as SQLite does for such a file
        connect = sqlite3.connect

        def read_only(database: str, *args: Any, **kwargs: Any) -> sqlite3.Connection:
            if kwargs.get("uri"):
                return connect(database, *args, **kwargs)
            return connect(f"{Path(database).resolve().as_uri()}?mode=ro", *args, uri=True, **kwargs)

        monkeypatch.setattr(sqlite3, "connect", read_only)
    snapshot = _snapshot(study)
    assert _sweep(study, mini) == 2
    assert "registry is read-only" in _one_error_line(capsys.readouterr().err)
    # SQLite's own side files aside (reading a read-only WAL database leaves them), nothing changed.
    assert {k: v for k, v in _snapshot(study).items() if not k.endswith(("-wal", "-shm"))} == snapshot
    assert main(["status", str(study)]) == 0  # reading needs no write access
    assert "4 done" in capsys.readouterr().out
    path.chmod(0o644)


def test_two_workers_finding_the_registry_missing_rebuild_it_once(study: Path) -> None:
    before = _rows(study)
    for path in study.glob(REGISTRY_NAME + "*"):
        path.unlink()
    results: list[Any] = []
    workers = [threading.Thread(target=lambda: results.append(rebuild_registry(study, only_if_missing=True)))
               for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(r is None for r in results) == [False, True]
    assert _rows(study) == before


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any work, the output folder untouched


def test_missing_model_path_writes_nothing(tmp_path: Path, tiny_data_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    data = _config(out, students=[{"name": "s9", "model": str(tmp_path / "no-such-model")}])
    config = _write_config(tmp_path / "study.yaml", data)
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "students.s9" in line and "no-such-model" in line
    assert not out.exists()  # no registry.sqlite, no study.yaml


@pytest.mark.parametrize("change", ["learning rate", "missing model"])
def test_rejected_config_leaves_an_existing_study_as_it_was(study: Path, mini: Mini, change: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load((study / "study.yaml").read_text())
    if change == "learning rate":  # finished runs would now be other runs
        data["training"]["learning_rate"] = 0.0005
    else:
        data["students"][0] = {"name": "s1", "model": str(study / "no-such-model")}
    config = _write_config(study.parent / "changed.yaml", data)
    snapshot = _snapshot(study)
    assert main(["sweep", str(config), "--out", str(study), "--data-dir", str(mini.data_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert ("sft-sst2-s1-seed1" in line and "--force" in line) if change == "learning rate" else "s1" in line
    assert _snapshot(study) == snapshot  # study.yaml neither renamed nor replaced, registry untouched


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", ".hidden"])
def test_student_names_cannot_leave_the_study_folder(tmp_path: Path, name: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = _config(tmp_path / "out", students=[{"name": name, "derive": {"num_layers": 2}}])
    config = _write_config(tmp_path / "study.yaml", data)
    assert main(["config", "check", str(config)]) == 2
    assert "student name" in _one_error_line(capsys.readouterr().err)


def _squad_only(out: Path) -> dict[str, Any]:
    data = yaml.safe_load(preset_text("smoke"))
    return _config(out, tasks={"squad": data["tasks"]["squad"]}, methods={"sft": {}})


def _drop_first_qa_field(path: Path, field: str) -> str:
    data = json.loads(path.read_text())
    qa = data["data"][0]["paragraphs"][0]["qas"][0]
    del qa[field]
    path.write_text(json.dumps(data))
    return qa["id"]


BAD_DATA: dict[str, tuple[str, Callable[[Path], Any], list[str]]] = {
    # name: (task, damage the data folder, what the one line must name)
    "question without question": ("squad", lambda d: _drop_first_qa_field(d / "squad/train-v1.1.json",
                                                                          "question"),
                                  ["train-v1.1.json", "'question'", "train-000"]),
    "dev without answers": ("squad", lambda d: _drop_first_qa_field(d / "squad/dev-v1.1.json", "answers"),
                            ["dev-v1.1.json", "'answers'", "dev-000"]),
    "non-UTF-8 bytes": ("sst2", lambda d: (d / "sst2/train.tsv").write_bytes(
        (d / "sst2/train.tsv").read_bytes().replace(b"film", b"f\xffilm", 1)), ["train.tsv", "not UTF-8",
                                                                                 "0xff"]),
    "empty SST-2 split": ("sst2", lambda d: (d / "sst2/validation.tsv").write_text("sentence\tlabel\n"),
                          ["validation.tsv", "no examples"]),
    "empty SQuAD file": ("squad", lambda d: (d / "squad/train-v1.1.json").write_text('{"data": []}'),
                         ["train-v1.1.json", "no examples"]),
    "split too small": ("sst2", lambda d: (d / "sst2/train.tsv").write_text(
        "\n".join((d / "sst2/train.tsv").read_text().splitlines()[:11]) + "\n"),
        ["tasks.sst2", "train_size", "10 examples"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_before_any_work(case: str, tmp_path: Path, tiny_data_dir: Path, no_training: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    task, damage, named = BAD_DATA[case]
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data_dir)
    damage(data_dir)
    out = tmp_path / "out"
    config = _write_config(tmp_path / "study.yaml", _config(out) if task == "sst2" else _squad_only(out))
    assert main(["run", str(config), "--data-dir", str(data_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(n in line for n in named), line
    assert not out.exists()


def test_no_data_dir_while_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    monkeypatch.delenv("KDLAB_DATA_DIR", raising=False)
    out = tmp_path / "out"
    config = _write_config(tmp_path / "study.yaml", _config(out))
    assert main(["run", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "stanfordnlp/sst2" in line and "--data-dir" in line
    assert not out.exists()


def test_kd3_layer_map_out_of_range_fails_before_any_work(tmp_path: Path, tiny_data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    config = _write_config(tmp_path / "study.yaml",
                           _config(out, methods={"kd3": {"lambda": 0.5, "layer_map": [[1, 9]]}}))
    assert main(["run", str(config), "--data-dir", str(tiny_data_dir)]) == 2
    assert "methods.kd3.layer_map" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_score_given_the_other_task_file(tmp_path: Path, tiny_data_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "validation-0", "label": 1}) + "\n")
    squad_dev = tiny_data_dir / "squad" / "dev-v1.1.json"
    assert main(["score", "sst2", str(preds), "--data", str(squad_dev)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "dev-v1.1.json" in line and "sentence<TAB>label" in line and "squad" in line and len(line) < 300
    assert main(["score", "squad", str(preds), "--data", str(tiny_data_dir / "sst2" / "validation.tsv")]) == 2
    assert "not a SQuAD v1.1 JSON file" in _one_error_line(capsys.readouterr().err)


def test_scorers_warn_about_predictions_for_unknown_ids(tmp_path: Path, tiny_data_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    preds = tmp_path / "preds.jsonl"
    rows = [{"id": f"validation-{i}", "label": 1} for i in range(20)] + [
        {"id": "train-3", "label": 0}, {"id": "test-9", "label": 1}]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "sst2", str(preds), "--data", str(tiny_data_dir / "sst2" / "validation.tsv")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: warning: 2 of 22 predictions are for ids not among")
    assert "'train-3'" in err[0] and "'test-9'" in err[0]


# ---------------------------------------------------------------------------------------------------------
# kill -9 at each stage, then resume


def _child(argv: list[str]) -> None:
    os._exit(main(argv))


def _slowly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stretch the stages (in the forked children), so a kill lands inside one."""
    def slow(orig: Callable, seconds: float) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return orig(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(KDTrainer, "training_step", slow(KDTrainer.training_step, 0.15))
    monkeypatch.setattr(TeacherCacheWriter, "add", slow(TeacherCacheWriter.add, 0.04))
    monkeypatch.setattr(kdlab.report, "write_results", slow(kdlab.report.write_results, 2.0))


def test_kill_at_each_stage_then_resume(tmp_path: Path, tiny_data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL during teacher adaptation, during the cache build and during the report (a kill during a
    student run: test_study.py); each time the next command resumes, and the final one finishes the study
    with every finished run done once, the interrupted ones redone once, and no half-written leftovers."""
    out = tmp_path / "out"
    data = _config(out)
    data["teacher"]["adapt"] = True
    config = _write_config(tmp_path / "study.yaml", data)
    argv = ["run", str(config), "--data-dir", str(tiny_data_dir)]
    _slowly(monkeypatch)

    def running(rid: str) -> Callable[[Registry], bool]:
        return lambda reg: (r := reg.get(rid)) is not None and r.status == "running"

    def reporting(reg: Registry) -> bool:
        return all((r := reg.get(rid)) is not None and r.status == "done" for rid in STUDENT_RUNS)

    killed = []
    for stage, ready in (("teacher-sst2", running("teacher-sst2")), ("cache-sst2", running("cache-sst2")),
                         ("report", reporting)):
        proc = multiprocessing.get_context("fork").Process(target=_child, args=(argv,))
        proc.start()
        deadline = time.monotonic() + 180
        while True:
            assert proc.is_alive(), f"the study exited ({proc.exitcode}) before reaching {stage}"
            assert time.monotonic() < deadline, f"{stage} not reached"
            try:
                if ready(Registry(out / REGISTRY_NAME, readonly=True)):
                    break
            except RegistryError:
                pass  # not created yet
            time.sleep(0.02)
        time.sleep(0.3)  # inside the stage
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        killed.append(stage)
    monkeypatch.undo()
    assert main(argv) == 0
    runs = {r.id: r for r in Registry(out / REGISTRY_NAME).runs()}
    assert set(runs) == {"teacher-sst2-zero-shot", "teacher-sst2", "cache-sst2"} | STUDENT_RUNS
    assert all(r.status == "done" for r in runs.values())
    attempts = {rid: r.attempts for rid, r in runs.items()}
    assert attempts == {"teacher-sst2-zero-shot": 1, "teacher-sst2": 2, "cache-sst2": 2,
                        **dict.fromkeys(STUDENT_RUNS, 1)}, attempts
    TeacherCache.open(out / "teacher_cache" / "sst2", verify="hash")
    leftovers = [p for p in out.rglob("*") if re.search(r"\.(building|old|partial|tmp)", p.name)]
    assert not leftovers, leftovers
    assert (out / "results.csv").is_file()
    assert all((Path(r.output_dir) / RUN_RECORD).is_file() for r in runs.values())


def test_report_reads_run_folders_inside_the_study_whatever_the_registry_row_says(tmp_path: Path) -> None:
    """A registry row's output_dir (absolute, possibly tampered with) never leads the report outside the
    study folder: run folders are built from the run id."""
    from kdlab.registry import RunRecord
    from kdlab.report.collect import StudyOutputs
    from kdlab.report.compare import Scorer

    outside = tmp_path / "elsewhere"
    (outside / "sst2-eval").mkdir(parents=True)
    fields = dict(task="sst2", student="s1", stage="grid", params={}, seed=1, config_hash="", status="done",
                  metrics={}, wall_time=1.0, owner=None, heartbeat=None, attempts=1, error=None,
                  created_at=0.0, started_at=0.0, finished_at=0.0)
    student = RunRecord(id="sft-sst2-s1-seed1", kind="student", method="sft",
                        output_dir=str(outside / "run"), **fields)
    teacher = RunRecord(id="teacher-sst2", kind="teacher", method="teacher",
                        output_dir=str(outside / "model"), **fields)
    study = tmp_path / "study"
    outputs = StudyOutputs(study, [student, teacher], {}, None, None, None, ["sst2"])
    assert outputs.run_dir(student) == study / "runs" / student.id
    assert Scorer(outputs, None, []).predictions_dir(teacher) == study / "teacher" / "sst2-eval"
