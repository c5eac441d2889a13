"""Extending kdlab without touching it: a new method is one module named under `plugins:`, run end to end in
a tiny study (the smoke preset's models and the synthetic data folder)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import kdlab
from kdlab.config import ConfigError, parse_config, preset_text
from kdlab.methods import METHODS
from kdlab.registry import Registry
from kdlab.resolve import resolve_config

# Token-level hard-label KD: the student learns the teacher's most likely token at each answer position. It
# reads the teacher's top-1 (cached, or a live teacher's logits) and needs nothing else from kdlab.
TOP1_PLUGIN = '''
from kdlab import losses
from kdlab.methods import LossInputs, Method, MixedSettings, Signals, register, task_ce


@register
class TopOne(Method):
    name = "top1"
    settings = MixedSettings  # one grid axis: lambda
    kd_term = "cross-entropy on the teacher's top-1 tokens, nats"

    def signals(self, params):
        return Signals(top_k=1, temperature=1.0)

    def loss(self, x: LossInputs):
        ce = task_ce(x)
        target = x.teacher.top_tokens(1)[:, 0]  # cached or live alike
        kd = losses.cross_entropy_tokens(x.student.logits, target, num_tokens=x.num_tokens)
        return losses.mix(ce, kd, float(x.params["lam"])), {"ce": ce, "kd": kd}
'''


@pytest.fixture
def registries() -> Iterator[None]:
    """Plugins register into the process-wide registries: put them back as they were after the test."""
    methods = dict(METHODS)
    modules = set(sys.modules)
    yield
    METHODS.clear()
    METHODS.update(methods)
    for name in set(sys.modules) - modules:
        if name == "top1_kd":
            del sys.modules[name]


def _smoke(**changes: Any) -> dict[str, Any]:
    """The smoke preset cut down to SST-2, one seed and no bench."""
    data = yaml.safe_load(preset_text("smoke"))
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    data.update(changes)
    return data


def test_a_new_method_is_one_module(tmp_path: Path, tiny_data_dir: Path, registries: None) -> None:
    plugin = tmp_path / "top1_kd.py"
    plugin.write_text(TOP1_PLUGIN)
    out = tmp_path / "out"
    config = tmp_path / "study.yaml"
    data = _smoke(plugins=[str(plugin)], methods={"sft": {}, "top1": {"lambda": [0.5, 1.0]}})
    config.write_text(yaml.safe_dump(data))

    # The Python API, as a notebook would call it: the results table comes back as a DataFrame.
    study = kdlab.Study(kdlab.load_config(config), output_dir=out, data_dir=tiny_data_dir)
    results = study.run()
    assert not study.failed
    top1 = results[results["method"] == "top1"]
    assert len(top1) == 2 and (top1["status"] == "done").all() and top1["eval_accuracy"].between(0, 100).all()
    assert top1["chosen"].sum() == 1  # the grid's best setting

    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs(kind="student")}
    assert set(runs) == {"sft-sst2-s1-seed1", "top1-sst2-s1-lam0.5-seed1", "top1-sst2-s1-lam1-seed1"}
    assert all(r.status == "done" for r in runs.values())
    # The grid of the new method was chosen on the selection split like any other's: the chosen run has the
    # highest selection accuracy of the two.
    chosen = json.loads((out / "selection.json").read_text())["top1-sst2-s1"]["run"]
    selection = {i: r.metrics["selection"]["accuracy"] for i, r in runs.items() if i.startswith("top1-")}
    assert selection[chosen] == max(selection.values()), (chosen, selection)
    assert top1.set_index("run").loc[chosen, "chosen"]
    # The cache holds what the plugin asked for: top-1 and its exact tail at T = 1.
    manifest = json.loads((out / "teacher_cache" / "sst2" / "manifest.json").read_text())
    assert manifest["top_k"] == 1 and manifest["fingerprint_inputs"]["temperatures"] == [1.0]
    # The report compares it with SFT and names its KD term in the figure captions.
    summary = (out / "summary.md").read_text()
    assert "| s1 | top1 |" in summary and "top1" in (out / "report.md").read_text()
    # study.yaml keeps the plugin, so commands in a fresh process (report, status) can read the study.
    assert parse_config(yaml.safe_load((out / "study.yaml").read_text())).plugins == [str(plugin)]


def test_a_plugin_that_cannot_be_imported_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plugins: cannot import 'no_such_kdlab_plugin'"):
        resolve_config(parse_config(_smoke(plugins=["no_such_kdlab_plugin"])))
    with pytest.raises(ConfigError, match="unknown method 'top1'"):
        resolve_config(parse_config(_smoke(methods={"top1": {}})))
