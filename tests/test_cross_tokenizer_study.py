"""A study whose student has its own tokenizer (a tiny byte-level BPE trained on another corpus, 400 tokens,
against the tiny teacher's 512): every method with a cross-tokenizer form (sft, kd1, kd2, kd3) runs end to
end, cached and live, and gkd and opd on the student's retokenised samples; gkd's seq_kd is refused before
any work, naming the method."""

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
    # A transfer set too: its teacher-answered targets are aligned like the gold ones.
    data["tasks"]["sst2"].update(train_size=16, selection_size=4, eval_size=8, transfer_size=8)
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
    methods = {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 8}, "kd2": {"lambda": 0.5},
               "kd3": {"lambda": 0.5}, "gkd": {"lambda": 0.5, "student_fraction": 1.0, "max_new_tokens": 6},
               "opd": {"lambda": 0.5, "max_new_tokens": 6}}
    if mode == "online":  # cache.mode changes only where kd1 / kd2 / kd3 read the teacher (sft reads none,
        methods = {m: methods[m] for m in ("kd1", "kd2", "kd3")}  # gkd and opd always a live one)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config(out, student_folder, methods, mode)))
    assert main(["run", str(path), "--data-dir", str(tiny_data_dir)]) == 0
    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    methods_run = tuple(methods)
    students = {i: r for i, r in runs.items() if i.split("-")[0] in methods_run}
    assert {i.split("-")[0] for i in students} == set(methods_run)
    assert all(r.status == "done" for r in students.values()), {i: r.status for i, r in students.items()}
    for run_id, record in students.items():
        folder = out / "runs" / run_id
        if "-sst2-" in run_id and not run_id.startswith("sft"):
            assert record.metrics["train_examples"] > 16  # the transfer examples trained on
        history = json.loads((folder / "log_history.json").read_text())
        losses = [e for e in history if "loss" in e]
        assert losses and all(e["loss"] == e["loss"] for e in losses)  # trained, finite
        if run_id.startswith(("kd1", "kd2", "kd3")):
            assert all(e["loss_kd"] > 0 for e in losses)
        if run_id.startswith(("gkd", "opd")):
            assert record.metrics["rollout_samples"] > 0 and any(e["loss_kd"] != 0 for e in losses)
        # The trained student keeps its own tokenizer, and is evaluated with it.
        saved = json.loads((folder / "model" / "tokenizer.json").read_text())
        assert len(saved["model"]["vocab"]) == 400
        assert record.metrics["eval"]["n"] > 0
    report = (out / "report.md").read_text()
    assert "400" in report and "512" in report  # both tokenizers' vocabularies in the models table


@pytest.mark.parametrize(("method", "settings", "reason"), [
    ("gkd", {"lambda": 0.5, "seq_kd": True}, "seq_kd"),
])
def test_a_method_without_a_cross_tokenizer_form_is_refused(tiny_data_dir: Path, tmp_path: Path,
                                                            student_folder: Path, method: str, settings: dict,
                                                            reason: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    path = tmp_path / "study.yaml"
    methods = {"sft": {}, method: settings}
    path.write_text(yaml.safe_dump(config(out, student_folder, methods)))
    assert main(["run", str(path), "--data-dir", str(tiny_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "students.own" in err and f"methods.{method}" in err and reason in err
    assert not out.exists()


class AnswersOnly:
    """A cache holding the teacher's answers (what kd2 reads), nothing else."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def answer(self, example_id: str) -> str:
        return self.answers[example_id]

    def __contains__(self, example_id: object) -> bool:
        return example_id in self.answers


def test_items_for_a_student_with_its_own_tokenizer(tiny_data_dir: Path, student_folder: Path) -> None:
    """kd2: the teacher's answers are text, encoded with the student's tokenizer; kd1: the gold sequence in
    the student's tokens with the teacher's own encoding beside it, aligned."""
    from types import SimpleNamespace

    from kdlab.job import train_items
    from kdlab.methods import Signals
    from kdlab.models import load_tokenizer, resolve_model_path
    from kdlab.stages.data import load_task_data
    from kdlab.tasks import get_task, settings_class
    from kdlab.tasks.base import encode

    teacher_tok = load_tokenizer(resolve_model_path("tiny-llama"))
    student_tok = load_tokenizer(str(student_folder))
    assert len(teacher_tok) == 512 and len(student_tok) == 400
    raw = yaml.safe_load(preset_text("smoke"))["tasks"]["squad"]
    settings = settings_class("squad", raw).model_validate(raw)
    task = get_task("squad", settings)
    td = load_task_data(task, settings, teacher_tok, tiny_data_dir, 1234)
    job = SimpleNamespace(evaluation=SimpleNamespace(batch_size=4), empty_answers="gold")
    answers = {i: "Denver Broncos won" for i in td.encoded}
    items = train_items(job, td, teacher_tok, Signals(answers=True), AnswersOnly(answers), None,  # type: ignore[arg-type]
                        student_tokenizer=student_tok)
    assert items
    by_id = {ex.id: ex for ex in td.train}
    for item in items:
        ex = by_id[item.gold.id]
        assert item.gold == encode(task, ex, td.prompts[ex.id], student_tok)
        assert item.teacher == encode(task, ex, td.prompts[ex.id], student_tok,
                                      target=task.answer_target("Denver Broncos won"))
        assert item.teacher_view is None  # kd2 reads no teacher distribution
    items = train_items(job, td, teacher_tok, Signals(top_k=8, temperature=2.0), None, None,  # type: ignore[arg-type]
                        student_tokenizer=student_tok)
    for item in items:
        ex = by_id[item.gold.id]
        assert item.gold == encode(task, ex, td.prompts[ex.id], student_tok)
        assert item.teacher_view == td.encoded[ex.id]  # the teacher's own encoding: the cache's rows
        assert item.alignment is not None
        assert item.alignment.student_tokens == sum(t != -100 for t in item.gold.labels)
    items = train_items(job, td, teacher_tok, Signals(layer_map="auto"), None, None,  # type: ignore[arg-type]
                        student_tokenizer=student_tok)
    assert items and all(item.teacher_view == td.encoded[item.gold.id] for item in items)  # kd3 reads it too
