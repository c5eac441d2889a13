"""One student run as a `Job`: frozen, picklable, complete. A process that cannot import `kdlab.study` (a Ray
worker never builds one) runs the pickled job and gets what the local sweep gets from the same job with the
study's data and tokenizer handed in."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.config import parse_config, preset_text
from kdlab.job import Job, run_job, with_absolute_paths
from kdlab.stages.sweep import job_for
from kdlab.study import Study

WORKER = """
import pickle, sys, json
sys.modules["kdlab.study"] = None  # importing it raises: the job must not need the study
from kdlab.job import run_job
job = pickle.loads(open(sys.argv[1], "rb").read())
print(json.dumps(run_job(job)))
"""


def _losses(folder: Path) -> list:
    return [(e.get("step"), e.get("loss")) for e in json.loads((folder / "log_history.json").read_text())]


def test_a_pickled_job_runs_without_the_study_and_matches_the_local_run(tiny_data_dir: Path,
                                                                         tmp_path: Path) -> None:
    data = yaml.safe_load(preset_text("smoke"))
    data["teacher"]["adapt"] = False
    data["tasks"] = {"sst2": data["tasks"]["sst2"]}
    data["methods"] = {"kd1": {"lambda": 0.5, "top_k": 8}}
    data["seeds"] = [7]
    data["bench"] = {"enabled": False}
    study = Study(parse_config(data), output_dir=tmp_path / "out", data_dir=tiny_data_dir)
    study.prepare()
    cache = study.cache_stage("sst2")
    group = study.plan.groups[0]
    spec = group.grid[0].spec
    job = job_for(study, spec, group.student, cache)

    # plain data: a round trip through pickle gives the same job
    shipped = with_absolute_paths(job)
    assert pickle.loads(pickle.dumps(shipped)) == shipped and isinstance(shipped, Job)
    assert job.seed == study.seed("student", spec.seed) and job.cache is not None

    worker_dir = tmp_path / "worker-run"
    remote = dataclasses.replace(shipped, spec=dataclasses.replace(spec, output_dir=str(worker_dir)))
    path = tmp_path / "job.pkl"
    path.write_bytes(pickle.dumps(remote))
    done = subprocess.run([sys.executable, "-c", WORKER, str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worker = json.loads(done.stdout.strip().splitlines()[-1])

    local = run_job(job, study.ranks, tokenizer=study.tokenizer, data=study.data("sst2"), cache=cache)
    def scores(metrics: dict) -> dict:
        return {k: v for k, v in metrics["eval"].items() if k != "seconds"}  # timings differ

    assert scores(worker) == pytest.approx(scores(local)) and worker["steps"] == local["steps"] > 0
    assert worker["train_examples"] == local["train_examples"]
    assert _losses(worker_dir) == _losses(Path(spec.output_dir))
    assert (worker_dir / "model").is_dir() and (worker_dir / "diagnostics.json").is_file()
