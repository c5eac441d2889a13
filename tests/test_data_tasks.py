"""Tasks on your own data, defined in the study YAML alone: classification and generation read from CSV, JSON
lines, Parquet or a hub split through `datasets`, with the built-in tasks' ids, splits and error messages, and
run end to end in a tiny study. Whole-label scoring of classification against a brute-force sum."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import ConfigError, parse_config, preset_text
from kdlab.errors import DataError
from kdlab.evaluation import score_choices
from kdlab.registry import Registry
from kdlab.resolve import resolve_config
from kdlab.tasks import ClassificationTask, GenerationTask, get_task
from kdlab.tasks.base import encode_prompt
from kdlab.tiny import build_tiny_llama

CATEGORIES = {"billing": ["charged twice", "the invoice is wrong", "a refund for the year"],
              "outage": ["the site is down", "nothing loads", "the city map is gone"],
              "other": ["a new story idea", "the film list", "love the old garden"]}
LABELS = {"billing": " billing", "outage": " outage", "other": " other"}


def _tickets(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        category = list(CATEGORIES)[i % 3]
        rows.append({"ticket": f"T{seed}-{i:03d}", "subject": rng.choice(CATEGORIES[category]),
                     "body": f"ticket {i} : {rng.choice(CATEGORIES[category])}", "category": category})
    return rows


def _faq(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["river", "city", "bridge", "king", "queen", "castle", "garden", "music", "painter", "village"]
    rows = []
    for i in range(n):
        a, b = rng.choice(words), rng.choice(words)
        rows.append({"question": f"What is next to the {a} {i}?", "answer": [f"the {b}", f"{b}"]})
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tickets_section(train: Path, test: Path, **changes: Any) -> dict[str, Any]:
    section = {"kind": "classification", "data": {"train": str(train), "eval": str(test)},
               "text": "{subject}\n{body}", "label": "category", "labels": dict(LABELS),
               "prompt": "Ticket: {text}\nCategory:", "train_size": 24, "selection_size": 6, "eval_size": 9,
               "max_length": 96}
    section.update(changes)
    return section


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own_data")
    return {
        "train": _write_csv(root / "tickets.csv", _tickets(40, 1)),
        "test": _write_csv(root / "tickets_test.csv", _tickets(12, 2)),
        "faq_train": _write_jsonl(root / "faq.jsonl", _faq(30, 3)),
        "faq_test": _write_jsonl(root / "faq_test.jsonl", _faq(8, 4)),
        "root": root,
    }


def test_yaml_tasks_run_end_to_end(tmp_path: Path, files: dict[str, Path], tiny_data_dir: Path) -> None:
    data = yaml.safe_load(preset_text("smoke"))
    data["tasks"] = {
        "tickets": _tickets_section(files["train"], files["test"], transfer_size=4),
        "faq": {"kind": "generation",
                "data": {"train": str(files["faq_train"]), "eval": str(files["faq_test"])},
                "text": "{question}", "answer": "answer", "metric": "rouge_l", "prompt": "Q: {text}\nA:",
                "train_size": 16, "selection_size": 6, "max_length": 64, "max_new_tokens": 6},
    }
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "top_k": 8}, "kd2": {"lambda": 0.5}}
    data["seeds"] = [1]
    data["bench"] = {"examples": 2, "warmup": 0, "repeats": 1}
    config, out = tmp_path / "study.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(data))

    assert main(["run", str(config), "--out", str(out), "--data-dir", str(tiny_data_dir)]) == 0

    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    assert all(r.status == "done" for r in runs.values()), {i: r.status for i, r in runs.items()}
    for method in ("sft", "kd1", "kd2"):
        suffix = "-seed1" if method == "sft" else "-lam0.5-seed1"
        tickets, faq = runs[f"{method}-tickets-s1{suffix}"], runs[f"{method}-faq-s1{suffix}"]
        assert set(tickets.metrics["eval"]) >= {"accuracy", "macro_f1"}
        assert set(faq.metrics["eval"]) >= {"rouge_l"} and "f1" not in faq.metrics["eval"]
    # The same stable ids and splits as the built-in tasks: rows of the files, disjoint subsets.
    manifest = json.loads((out / "data" / "tickets.json").read_text())
    train, selection, transfer = (set(manifest[k]) for k in ("train", "selection", "transfer"))
    assert all(i.startswith("train-") for i in train | selection | transfer) and len(transfer) == 4
    assert len(manifest["eval"]) == 9 and all(i.startswith("eval-") for i in manifest["eval"])
    assert not (train & selection or train & transfer or selection & transfer)
    # Predictions name the labels as the data does.
    lines = (out / "runs" / "sft-tickets-s1-seed1" / "predictions_eval.jsonl").read_text().splitlines()
    assert {json.loads(line)["label"] for line in lines} <= set(LABELS)
    assert json.loads((out / "runs" / "sft-faq-s1-seed1" / "predictions_eval.json").read_text())
    # Report: both tasks with their own metrics, the paired statistics on per-example scores.
    summary = (out / "summary.md").read_text()
    assert "## tickets (accuracy, macro-F1 %" in summary and "## faq (ROUGE-L %" in summary
    scores = pd.read_csv(out / "per_example_scores.csv")
    assert set(scores["task"]) == {"tickets", "faq"}
    assert scores.loc[scores.task == "faq", "rouge_l"].notna().all()
    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance["data"]["tickets"]["files"]) == {str(files["train"]), str(files["test"])}
    bench = json.loads((out / "bench.json").read_text())
    assert {"tickets", "faq"} <= set(bench["models"]["teacher-base"]["tasks"])


def test_csv_jsonl_and_parquet_give_the_same_examples(files: dict[str, Path], tmp_path: Path) -> None:
    rows = _tickets(10, 5)
    sources = [_write_csv(tmp_path / "t.csv", rows), _write_jsonl(tmp_path / "t.jsonl", rows)]
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    sources.append(tmp_path / "t.parquet")
    loaded = []
    for path in sources:
        config = resolve_config(parse_config(_config({"t": _tickets_section(path, path, id="ticket")})))
        settings = config.tasks["t"]
        task = get_task("t", settings)
        assert isinstance(task, ClassificationTask)
        loaded.append(task.load("train"))
    assert loaded[0] == loaded[1] == loaded[2]
    first = loaded[0][0]
    assert first.id == "T5-000" and first.label == 0  # the id column; billing is the first label
    assert first.fields["text"] == f"{rows[0]['subject']}\n{rows[0]['body']}"


def test_hub_dataset_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(hub_id: str, *args: Any, split: str) -> list[dict[str, Any]]:
        calls.append((hub_id, args, split))
        return _faq(5, 6)

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    section = {"kind": "generation", "data": {"train": {"hub": "me/faq", "split": "train"},
                                              "eval": {"hub": "me/faq", "split": "test", "config": "en"}},
               "text": "{question}", "train_size": 2, "selection_size": 1}
    task = get_task("faq", resolve_config(parse_config(_config({"faq": section}))).tasks["faq"])
    assert isinstance(task, GenerationTask) and task.metrics == ("exact_match", "f1") and task.metric == "f1"
    examples = task.load("eval")
    assert calls[-1] == ("me/faq", ("en",), "test")
    assert [e.id for e in examples] == [f"eval-{i}" for i in range(5)]
    assert examples[0].answers[0].startswith("the ")
    assert "me/faq (split 'test', config 'en')" in task.source("eval")


def test_own_data_errors_name_the_file_and_field(files: dict[str, Path], tmp_path: Path,
                                                 tiny_data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    def load(**changes: Any) -> None:
        section = _tickets_section(files["train"], files["test"], **changes)
        config = resolve_config(parse_config(_config({"tickets": section})))
        get_task("tickets", config.tasks["tickets"]).load("train")

    with pytest.raises(DataError, match=r"tickets\.csv: no column\(s\) \['subjet'\]"):
        load(text="{subjet}")
    with pytest.raises(DataError, match=r"tickets\.csv: data row 2: label 'other' is not one of"):
        load(labels={"billing": " billing", "outage": " outage"})
    with pytest.raises(FileNotFoundError, match="nowhere.csv: data file not found"):
        load(data={"train": str(tmp_path / "nowhere.csv"), "eval": str(files["test"])})
    with pytest.raises(DataError, match="unknown data format '.xlsx'"):
        load(data={"train": str(tmp_path / "t.xlsx"), "eval": str(files["test"])})
    with pytest.raises(ValueError, match=r"tasks\.tickets\.prompt: must contain \{text\}"):
        load(prompt="Ticket:")
    with pytest.raises(ConfigError, match=r"tasks\.tickets\.labels"):
        load(labels={"a": " a"})
    with pytest.raises(ConfigError, match="tasks.tickets.kind: unknown kind 'regression'"):
        resolve_config(parse_config(_config({"tickets": {"kind": "regression"}})))
    # Sizes are checked against the files before anything is written (exit 2, the folder left alone).
    out = tmp_path / "out"
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_config({"tickets": _tickets_section(files["train"], files["test"],
                                                                          train_size=60)})))
    assert main(["run", str(config), "--out", str(out), "--data-dir", str(tiny_data_dir)]) == 2
    assert "tasks.tickets: train_size + selection_size + transfer_size = 66, but the train split in " \
           f"{files['train']} has 40 examples" in capsys.readouterr().err
    assert not out.exists()


def test_whole_labels_are_scored_by_their_summed_log_probability(tiny_tokenizer) -> None:
    model = build_tiny_llama(tiny_tokenizer, num_layers=2, seed=3).eval()
    prompts = [encode_prompt(p, tiny_tokenizer) for p in ("Review: a great film", "Review: dull",
                                                          "Context: Paris Question: capital? Answer:")]
    choices = [tiny_tokenizer(w, add_special_tokens=False).input_ids for w in (" positive", " negative story",
                                                                              " the city of Paris")]
    assert len({len(c) for c in choices}) > 1
    with torch.no_grad():
        expected = []
        for p in prompts:
            sums = []
            for c in choices:
                logp = model(torch.tensor([p + c])).logits[0].float().log_softmax(-1)
                sums.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
            expected.append(max(range(len(choices)), key=lambda i: sums[i]))
    got = score_choices(model, prompts, choices, pad_id=tiny_tokenizer.pad_token_id, batch_size=4)
    assert got == expected
    # One token per label: the fast path (the last position only) agrees with the general one.
    single = [c[:1] for c in choices]
    with torch.no_grad():
        last = [model(torch.tensor([p])).logits[0, -1].log_softmax(-1) for p in prompts]
    expected = [max(range(3), key=lambda i, lp=lp: float(lp[single[i][0]])) for lp in last]
    assert score_choices(model, prompts, single, pad_id=0, batch_size=4) == expected


def _config(tasks: dict[str, Any]) -> dict[str, Any]:
    data = yaml.safe_load(preset_text("smoke"))
    data["tasks"] = tasks
    data["methods"] = {"sft": {}}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    return data
