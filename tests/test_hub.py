"""Hub ids for real, offline: tiny models laid out as a Hugging Face cache
(`$HF_HOME/hub/models--ORG--NAME/{blobs,snapshots/SHA,refs/main}`), resolved to their snapshot, fingerprinted
once per file, and run through studies with `HF_HUB_OFFLINE=1` (teacher with and without adaptation, a hub
student). Also what `datasets` can load offline for the hub dataset ids of the tasks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import kdlab.models
from kdlab.config import preset_text
from kdlab.models import (
    WEIGHT_PATTERNS,
    ModelSpecError,
    hash_model_files,
    hub_snapshot_info,
    model_provenance,
    resolve_model_path,
)
from kdlab.teacher_cache import hash_directory
from kdlab.tiny import write_tiny_model

TEACHER = "kdlabtest/qwen2-teacher"
STUDENT = "kdlabtest/qwen2-student"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def lay_out_hub_cache(
    src: Path, hub: Path, repo_id: str, commit: str, refs: Sequence[str] = ("main",)
) -> Path:
    """Put the files of a model folder into a hub cache as huggingface_hub does: content in `blobs/` (LFS
    files named by their sha256, the others by their git blob sha1), `snapshots/<commit>/` symlinks to them,
    and `refs/<ref>` holding the commit. Returns the snapshot folder."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".bin"):
            name = hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache that huggingface_hub (and kdlab) use, offline, in this process."""
    from huggingface_hub import constants

    hub = tmp_path / "hf_home" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(kdlab.models, "_resolved_hub", {})
    return hub


# ---------------------------------------------------------------------------------------------------------
# resolving hub ids


def test_hub_ids_resolve_to_their_snapshot_offline(tmp_path: Path, offline_hub: Path) -> None:
    a = lay_out_hub_cache(write_tiny_model(tmp_path / "a", "qwen2", num_layers=2, seed=1), offline_hub,
                          TEACHER, COMMIT_A)
    b = lay_out_hub_cache(write_tiny_model(tmp_path / "b", "qwen2", num_layers=2, seed=2), offline_hub,
                          TEACHER, COMMIT_B, refs=("v2",))
    assert resolve_model_path(TEACHER) == str(a)
    assert hub_snapshot_info(a) == (TEACHER, COMMIT_A)
    assert resolve_model_path(TEACHER, "v2") == str(b)  # a tag
    assert resolve_model_path(TEACHER, COMMIT_B) == str(b)  # a commit
    assert resolve_model_path(TEACHER, "main") == str(a)
    AutoModelForCausalLM.from_pretrained(resolve_model_path(TEACHER))  # loads through the symlinks

    with pytest.raises(ModelSpecError, match=r"revision nope.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_path(TEACHER, "nope")
    with pytest.raises(ModelSpecError, match=r"kdlabtest/other.*no ref 'main'"):
        resolve_model_path("kdlabtest/other")
    with pytest.raises(ModelSpecError, match="applies to hub ids, and this is a local folder"):
        resolve_model_path(str(tmp_path / "a"), "v2")
    # A snapshot an interrupted download left without its weights is not taken for a model.
    (b / "model.safetensors").unlink()
    kdlab.models._resolved_hub.clear()
    with pytest.raises(ModelSpecError, match="lacks model.safetensors"):
        resolve_model_path(TEACHER, "v2")

    entry = model_provenance(TEACHER)
    vocab = json.dumps(sorted(AutoTokenizer.from_pretrained(a).get_vocab().items()), ensure_ascii=False)
    assert entry == {"spec": TEACHER, "path": str(a), "revision": None, "repo_id": TEACHER,
                     "commit": COMMIT_A, "fingerprint": hash_directory(a, patterns=WEIGHT_PATTERNS),
                     "tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:12], "vocab_size": 512}
    assert model_provenance(TEACHER, COMMIT_A)["revision"] == COMMIT_A
    local = model_provenance(str(tmp_path / "a"))
    assert local["commit"] is None and local["fingerprint"] == hash_directory(tmp_path / "a", WEIGHT_PATTERNS)


def test_hub_ids_online_download_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub: Path
) -> None:
    """Online (the hub faked here): a branch is looked up once per process, a cached commit is not downloaded
    again, a missing one is downloaded with the transformers weights only, and an unreachable hub falls back
    to the cache."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    src = write_tiny_model(tmp_path / "src", "qwen2", num_layers=2)
    lay_out_hub_cache(src, offline_hub, TEACHER, COMMIT_A)
    remote = {"sha": COMMIT_A}
    calls: list[tuple[str, object]] = []

    class FakeApi:
        def model_info(self, repo_id: str, revision: str | None = None) -> object:
            calls.append(("info", revision))
            if remote["sha"] is None:
                raise ConnectionError("no network")
            files = ["config.json", "model.safetensors", "consolidated.safetensors", "pytorch_model.bin"]
            return type("Info", (), {"sha": remote["sha"],
                                     "siblings": [type("S", (), {"rfilename": f}) for f in files]})()

    def fake_download(repo_id: str, revision: str, allow_patterns: list[str]) -> str:
        calls.append(("download", allow_patterns))
        return str(lay_out_hub_cache(src, offline_hub, repo_id, revision, refs=()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_path(TEACHER).endswith(COMMIT_A) and calls == [("info", "main")]
    resolve_model_path(TEACHER)
    assert calls == [("info", "main")]  # looked up once per process: a study sees one commit
    remote["sha"] = COMMIT_B  # a tag not cached: downloaded by commit, the transformers weights only
    assert resolve_model_path(TEACHER, "v2").endswith(COMMIT_B)
    patterns = calls[-1][1]
    assert calls[-1][0] == "download" and "model*.safetensors" in patterns
    assert not any(p.endswith(".bin") for p in patterns) and "*.safetensors" not in patterns
    assert (offline_hub / "models--kdlabtest--qwen2-teacher" / "refs" / "v2").read_text() == COMMIT_B
    remote["sha"] = None  # unreachable: the cached snapshot of the revision, else a clear error
    kdlab.models._resolved_hub.clear()
    assert resolve_model_path(TEACHER).endswith(COMMIT_A)
    with pytest.raises(ModelSpecError, match="not cached and the hub said: no network"):
        resolve_model_path("kdlabtest/other")


def test_model_files_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_hub: Path) -> None:
    folder = write_tiny_model(tmp_path / "m", "gpt2", num_layers=2)
    monkeypatch.setattr(kdlab.models, "MEMO_MIN_BYTES", 0)  # memoise even these small files
    reads: list[str] = []
    real_read = kdlab.models.hash_file

    def counting(path: Path) -> str:
        reads.append(path.name)
        return real_read(path)

    monkeypatch.setattr(kdlab.models, "hash_file", counting)
    expected = hash_directory(folder, patterns=WEIGHT_PATTERNS)
    assert hash_model_files(folder) == expected and sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert hash_model_files(folder) == expected and reads == []  # second start: nothing read
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: read again, same digest
    assert hash_model_files(folder) == expected and reads == ["model.safetensors"]
    with weights.open("r+b") as f:  # changed in place, same size: a new mtime, a new digest
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert hash_model_files(folder) != expected

    # In a hub cache the weights' blob is named by its sha256: not read at all.
    snapshot = lay_out_hub_cache(write_tiny_model(tmp_path / "h", "gpt2", num_layers=2), offline_hub,
                                 TEACHER, COMMIT_A)
    reads.clear()
    assert hash_model_files(snapshot) == hash_directory(snapshot, patterns=WEIGHT_PATTERNS)
    config_blob, weights_blob = ((snapshot / f).resolve().name for f in ("config.json", "model.safetensors"))
    assert reads == [config_blob] and weights_blob not in reads  # config.json's blob is named by git's sha1


# ---------------------------------------------------------------------------------------------------------
# studies with hub ids, offline, as `kdlab run` in a fresh process


def _hub_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def _run_study(config: dict, root: Path, data_dir: Path, hf_home: Path) -> Path:
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "kdlab.cli", "run", str(path), "--out", str(out), "--data-dir", str(data_dir)],
        env=_hub_env(hf_home), cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def _hub_config(teacher: dict, students: list[dict], methods: dict) -> dict:
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"] = teacher
    data["students"] = students
    data["tasks"] = {"sst2": {"train_size": 8, "selection_size": 4, "eval_size": 4, "max_length": 64}}
    data["methods"] = methods
    data["training"] = {"learning_rate": 0.001, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.0,
                        "logging_steps": 1}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    return data


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub_models")
    hf_home = root / "hf_home"
    lay_out_hub_cache(write_tiny_model(root / "t", "qwen2", num_layers=4, seed=1), hf_home / "hub", TEACHER,
                      COMMIT_A)
    lay_out_hub_cache(write_tiny_model(root / "s", "qwen2", num_layers=2, hidden_size=32, seed=2),
                      hf_home / "hub", STUDENT, COMMIT_B)
    return hf_home


def test_hub_teacher_without_adaptation_and_hub_student(
    hub_home: Path, tmp_path: Path, tiny_data_dir: Path
) -> None:
    # The case: with adapt false the cache stage fingerprinted the hub id as a folder and died.
    config = _hub_config(
        {"model": TEACHER, "adapt": False},
        [{"name": "d", "derive": {"num_layers": 2}, "finetune": "lora", "lora": {"r": 4, "alpha": 8}},
         {"name": "s", "model": STUDENT, "finetune": "full"}],
        {"kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 4}, "kd3": {"lambda": 0.5}},
    )
    out = _run_study(config, tmp_path, tiny_data_dir, hub_home)
    snapshot = hub_home / "hub" / "models--kdlabtest--qwen2-teacher" / "snapshots" / COMMIT_A
    models = json.loads((out / "provenance.json").read_text())["models"]
    assert models["teacher"]["commit"] == COMMIT_A and models["teacher"]["repo_id"] == TEACHER
    assert models["teacher"]["path"] == str(snapshot)
    assert models["students.s"]["commit"] == COMMIT_B
    manifest = json.loads((out / "teacher_cache" / "sst2" / "manifest.json").read_text())
    assert json.dumps(hash_directory(snapshot, patterns=WEIGHT_PATTERNS)) in json.dumps(manifest)
    origin = json.loads((out / "students" / "d" / "init" / "derived_from.json").read_text())
    assert origin["commit"] == COMMIT_A and origin["teacher_layers"] == [0, 3]


def test_hub_teacher_with_adaptation(hub_home: Path, tmp_path: Path, tiny_data_dir: Path) -> None:
    config = _hub_config(
        {"model": TEACHER, "adapt": True, "finetune": "lora", "lora": {"r": 4, "alpha": 8},
         "training": {"learning_rate": 0.003, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.0}},
        [{"name": "s", "model": STUDENT, "revision": "main", "finetune": "full"}],
        {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 4}},
    )
    out = _run_study(config, tmp_path, tiny_data_dir, hub_home)
    assert (out / "teacher" / "sst2" / "model.safetensors").is_file()
    models = json.loads((out / "provenance.json").read_text())["models"]
    assert models["students.s"]["commit"] == COMMIT_B and models["teacher"]["commit"] == COMMIT_A
    assert models["students.s"]["revision"] == "main"
    assert "revision: main" in (out / "study.yaml").read_text()
    # The registry records the commit the hub-id teacher resolved to, with its runs.
    from kdlab.registry import Registry

    teacher_runs = [r for r in Registry(out / "registry.sqlite").runs() if r.kind == "teacher"
                    and r.method == "teacher"]
    assert teacher_runs and all(r.params["model_commit"] == COMMIT_A for r in teacher_runs)
    assert {r.params["model_repo"] for r in teacher_runs} == {TEACHER}


# ---------------------------------------------------------------------------------------------------------
# hub dataset ids

_LOAD_SST2 = """
from kdlab.tasks.base import DataUnavailableError
from kdlab.tasks.sst2 import SST2Task
try:
    print([(e.id, e.label) for e in SST2Task().load("validation")])
except DataUnavailableError as e:
    print("unavailable:", e)
"""


def _write_sst2_parquet(folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    for split, n in (("train", 6), ("validation", 4), ("test", 2)):
        table = pa.table({"idx": list(range(n)), "sentence": [f"good film {i} " for i in range(n)],
                          "label": [i % 2 if split != "test" else -1 for i in range(n)]})
        files[split] = folder / "data" / f"{split}-00000-of-00001.parquet"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, files[split])
    return files


def test_hub_dataset_offline(tmp_path: Path) -> None:
    """`datasets` offline does not read a dataset's hub snapshot: it loads the Arrow cache that an earlier
    online `load_dataset` left in $HF_HOME/datasets. With that cache the task loads offline; with the
    snapshot alone it reports the data unavailable (and names --data-dir)."""
    hf_home = tmp_path / "hf_home"
    src = tmp_path / "sst2_repo"
    files = _write_sst2_parquet(src)
    snapshot = hf_home / "hub" / "datasets--stanfordnlp--sst2" / "snapshots" / COMMIT_A
    for file in files.values():  # the hub snapshot, as a download leaves it
        link = snapshot / file.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT_A)
    env = {k: v for k, v in _hub_env(hf_home).items() if k not in ("KDLAB_DATA_DIR", "HF_DATASETS_CACHE")}
    # The Arrow cache an online load_dataset("stanfordnlp/sst2") writes: built from the same files with the
    # parquet builder, under the name and config the hub load gives it, in the process that first found the
    # snapshot alone unavailable (one process fewer); a fresh process then loads the task from it.
    prepare = f"""
import os, datasets
from datasets.packaged_modules.parquet.parquet import Parquet
files = {json.dumps({k: [str(v)] for k, v in files.items()})}
builder = Parquet(dataset_name="sst2", data_files=files, config_name="default", hash="0" * 16)
builder.download_and_prepare()
root = os.path.join(datasets.config.HF_DATASETS_CACHE, "sst2")
(config_dir,) = os.listdir(root)
target = os.path.join(datasets.config.HF_DATASETS_CACHE, "stanfordnlp___sst2")
os.makedirs(target)
os.rename(os.path.join(root, config_dir), os.path.join(target, "default"))
"""
    first = subprocess.run([sys.executable, "-c", _LOAD_SST2 + prepare], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("unavailable:"), first.stdout
    assert "--data-dir" in first.stdout
    proc = subprocess.run([sys.executable, "-c", _LOAD_SST2], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str([(f"validation-{i}", i % 2) for i in range(4)])
