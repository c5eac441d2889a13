"""Every path of a study folder, from one object: no other module spells a file or folder name the layout
owns. Pure paths: nothing here reads or writes.

    study.yaml                the accepted config (study.<time>.yaml: earlier ones, kept on a change)
    registry.sqlite           the run registry
    data/<task>.json          the subsets' example ids
    teacher/<task>            the adapted teacher's weights (-trainer: its checkpoints, -eval: its evaluation,
                              -zero-shot: the base teacher's evaluation)
    teacher_cache/<task>      the teacher cache (or under `cache.dir`)
    students/<name>/init      a derived student's initial weights
    runs/<id>                 a student run: model, predictions, log, run.json
    selection.json            the grid settings chosen on the selection split
    benchmarks/<name>-<model> an lm-eval benchmark of one model (teacher-base, teacher-<task>, a student
                              run id): its per-document scores and answers, run.json
    provenance.json bench.json results.csv report.md ...   what `kdlab run` writes last
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STUDY_CONFIG = "study.yaml"
REGISTRY = "registry.sqlite"
SELECTION = "selection.json"
PROVENANCE = "provenance.json"
BENCH = "bench.json"
RESULTS = "results.csv"
REPORT = "report.md"
PER_EXAMPLE_SCORES = Path("per_example_scores.csv")
BENCHMARK_SCORES = "scores.json"


@dataclass(frozen=True)
class Layout:
    """The paths of the study folder `root`; `cache_root`: where teacher caches go when the config moves
    them (`cache.dir`), else <root>/teacher_cache."""

    root: Path
    cache_root: Path | None = None

    @classmethod
    def of(cls, root: str | Path, cache_dir: str | None = None) -> Layout:
        return cls(Path(root), Path(cache_dir) if cache_dir else None)

    @property
    def study_config(self) -> Path:
        return self.root / STUDY_CONFIG

    def earlier_study_config(self, stamp: int) -> Path:
        """Where an accepted config change keeps the config it replaced."""
        return self.root / f"study.{stamp}.yaml"

    @property
    def registry(self) -> Path:
        return self.root / REGISTRY

    def data_manifest(self, task: str) -> Path:
        return self.root / "data" / f"{task}.json"

    def teacher(self, task: str) -> Path:
        """The teacher adapted to `task` (its weights)."""
        return self.root / "teacher" / task

    def teacher_trainer(self, task: str) -> Path:
        return self.root / "teacher" / f"{task}-trainer"

    def teacher_eval(self, task: str) -> Path:
        """The adapted teacher's evaluation (predictions) on `task`."""
        return self.root / "teacher" / f"{task}-eval"

    def teacher_zero_shot(self, task: str) -> Path:
        """The base teacher's zero-shot evaluation on `task` (its run folder)."""
        return self.root / "teacher" / f"{task}-zero-shot"

    def teacher_cache(self, task: str) -> Path:
        return (self.cache_root or self.root / "teacher_cache") / task

    def student_init(self, student: str) -> Path:
        """A derived student's initial weights."""
        return self.root / "students" / student / "init"

    def run(self, run_id: str) -> Path:
        """A student run's folder."""
        return self.root / "runs" / run_id

    def benchmark(self, model: str, name: str) -> Path:
        """The benchmark `name` (an lm-eval task or group) of `model`: teacher-base, teacher-<task> or a
        student run id. One folder deep, as every run's: `kdlab registry rebuild` finds its run.json."""
        return self.root / "benchmarks" / f"{name}-{model}"

    def benchmark_scores(self, model: str, name: str) -> Path:
        """Its per-document scores and answers (what the report's paired comparison reads)."""
        return self.benchmark(model, name) / BENCHMARK_SCORES

    @property
    def selection(self) -> Path:
        return self.root / SELECTION

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def bench(self) -> Path:
        return self.root / BENCH

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def summary_markdown(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_latex(self) -> Path:
        return self.root / "summary.tex"

    @property
    def per_example_scores(self) -> Path:
        return self.root / PER_EXAMPLE_SCORES

    @property
    def figures(self) -> Path:
        return self.root / "figures"
