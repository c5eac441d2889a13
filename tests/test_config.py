"""Study config validation: every bad config fails before anything is written, naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.cli import main
from kdlab.config import (
    ConfigError,
    StudyConfig,
    load_config,
    load_preset,
    parse_config,
    preset_text,
)
from kdlab.identity import run_hash
from kdlab.methods.kd1 import KD1Settings
from kdlab.methods.kd3 import KD3Settings
from kdlab.preflight import check_training_arguments
from kdlab.resolve import resolve_config
from kdlab.tasks import SquadSettings, SST2Settings


def _base() -> dict[str, Any]:
    """A small valid config as plain data, for tests to break one field at a time."""
    return {
        "name": "t",
        "teacher": {"model": "tiny-llama", "adapt": False},
        "students": [{"name": "s1", "derive": {"num_layers": 2}}],
        "tasks": {"sst2": {"train_size": 16, "selection_size": 4, "eval_size": 8},
                  "squad": {"train_size": 8, "selection_size": 4, "eval_size": 4, "max_new_tokens": 7}},
        "methods": {"sft": {}, "kd1": {"lambda": [0.5, 1.0], "temperature": 3.0, "top_k": 8},
                    "kd3": {"lambda": 0.25, "layer_map": [[0, 1], [1, 3]], "loss": "cosine"}},
        "training": {"learning_rate": 0.001, "batch_size": 4},
        "seeds": [1, 2],
    }


def _parse(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """The config with its task and method sections typed (what a study reads)."""
    return resolve_config(parse_config(data, source), source)


def _preset(name: str) -> StudyConfig:
    return resolve_config(load_preset(name), f"preset {name}")


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config = _parse(data, "my.yaml")
        check_training_arguments(config)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name", ["demo", "thesis", "smoke"])
def test_presets_validate(name: str) -> None:
    config = _preset(name)
    assert isinstance(config, StudyConfig)
    assert config.name == name
    assert config.students and config.tasks and config.methods and config.seeds


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset_text("nope")


def test_smoke_preset_is_what_the_study_tests_assume() -> None:
    config = _preset("smoke")
    assert config.device == "cpu" and config.teacher.model == "tiny-llama"
    assert set(config.methods) == {"sft", "kd1", "kd2", "kd3"} and set(config.tasks) == {"sst2", "squad"}


# ---------------------------------------------------------------------------------------------------------
# errors name the dotted path


def test_valid_base() -> None:
    config = _parse(_base())
    kd1 = config.methods["kd1"]
    assert isinstance(kd1, KD1Settings) and kd1.lam == [0.5, 1.0] and kd1.temperature == [3.0]
    kd3 = config.methods["kd3"]
    assert isinstance(kd3, KD3Settings) and kd3.layer_map == [[(0, 1), (1, 3)]]  # one explicit map
    assert isinstance(config.tasks["sst2"], SST2Settings) and isinstance(config.tasks["squad"], SquadSettings)
    assert config.tasks["squad"].max_new_tokens == 7


def test_unknown_key_top_level_section() -> None:
    data = _base()
    data["evaluation"] = {"batch_sise": 4}
    msg = _error(data)
    assert "my.yaml" in msg and "evaluation.batch_sise" in msg


def test_unknown_key_in_a_task() -> None:
    data = _base()
    data["tasks"]["sst2"]["bogus"] = 1
    assert "tasks.sst2.bogus" in _error(data)


def test_unknown_key_in_a_method() -> None:
    data = _base()
    data["methods"]["kd1"]["temprature"] = 2.0
    assert "methods.kd1.temprature" in _error(data)


def test_unknown_key_nested() -> None:
    data = _base()
    data["students"][0]["lora"] = {"rank": 4}
    assert "students.0.lora.rank" in _error(data)


def test_wrong_type() -> None:
    data = _base()
    data["training"]["batch_size"] = "eight"
    msg = _error(data)
    assert "training.batch_size" in msg and "integer" in msg and "'eight'" in msg


def test_negative_lambda_names_method_and_field() -> None:
    data = _base()
    data["methods"]["kd1"]["lambda"] = -0.1
    msg = _error(data)
    assert "methods.kd1" in msg and "lambda" in msg and "-0.1" in msg


def test_lambda_above_one() -> None:
    data = _base()
    data["methods"]["kd3"]["lambda"] = [0.5, 1.5]
    assert "methods.kd3.lambda" in _error(data)


def test_empty_seeds() -> None:
    data = _base()
    data["seeds"] = []
    assert "seeds" in _error(data)


def test_duplicate_seeds() -> None:
    data = _base()
    data["seeds"] = [1, 1]
    assert "seeds must be distinct" in _error(data)


def test_eval_size_larger_than_split() -> None:
    data = _base()
    data["tasks"]["sst2"]["eval_size"] = 900
    msg = _error(data)
    assert "tasks.sst2" in msg and "900" in msg and "872" in msg


def test_train_size_larger_than_split() -> None:
    data = _base()
    data["tasks"]["sst2"]["train_size"] = 67349  # + selection_size 4
    assert "tasks.sst2" in _error(data)


def test_unknown_task_and_method() -> None:
    data = _base()
    data["tasks"]["mnli"] = {}
    assert "unknown task 'mnli'" in _error(data)
    data = _base()
    data["methods"]["kd4"] = {}
    assert "unknown method 'kd4'" in _error(data)


def test_student_with_model_and_derive() -> None:
    data = _base()
    data["students"][0]["model"] = "tiny-llama"
    msg = _error(data)
    assert "students.0" in msg and "exactly one" in msg


def test_student_with_neither_model_nor_derive() -> None:
    data = _base()
    del data["students"][0]["derive"]
    assert "students.0" in _error(data)


def test_derive_layers_distinct() -> None:
    data = _base()
    data["students"][0]["derive"] = {"layers": [1, 1]}
    assert "students.0.derive" in _error(data)


def test_missing_teacher() -> None:
    data = _base()
    del data["teacher"]
    assert "teacher" in _error(data)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


# ---------------------------------------------------------------------------------------------------------
# hash and YAML


def test_dump_keeps_every_setting_of_every_section() -> None:
    """study.yaml (to_yaml) is what later commands read back: every setting must be in it, the settings of
    the method and task sections (subclasses of the declared field type) included."""
    text = _parse(_base()).to_yaml()
    for change in (
        lambda d: d["training"].update(learning_rate=0.002),
        lambda d: d["training"].update(gradient_accumulation_steps=2),
        lambda d: d.update(seeds=[1, 3]),
        lambda d: d["methods"]["kd1"].update(top_k=16),
        lambda d: d["methods"]["kd3"].update(loss="mse"),
        lambda d: d["tasks"]["squad"].update(max_new_tokens=9),
        lambda d: d["tasks"]["sst2"].update(label_words=[" bad", " good"]),
        lambda d: d.update(executor={"kind": "ray", "num_gpus": 1}),
        lambda d: d["training"].update(packing=True),
        lambda d: d["training"].update(teacher_sharding="shard"),
        lambda d: d.update(evaluation={"backend": "vllm"}),
    ):
        data = _base()
        change(data)
        changed = _parse(data)
        assert changed.to_yaml() != text
        assert _parse(yaml.safe_load(changed.to_yaml())) == changed


@pytest.mark.parametrize("source", ["base", "smoke", "demo"])
def test_yaml_round_trip(source: str) -> None:
    config = _parse(_base()) if source == "base" else _preset(source)
    text = config.to_yaml()
    again = _parse(yaml.safe_load(text))
    assert again == config
    assert again.to_yaml() == text
    assert again == config


def test_to_yaml_writes_method_settings() -> None:
    # Not only a round trip: defaults filled in on re-parse would hide settings missing from the text.
    data = yaml.safe_load(_parse(_base()).to_yaml())
    assert data["methods"]["kd1"]["lambda"] == [0.5, 1.0] and data["methods"]["kd1"]["top_k"] == [8]
    assert data["tasks"]["squad"]["max_new_tokens"] == 7


def test_single_values_become_grid_lists() -> None:
    config = _parse(_base())
    assert config.methods["kd3"].lam == [0.25]
    assert config.methods["kd1"].grid_axes() == {"lam": [0.5, 1.0], "temperature": [3.0],
                                                 "divergence": ["forward_kl"], "top_k": [8]}
    assert config.methods["kd3"].grid_axes()["layer_map"] == [[(0, 1), (1, 3)]]


def test_layer_maps_and_k_as_grid_axes() -> None:
    data = _base()
    data["methods"]["kd3"]["layer_map"] = ["uniform", "last", [[1, 2]]]
    data["methods"]["kd1"]["top_k"] = [8, 16]
    config = _parse(data)
    assert config.methods["kd3"].grid_axes()["layer_map"] == ["uniform", "last", [(1, 2)]]
    assert config.methods["kd1"].grid_axes()["top_k"] == [8, 16]
    data["methods"]["kd1"]["top_k"] = [0]
    with pytest.raises(ConfigError, match="methods.kd1"):
        _parse(data)


# ---------------------------------------------------------------------------------------------------------
# the command line refuses a bad config before writing anything


def test_cli_run_bad_config_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(_base())
    data["output_dir"] = str(tmp_path / "from_config")
    data["training"]["learnin_rate"] = 0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    # A TrainingArguments field is checked by preflight (the config module knows no transformers).
    assert "kdlab: error:" in err and "training.learnin_rate" in err
    assert not out.exists() and not (tmp_path / "from_config").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]
    data["training"]["batch_size"] = "eight"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert "bad.yaml" in capsys.readouterr().err and not out.exists()

    assert main(["run", str(path)]) == 2  # the config's own output_dir is not created either
    assert not (tmp_path / "from_config").exists()


def test_cli_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert main(["config", "check", str(path)]) == 0
    assert "valid study config" in capsys.readouterr().out
    data = _base()
    data["methods"]["kd1"]["lambda"] = -0.1
    path.write_text(yaml.safe_dump(data))
    assert main(["config", "check", str(path)]) == 2
    assert "methods.kd1" in capsys.readouterr().err


def test_cli_config_and_preset_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_base()))
    assert main(["run", str(path), "--preset", "smoke", "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"optim": "nope"}, "training: TrainingArguments refused it: nope is not a valid OptimizerNames"),
        ({"adam_beta1": "a"}, "training.adam_beta1: Input should be a valid number"),
        ({"seed": 3}, "training.seed: set by kdlab"),
        ({"num_train_epochs": 2}, "training.num_train_epochs: give kdlab's `epochs` instead"),
        ({"lerning_rate": 1}, "training.lerning_rate: not a field of transformers' TrainingArguments"),
        ({"lerning_rate": 1}, "(did you mean 'learning_rate'?)"),
    ],
)
def test_trainer_arguments_are_checked_by_transformers(extra: dict[str, Any], message: str) -> None:
    data = _base()
    data["training"].update(extra)
    assert message in _error(data)


def test_trainer_arguments_change_the_dump_only_when_given() -> None:
    plain = _parse(_base())
    data = _base()
    data["training"]["report_to"] = ["tensorboard"]
    given = _parse(data)
    assert "report_to" not in plain.to_yaml() and "report_to:\n  - tensorboard" in given.to_yaml()
    assert run_hash(plain.training) != run_hash(given.training)  # run hashes read every setting
