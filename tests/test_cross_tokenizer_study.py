"""A study whose student has its own tokenizer (a tiny byte-level BPE trained on another corpus, 400 tokens,
against the tiny teacher's 512): every method with a cross-tokenizer form runs end to end, cached and live;
the others are refused before any work, naming the method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main
from kdlab.config import preset_text
from kdlab.registry import Registry
from kdlab.tiny import _CORPUS, build_tiny_llama, build_tiny_tokenizer

STUDENT_CORPUS = "Santa Clara Denver Broncos Paris France charming dull\n" * 20 + _CORPUS


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("own-tokenizer-student")
    tokenizer = build_tiny_tokenizer(400, corpus=STUDENT_CORPUS)
    build_tiny_llama(tokenizer, num_layers=2, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config(out: Path, student: Path, methods: dict, mode: str = "cached") -> dict:
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["students"] = [{"name": "own", "model": str(student), "finetune": "full"}]
    data["tasks"]["sst2"].update(train_size=16, selection_size=4, eval_size=8)
    data["tasks"]["squad"].update(train_size=8, selection_size=4, eval_size=4)
    data["methods"] = methods
    data["seeds"] = [1]
    data["cache"] = {"mode": mode}
    data["output_dir"] = str(out)
    return data


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_every_cross_tokenizer_method_runs_end_to_end(tiny_data_dir: Path, tmp_path: Path,
                                                      student_folder: Path, mode: str) -> None:
    out = tmp_path / "study"
    methods = {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 8}, "kd2": {"lambda": 0.5}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config(out, student_folder, methods, mode)))
    assert main(["run", str(path), "--data-dir", str(tiny_data_dir)]) == 0
    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    students = {i: r for i, r in runs.items() if i.startswith(("sft-", "kd1-", "kd2-"))}
    assert {i.split("-")[0] for i in students} == {"sft", "kd1", "kd2"}
    assert all(r.status == "done" for r in students.values()), {i: r.status for i, r in students.items()}
    for run_id, record in students.items():
        folder = out / "runs" / run_id
        history = json.loads((folder / "log_history.json").read_text())
        losses = [e for e in history if "loss" in e]
        assert losses and all(e["loss"] == e["loss"] for e in losses)  # trained, finite
        if run_id.startswith(("kd1", "kd2")):
            assert all(e["loss_kd"] > 0 for e in losses)
        # The trained student keeps its own tokenizer, and is evaluated with it.
        saved = json.loads((folder / "model" / "tokenizer.json").read_text())
        assert len(saved["model"]["vocab"]) == 400
        assert record.metrics["eval"]["n"] > 0
    report = (out / "report.md").read_text()
    assert "400" in report and "512" in report  # both tokenizers' vocabularies in the models table


@pytest.mark.parametrize("method", ["kd3"])
def test_a_method_without_a_cross_tokenizer_form_is_refused(tiny_data_dir: Path, tmp_path: Path,
                                                            student_folder: Path, method: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    path = tmp_path / "study.yaml"
    methods = {"sft": {}, method: {"lambda": 0.5}}
    path.write_text(yaml.safe_dump(config(out, student_folder, methods)))
    assert main(["run", str(path), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "students.own" in err and f"methods.{method}" in err and "cross-tokenizer" in err
    assert not out.exists()
