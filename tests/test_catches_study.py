"""One small study, recorded from the inside, for the checks that need a whole study to mean anything.

The study: SST-2 with a transfer set, SFT and KD2 over λ ∈ {0.5, 1}, seeds 1 and 2, `deterministic: true`.
While it runs, every trainer is recorded as it is built (its examples, the initial trainable weights, the
example order of its batches, whether deterministic algorithms are on), and the evaluation of the KD2 runs is
rigged so that the selection split and the evaluation split rank the two λ the other way round. The tests
then read what the study did:
- KD2 trains on the teacher's answers (the cache's), and transfer rows carry the teacher's answers, never
  their gold labels;
- the setting is chosen on the selection split (selection.json, the runs of the other seed, the report);
- `deterministic: true` reaches training;
- each run draws from its own seed: seeds differ → initial adapters and data orders differ; a finished run
  redone in a fresh process gives bit-identical weights;
- an accepted config change keeps the earlier config as study.<time>.yaml.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_study import _mini_config

import kdlab.evaluation
import kdlab.training
from kdlab.cli import main
from kdlab.registry import Registry, RunRecord
from kdlab.selection import best_run

SELECTION = {"lam0.5": 80.0, "lam1": 20.0}  # KD2's rigged selection-split accuracy per λ...
EVAL = {"lam0.5": 30.0, "lam1": 90.0}  # ...and evaluation-split accuracy: the rankings disagree


@dataclass
class Trained:
    items: list[Any]
    initial: dict[str, torch.Tensor]  # trainable weights before the first step
    order: list[list[str]] = field(default_factory=list)  # example ids of each batch, in order
    deterministic: bool = False


@dataclass
class Study:
    out: Path
    data_dir: Path
    config: Path
    trained: dict[str, Trained]  # run name -> what its trainer got


def _rigged(desc: str | None, metrics: dict[str, Any]) -> dict[str, Any]:
    label, _, split = (desc or "").rpartition(" ")
    if not label.startswith("kd2-"):
        return metrics
    lam = next(part for part in label.split("-") if part.startswith("lam"))
    value = (SELECTION if split == "selection" else EVAL)[lam]
    return {k: (value if k != "n" and isinstance(v, float) else v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Study:
    root = tmp_path_factory.mktemp("catches")
    out = root / "out"
    data = _mini_config(out)
    data["methods"] = {"sft": {}, "kd2": {"lambda": [0.5, 1.0]}}
    data["tasks"]["sst2"]["transfer_size"] = 8
    data["seeds"] = [1, 2]
    data["deterministic"] = True
    data["bench"] = {"enabled": False}
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    trained: dict[str, Trained] = {}
    init, evaluate = kdlab.training.KDTrainer.__init__, kdlab.evaluation.evaluate

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        model = kwargs["model"]
        record = Trained(
            items=list(kwargs["train_dataset"]),
            initial={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
        trained[self.args.run_name] = record
        collate = self.data_collator

        def recording_collate(batch: list[Any]) -> Any:
            record.order.append([it.gold.id for it in batch])
            return collate(batch)

        self.data_collator = recording_collate

    def rigged_evaluate(*args: Any, **kwargs: Any) -> Any:
        result = evaluate(*args, **kwargs)
        result.metrics = _rigged(kwargs.get("desc"), result.metrics)
        return result

    deterministic = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kdlab.training.KDTrainer, "__init__", recording_init)
        mp.setattr(kdlab.evaluation, "evaluate", rigged_evaluate)
        mp.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
        try:
            code = main(["run", str(config), "--out", str(out), "--data-dir", str(tiny_data_dir)])
        finally:
            # `deterministic: true` is global to torch: the rest of the session must not inherit it.
            torch.use_deterministic_algorithms(deterministic)
            torch.backends.cudnn.deterministic = False
    assert code == 0
    return Study(out, tiny_data_dir, config, trained)


def _target_text(tokenizer: Any, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True).strip()


def _answers(out: Path) -> dict[str, str | None]:
    lines = (out / "teacher_cache" / "sst2" / "answers.jsonl").read_text().splitlines()
    return {rec["id"]: rec["answer"] for rec in map(json.loads, lines)}


def _gold_labels(data_dir: Path) -> dict[int, str]:
    rows = (data_dir / "sst2" / "train.tsv").read_text().splitlines()[1:]
    return {i: row.rsplit("\t", 1)[1] for i, row in enumerate(rows)}


def _continuation(label: str) -> str:
    from kdlab.tasks import SST2Task

    return SST2Task().answer_target(label).strip()


def test_kd2_trains_on_the_teachers_answers(study: Study, tiny_tokenizer: Any) -> None:
    answers = _answers(study.out)
    kd2 = {name: t for name, t in study.trained.items() if name.startswith("kd2-")}
    assert set(kd2) == {"kd2-sst2-s1-lam0.5-seed1", "kd2-sst2-s1-lam1-seed1", "kd2-sst2-s1-lam0.5-seed2"}
    differs = 0
    for name, t in kd2.items():
        gold_rows = [it for it in t.items if not it.transfer]
        assert gold_rows, name
        for it in gold_rows:
            teacher = _target_text(tiny_tokenizer, it.teacher.labels)
            assert teacher == _continuation(answers[it.gold.id]), (name, it.gold.id)
            differs += teacher != _target_text(tiny_tokenizer, it.gold.labels)
    # The untrained teacher disagrees with the gold label on some examples: gold targets would not pass.
    assert differs > 0


def test_transfer_rows_carry_the_teachers_answers_never_their_gold_labels(study: Study,
                                                                          tiny_tokenizer: Any) -> None:
    answers = _answers(study.out)
    gold = _gold_labels(study.data_dir)
    subsets = json.loads((study.out / "data" / "sst2.json").read_text())
    transfer_ids = set(subsets["transfer"])
    assert len(transfer_ids) == 8
    differs = 0
    for name, t in study.trained.items():
        rows = [it for it in t.items if it.transfer]
        if name.startswith("sft-"):
            assert rows == [], f"{name}: SFT must never see the transfer set"
            continue
        assert {it.gold.id for it in rows} <= transfer_ids and rows, name
        for it in rows:
            target = _target_text(tiny_tokenizer, it.gold.labels)
            assert target == _continuation(answers[it.gold.id]), (name, it.gold.id)
            if it.teacher is not None:
                assert it.teacher.labels == it.gold.labels
            row = int(str(it.gold.id).rsplit("-", 1)[1])
            differs += target != _continuation(gold[row])
    assert differs > 0, "every transfer answer equals its gold label: the test would prove nothing"


def test_the_setting_is_chosen_on_the_selection_split(study: Study) -> None:
    """KD2's λ = 0.5 wins on the selection split and loses on the evaluation split: λ = 0.5 is chosen, its
    other seed is run, and the report shows λ = 0.5's evaluation accuracy (30), not λ = 1's (90)."""
    chosen = json.loads((study.out / "selection.json").read_text())["kd2-sst2-s1"]
    assert chosen["chosen"]["lam"] == 0.5 and chosen["run"] == "kd2-sst2-s1-lam0.5-seed1"
    runs = {r.id: r for r in Registry(study.out / "registry.sqlite").runs(kind="student")}
    assert "kd2-sst2-s1-lam0.5-seed2" in runs and "kd2-sst2-s1-lam1-seed2" not in runs
    assert runs["kd2-sst2-s1-lam1-seed1"].metrics["eval"]["accuracy"] == 90.0  # the rigging took
    summary = (study.out / "summary.md").read_text()
    kd2_rows = [line for line in summary.splitlines() if line.startswith("|") and "kd2" in line.lower()]
    assert kd2_rows and all("90.0" not in line for line in kd2_rows), kd2_rows
    assert any("30.0" in line for line in kd2_rows), kd2_rows


def _record(run_id: str, selection: float, evaluation: float) -> RunRecord:
    return RunRecord(id=run_id, kind="student", task="sst2", method="kd1", student="s1", stage="grid",
                     params={"id": run_id}, seed=1, config_hash="h", status="done",
                     metrics={"selection": {"accuracy": selection}, "eval": {"accuracy": evaluation}},
                     wall_time=1.0, owner=None, heartbeat=None, attempts=1, error=None, output_dir=run_id,
                     created_at=0.0, started_at=0.0, finished_at=1.0)


def test_best_run_follows_the_selection_split_not_the_evaluation_split() -> None:
    runs = [_record("a", 70.0, 95.0), _record("b", 85.0, 60.0), _record("c", 40.0, 99.0),
            _record("d", float("nan"), 100.0)]
    assert best_run(runs, "accuracy").id == "b"
    assert best_run(list(reversed(runs)), "accuracy").id == "b"


def test_deterministic_true_reaches_training(study: Study) -> None:
    assert study.trained and all(t.deterministic for t in study.trained.values()), \
        {n: t.deterministic for n, t in study.trained.items()}
    provenance = json.loads((study.out / "provenance.json").read_text())
    assert provenance["deterministic"] is True


def test_each_run_draws_from_its_own_seed(study: Study) -> None:
    for a, b in [("sft-sst2-s1-seed1", "sft-sst2-s1-seed2"),
                 ("kd2-sst2-s1-lam0.5-seed1", "kd2-sst2-s1-lam0.5-seed2")]:
        ta, tb = study.trained[a], study.trained[b]
        assert ta.initial.keys() == tb.initial.keys() and ta.initial
        lora_a = [n for n in ta.initial if "lora_A" in n]
        assert lora_a and all(not torch.equal(ta.initial[n], tb.initial[n]) for n in lora_a), (a, b)
        assert sorted(sum(ta.order, [])) == sorted(sum(tb.order, []))  # the same examples...
        assert ta.order != tb.order, (a, b)  # ...in another order


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_finished_run_redone_in_a_fresh_process_is_bit_identical(study: Study) -> None:
    """Remove one finished run (its folder and its registry row) and let a fresh `kdlab sweep` redo it:
    same weights, bit for bit, and nothing else redone."""
    run = "kd2-sst2-s1-lam0.5-seed2"
    folder = study.out / "runs" / run
    before = _weights(folder / "model")
    assert before
    others = {r.id: r.finished_at for r in Registry(study.out / "registry.sqlite").runs() if r.id != run}
    moved = folder.with_name(run + ".first")
    folder.rename(moved)
    with sqlite3.connect(study.out / "registry.sqlite") as db:
        assert db.execute("DELETE FROM runs WHERE id = ?", (run,)).rowcount == 1
    proc = subprocess.run(
        [sys.executable, "-m", "kdlab.cli", "sweep", "--out", str(study.out),
         "--data-dir", str(study.data_dir)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONHASHSEED="random"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    after = _weights(folder / "model")
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before), "the redone run's weights differ"
    rows = {r.id: r for r in Registry(study.out / "registry.sqlite").runs()}
    assert rows[run].done
    assert {i: rows[i].finished_at for i in others} == others  # nothing else was redone


def test_an_accepted_config_change_keeps_the_earlier_config(study: Study, no_training: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """README: an accepted change keeps the earlier config as study.<time>.yaml (last: renames the study)."""
    old = (study.out / "study.yaml").read_text()
    assert not list(study.out.glob("study.*.yaml"))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        code = main(["run", str(study.config), "--out", str(study.out), "--data-dir", str(study.data_dir),
                     "--set", "name=renamed"])
    finally:  # the study is `deterministic: true`, global to torch: not for the rest of the session
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic = False
    assert code == 0
    kept = list(study.out.glob("study.*.yaml"))
    assert len(kept) == 1 and kept[0].name.split(".")[1].isdigit(), kept
    assert kept[0].read_text() == old
    assert yaml.safe_load((study.out / "study.yaml").read_text())["name"] == "renamed"


def test_every_groups_grid_runs_before_any_other_seed(study: Study) -> None:
    """The sweep starts every group's grid (first seed) before any group's other seeds, so that with several
    workers the last groups' grids do not wait behind the first groups' seeds."""
    runs = Registry(study.out / "registry.sqlite").runs(kind="student")
    grid = [r.started_at for r in runs if r.seed == 1]
    others = [r.started_at for r in runs if r.seed == 2]
    assert len(grid) == 3 and len(others) == 2  # sft and kd2's two settings; sft and kd2's best
    assert max(grid) < min(others)
