"""The `kdlab` command line: help texts, `config show`, and `score` against hand-computed metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from kdlab.cli import build_parser, main
from kdlab.config import PRESETS, load_preset, parse_config, preset_text


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every (sub)command path with its parser and its one-line help from the parent's listing."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), sub, helps.get(name)
                yield from _subcommands(sub, (*prefix, name))


COMMANDS = [path for path, _, _ in _subcommands(build_parser())]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help([], capsys)
    assert text.startswith("usage: kdlab")
    assert "distillation" in text.lower() and "examples:" in text
    for path in COMMANDS:
        if len(path) == 1:
            assert path[0] in text
    assert {("run",), ("config",), ("config", "show"), ("config", "check"), ("score",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_subcommand_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(list(path), capsys)
    assert text.startswith(f"usage: kdlab {' '.join(path)}")
    sub, line = next((s, h) for p, s, h in _subcommands(build_parser()) if p == path)
    assert line and len(line) > 10, f"`kdlab {' '.join(path)}` has no one-line help in its parent's listing"
    if sub.description:
        assert sub.description.split()[0] in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("kdlab ")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage: kdlab" in capsys.readouterr().err


@pytest.mark.parametrize("name", PRESETS)
def test_config_show(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", name]) == 0
    text = capsys.readouterr().out
    config = parse_config(yaml.safe_load(text), f"`kdlab config show {name}`")
    assert config == load_preset(name)


def test_config_show_copy_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The workflow of the help epilog: show a preset into a file, then check (and later run) it."""
    assert main(["config", "show", "smoke"]) == 0
    path = tmp_path / "my_study.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["config", "check", str(path)]) == 0
    assert "valid study config" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# kdlab score

_DEV = {
    "version": "1.1",
    "data": [{
        "title": "Super_Bowl_50",
        "paragraphs": [{
            "context": "The Denver Broncos defeated the Carolina Panthers on February 7, 2016, at Levi's "
                       "Stadium in Santa Clara, California. The winners got gold rings.",
            "qas": [
                {"id": "q1", "question": "Who won?",
                 "answers": [{"text": "Denver Broncos", "answer_start": 4},
                             {"text": "Broncos", "answer_start": 11}]},
                {"id": "q2", "question": "Where?",
                 "answers": [{"text": "Santa Clara, California", "answer_start": 92}]},
                {"id": "q3", "question": "When?",
                 "answers": [{"text": "February 7, 2016", "answer_start": 53},
                             {"text": "February 7", "answer_start": 53}]},
                {"id": "q4", "question": "What rings?", "answers": [{"text": "gold", "answer_start": 133}]},
            ],
        }],
    }],
}


def test_score_squad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "dev-v1.1.json"
    dev.write_text(json.dumps(_DEV))
    predictions = {
        "q1": "the Denver Broncos!",  # articles and punctuation are normalised away: EM 1, F1 1
        "q2": "Santa Clara",  # EM 0; F1: precision 2/2, recall 2/3 -> 0.8
        "q3": "7 February",  # EM 0 (order); F1 against "February 7" (the best gold answer): 1
        "q4": "silver",  # 0, 0
    }
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(predictions))
    assert main(["score", "squad", str(preds), "--data", str(dev)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) >= {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)


def test_score_sst2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = tmp_path / "validation.tsv"
    rows = [("a great film", 1), ("dull and boring", 0), ("the best movie", 1), ("terrible", 0),
            ('a "quoted fun', 1)]
    refs.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    guesses = [1, 0, 0, 0, 1]  # 4 of 5 right
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"id": f"validation-{i}", "label": g}) + "\n"
                             for i, g in enumerate(guesses)))
    assert main(["score", "sst2", str(preds), "--data", str(refs)]) == 0
    # Positives: 2 of 3 found, no false alarm (F1 0.8); negatives: both found, one false alarm (F1 0.8).
    scores = json.loads(capsys.readouterr().out)
    assert scores == {"accuracy": pytest.approx(80.0), "macro_f1": pytest.approx(80.0)}


def test_score_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = tmp_path / "validation.tsv"
    refs.write_text("sentence\tlabel\ngood\t1\n")
    assert main(["score", "sst2", str(tmp_path / "nope.jsonl"), "--data", str(refs)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("task, wrong", [("sst2", "squad"), ("squad", "sst2")])
def test_score_with_the_other_tasks_data_is_one_line_naming_the_file(
    task: str, wrong: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdlab score sst2 preds.jsonl --data squad/dev-v1.1.json` (a 4.8 MB one-line JSON file) raised csv's
    `field larger than field limit` as a traceback: it must be exit 2 and one line naming the file."""
    squad = tmp_path / "dev-v1.1.json"
    context = "The river of the old city. " * 6000  # one line longer than csv's 131,072-character field limit
    squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": [{"id": "q1", "question": "What?",
                                      "answers": [{"text": "river", "answer_start": 4}]}]}]}]}))
    sst2 = tmp_path / "validation.tsv"
    sst2.write_text("sentence\tlabel\na great film\t1\n")
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"id": "validation-0", "label": 1}) + "\n")
    data = squad if wrong == "squad" else sst2
    assert main(["score", task, str(preds), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(data) in err and err.startswith("kdlab: error:"), err


# ---------------------------------------------------------------------------------------------------------
# one way to name the study folder, overrides, dry runs, status as JSON


def test_python_m_kdlab_is_the_cli() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kdlab", "--version"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and done.stdout.startswith("kdlab ")


def test_every_study_command_takes_out() -> None:
    parser = build_parser()
    for path in COMMANDS:
        if path[0] in ("config", "score") or path == ("registry",):
            continue  # no study folder, or a group of commands
        args = parser.parse_args([*path, "--out", "somewhere"])
        assert args.out == "somewhere", path


def test_set_overrides_any_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(preset_text("smoke"))
    argv = ["config", "check", str(path), "--set", "seeds=[3, 4, 5]", "--set", "training.learning_rate=0.5"]
    assert main(argv) == 0
    assert "3 seed(s)" in capsys.readouterr().out
    assert main(["config", "check", str(path), "--set", "training.lerning_rate=1"]) == 2
    assert "training.lerning_rate" in capsys.readouterr().err
    assert main(["config", "check", str(path), "--set", "seeds"]) == 2
    assert "expected KEY.SUB=VALUE" in capsys.readouterr().err


def test_dry_run_lists_the_runs_and_writes_nothing(tmp_path: Path, tiny_data_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["-q", "run", "--preset", "smoke", "--out", str(out), "--data-dir", str(tiny_data_dir),
            "--dry-run", "--set", "methods.kd3.lambda=[0.25, 0.5]"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [line.split() for line in captured.out.splitlines()]
    assert all(status == "todo" for status, _ in lines) and captured.err == ""
    ids = [run_id for _, run_id in lines]
    assert ids[:4] == ["teacher-sst2-zero-shot", "teacher-sst2", "teacher-squad-zero-shot", "teacher-squad"]
    assert {"cache-sst2", "sft-sst2-s1-seed1", "sft-sst2-s1-seed2", "kd3-squad-s1-lam0.25-seed1",
            "kd3-squad-s1-<best>-seed2", "kd2-squad-s1-lam0.5-seed2"} <= set(ids)
    assert not out.exists()
    import transformers.utils.logging

    transformers.utils.logging.enable_progress_bar()  # as the other tests expect it


def test_status_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.registry import Registry, RunSpec

    registry = Registry(tmp_path / "registry.sqlite")
    for i, method in enumerate(("sft", "kd1")):
        spec = RunSpec(id=f"{method}-sst2-s1-seed1", kind="student", task="sst2", method=method, student="s1",
                       stage="grid", params={}, seed=1, config_hash="h", output_dir="")
        registry.add(spec)
        assert registry.claim(spec.id)
        registry.finish(spec.id, {"eval": {"accuracy": 60.0 + i, "macro_f1": 50.0, "n": 10}}, 1.0)
    assert main(["status", "--out", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {"done": 2, "running": 0, "failed": 0, "todo": 0}
    assert [(r["id"], r["metric"], r["value"]) for r in status["runs"]] == [
        ("sft-sst2-s1-seed1", "accuracy", 60.0), ("kd1-sst2-s1-seed1", "accuracy", 61.0)]
    assert [b["run"] for b in status["best"]] == ["kd1-sst2-s1-seed1", "sft-sst2-s1-seed1"]
    assert main(["status", str(tmp_path)]) == 0  # the folder alone works too
    assert "2 done" in capsys.readouterr().out


@pytest.mark.parametrize("loudness, loading_bars, kdlab_lines", [([], False, True), (["-v"], True, True),
                                                                 (["-q"], False, False)])
def test_a_runs_bars_are_its_own_and_transformers_loading_bars_show_with_verbose_only(
    loudness: list[str], loading_bars: bool, kdlab_lines: bool, tiny_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """transformers draws a bar per checkpoint it loads: dozens in a study, burying kdlab's own lines; the
    Trainer's bar is named after its run, like the run's eval bars."""
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"sft": {}}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    argv = [*loudness, "run", str(config), "--out", str(tmp_path / "out"), "--data-dir", str(tiny_data_dir)]
    try:
        assert main(argv) == 0
    finally:
        import datasets.utils.logging
        import transformers.utils.logging

        # as an unconfigured process has them, for the tests after this one
        transformers.utils.logging.set_tqdm_hook(None)
        transformers.utils.logging.enable_progress_bar()
        datasets.utils.logging.enable_progress_bar()
    err = capsys.readouterr().err
    assert ("Loading weights" in err) == loading_bars, err[-3000:]
    assert ("sft-sst2-s1-seed1 train" in err) == kdlab_lines, err[-3000:]
    assert ("[done] sft-sst2-s1-seed1" in err) == kdlab_lines, err[-3000:]


def test_a_launched_command_leaves_its_process_group_before_exit(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Left to interpreter exit, a gloo group can abort a rank whose work is done (SIGABRT, "terminate called
    without an active exception"; seen once in a two-rank DDP launch), and torchrun reports the launch
    failed."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["config", "show", "smoke"]) == 0
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        assert main(["config", "check", str(tmp_path / "missing.yaml")]) == 2  # refused: left as well
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    capsys.readouterr()
