"""The plan (kdlab.plan): every run of a study computed once from the config, with the ids, params, seeds and
hashes the study records; the one place that lists runs."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import kdlab
from kdlab.config import load_config
from kdlab.registry import Registry
from kdlab.study import Study

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_study_0.1.0"
PACKAGE = Path(kdlab.__file__).parent


def test_the_plan_has_the_runs_kdlab_0_1_0_did(tmp_path: Path, tiny_data_dir: Path) -> None:
    """Same ids, stages, seeds and params (layer pairs included) as the runs the 0.1.0 smoke study did."""
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "study"))
    study = Study(load_config(folder / "study.yaml"), output_dir=folder, data_dir=tiny_data_dir)
    recorded = {r.id: r for r in Registry(folder / "registry.sqlite", readonly=True).runs()}
    plan = study.plan
    assert study.plan is plan  # computed once
    selection = json.loads((folder / "selection.json").read_text())
    planned = [run for runs in plan.teacher.values() for run in runs]
    for group in plan.groups:
        planned += group.grid
        chosen = selection[group.key]["chosen"] if group.choosing else group.grid[0].spec.params
        planned += group.finals(chosen)
    assert {run.id for run in planned} | {f"cache-{t}" for t in plan.cached_tasks} == set(recorded)
    for run in planned:
        record = recorded[run.id]
        spec = run.spec
        assert (spec.stage, spec.seed, spec.params) == (record.stage, record.seed, record.params), run.id
        assert run.spec.config_hash == record.config_hash  # re-keyed to the plan's hashes on opening
    # A grid run's params as the registry returns them (JSON: lists, layer pairs) name its finals.
    kd3 = plan.group("sst2", "s1", "kd3")
    assert [r.id for r in kd3.finals(recorded[kd3.grid[0].id].params)] == ["kd3-sst2-s1-lam0.5-seed2"]
    assert kd3.grid[0].layer_pairs == [tuple(p) for p in recorded[kd3.grid[0].id].params["layer_pairs"]]
    assert kd3.grid[0].signals.layer_map == "auto"


def test_only_the_plan_makes_run_specs() -> None:
    """Runs are listed once: no module but plan.py builds a RunSpec, except the cache stage (a cache run's
    hash is its fingerprint, known once the teacher is), and where a spec is read back: a registry row
    (`RunRecord.spec`). A Ray worker receives the run's `Job`, spec included, and makes none."""
    makers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("RunSpec", "run_id"):
                makers.add(str(path.relative_to(PACKAGE)))
    assert makers == {"plan.py", "stages/cache.py", "registry.py"}
