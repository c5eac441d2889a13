"""`kdlab` command line. Each command calls the same functions a notebook would."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from kdlab import __version__
from kdlab.config import PRESETS, ConfigError, StudyConfig, load_config, load_preset, preset_text
from kdlab.errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CacheError,
    DataError,
    RegistryError,
    StudyError,
)
from kdlab.layout import Layout

EPILOG = """examples:
  kdlab run                                  # the demo study (three seeds; 51 min on a 2-core CPU)
  kdlab run --preset thesis --out runs/thesis --data-dir ../shared/data
  kdlab config show thesis > my_study.yaml   # copy a preset, edit it, then: kdlab run my_study.yaml
  kdlab eval runs/thesis --set 'evaluation.benchmarks.tasks=[arc_easy]'   # lm-eval benchmarks only
  kdlab score squad predictions.json --data ../shared/data/squad/dev-v1.1.json
  kdlab score sst2 predictions.jsonl --data ../shared/data/sst2/validation.tsv

Data: --data-dir DIR (or KDLAB_DATA_DIR) holds sst2/{train,validation}.tsv and squad/{train,dev}-v1.1.json;
without it the Hugging Face hub is used (stanfordnlp/sst2, rajpurkar/squad).

exit codes:
  0  done
  1  the command ran but a run or stage failed (details: kdlab status OUT --run RUN_ID); re-run to retry
  2  refused before any work, with one line naming the file or field: bad command or config, missing or
     malformed data, model path, a teacher cache that fails verification (kdlab cache --out OUT --rebuild),
     a registry that cannot be used (kdlab registry rebuild --out OUT); the output folder is left as it was

repairs:
  kdlab cache --out OUT --verify     hash every teacher-cache file against its manifest
  kdlab cache --out OUT --rebuild    rebuild caches that fail verification (built beside, then swapped in)
  kdlab registry rebuild --out OUT   rebuild registry.sqlite from the finished runs' folders (run.json)"""


def _study_config(args: argparse.Namespace) -> StudyConfig:
    """STUDY.yaml, else --preset, else the study.yaml an earlier run left in --out, else the demo preset;
    its task and method sections typed by their registries."""
    from kdlab.resolve import resolve_config

    if args.config and args.preset:
        raise ConfigError("give a STUDY.yaml or --preset, not both")
    overrides = args.set or []
    if args.config:
        config, source = load_config(args.config, overrides), str(args.config)
    elif args.preset:
        config, source = load_preset(args.preset, overrides), f"preset {args.preset}"
    elif args.out and Layout(Path(args.out)).study_config.is_file():
        source = str(Layout(Path(args.out)).study_config)
        config = load_config(source, overrides)
    else:
        config, source = load_preset("demo", overrides), "preset demo"
    return resolve_config(config, source)


STATUSES = ("done", "running", "failed", "todo")
log = logging.getLogger("kdlab")


def _out(args: argparse.Namespace) -> str:
    """The study folder: --out, or the positional OUT the folder-only commands also accept."""
    out = getattr(args, "out", None) or getattr(args, "folder", None)
    if not out:
        raise ConfigError("name the study folder with --out OUT")
    return out


def _study(args: argparse.Namespace, *, inspect_only: bool = False, config: StudyConfig | None = None):
    from kdlab.distributed import hide_gpus_from_cpu_study
    from kdlab.heap import freeze_imports

    config = config or _study_config(args)
    hide_gpus_from_cpu_study(config.device)
    if not inspect_only:
        freeze_imports()  # before the study imports them (kdlab.heap says why)
    _library_bars()
    from kdlab.study import Study

    return Study(
        config,
        output_dir=args.out,
        data_dir=args.data_dir,
        rebuild_cache=getattr(args, "rebuild_cache", False),
        force=getattr(args, "force", False),
        inspect_only=inspect_only,
    )


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        study = _study(args, inspect_only=True)
        study.preflight()
        for run_id, status in study.run_statuses():
            print(f"{status:8s} {run_id}")
        return EXIT_OK
    config, executor = _executor(args)
    study = _study(args, config=config)
    study.run(executor=executor)
    for path in study.written:
        print(path)
    return EXIT_FAILED if study.failed else EXIT_OK


def _executor(args: argparse.Namespace) -> tuple[StudyConfig, Any]:
    """The study config and where its runs execute (config `executor:`, then --executor / --address), after
    the checks that need no work: Ray installed, no second Ray driver, no local process on a registry
    another host is using."""
    from kdlab.heap import freeze_imports

    freeze_imports()  # first: the imports below are the run's (kdlab.heap says why)
    from kdlab.ray_executor import executor_settings, precheck

    config = _study_config(args)
    settings = executor_settings(config, args.executor, args.address, args.workers)
    precheck(Path(args.out or config.output_dir), settings)
    return config, settings


def cmd_sweep(args: argparse.Namespace) -> int:
    config, executor = _executor(args)
    failed = _study(args, config=config).sweep(executor=executor)
    if failed:
        log.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    if args.verify and not args.rebuild_cache:
        results = _study(args, inspect_only=True).verify_caches()
        if not results:
            print("no method of this study needs a teacher cache (or cache.mode is online)")
        for name, directory, problem in results:
            print(f"{name}: {directory}: " + ("intact (every file matches its size and sha256)"
                                              if problem is None else f"FAILED: {problem}"))
        return EXIT_USAGE if any(problem for _, _, problem in results) else EXIT_OK
    study = _study(args)
    study.prepare()
    for name in study.config.tasks:
        cache = study.cache_stage(name)
        if cache is None:
            print(f"{name}: no method of this study needs a teacher cache (or cache.mode is online)")
        else:
            print(
                f"{name}: {cache.directory} ({len(cache)} examples, fields {', '.join(cache.fields)}, "
                f"fingerprint {cache.fingerprint[:12]})"
            )
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from kdlab.bench import write_bench

    print(write_bench(_study(args), examples=args.examples, warmup=args.warmup, repeats=args.repeats))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Only the benchmark stage on a study folder (e.g. after adding a benchmark with --set), then the
    report; finished evaluations are kept."""
    from kdlab.report import write_report
    from kdlab.stages.benchmarks import run_benchmarks

    args.out = _out(args)
    config = _study_config(args)
    if config.evaluation.benchmarks is None:
        raise ConfigError(
            f"evaluation.benchmarks: not set in the study config of {args.out}; add it there or with "
            "--set 'evaluation.benchmarks.tasks=[hellaswag]' (README: General ability)"
        )
    study = _study(args, config=config)
    failed = run_benchmarks(study)
    for path in write_report(Path(args.out), data_dir=study.data_dir):
        print(path)
    if failed:
        log.error("%d benchmark evaluation(s) failed: %s", len(failed), ", ".join(failed))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from kdlab.report import write_report

    for path in write_report(Path(_out(args)), data_dir=args.data_dir):
        print(path)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from kdlab.registry import Registry

    out = Path(_out(args))
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such study folder")
    registry = Registry(Layout(out).registry, readonly=True)  # status never writes
    if args.run:
        record = registry.get(args.run)
        if record is None:
            raise ValueError(f"--run {args.run}: no such run in {registry.path}")
        print(json.dumps(dataclasses.asdict(record), indent=1, default=str))
        return EXIT_OK
    from kdlab.selection import best_run, selection_value

    metrics = _selection_metrics(out)
    runs, grids = [], {}
    for r in registry.runs():
        ev = (r.metrics or {}).get("eval", {})
        metric = metrics.get(r.task) or next((k for k in ev if k not in ("n", "truncated", "seconds")), None)
        value = ev.get(metric) if metric else None
        runs.append({"id": r.id, "kind": r.kind, "task": r.task, "method": r.method, "student": r.student,
                     "status": r.status, "metric": metric if value is not None else None, "value": value})
        if r.kind == "student" and r.stage == "grid" and r.done and metric:
            grids.setdefault((r.task, r.method, r.student), []).append(r)
    # Each group's setting as the sweep chooses it (the one selection rule: the highest selection-split
    # metric among its finished grid runs), with that run's evaluation result.
    best = []
    for (task, method, student), grid_runs in sorted(grids.items()):
        metric = metrics.get(task) or next(r for r in runs if r["id"] == grid_runs[0].id)["metric"]
        chosen = best_run(grid_runs, metric)
        value = ((chosen.metrics or {}).get("eval") or {}).get(metric)
        if value is not None:
            best.append(dict(task=task, method=method, student=student, metric=metric, value=value,
                             selection=selection_value(chosen, metric), run=chosen.id))
    counts = registry.counts()
    if args.json:
        # "ray": Ray's view of the runs as the study's Ray driver last wrote it (absent for a local study)
        extra = {"ray": ray_view} if (ray_view := registry.note("ray")) else {}
        print(json.dumps({"study": str(out), "counts": {k: counts.get(k, 0) for k in STATUSES},
                          "runs": runs, "best": best, **extra}, indent=1))
        return EXIT_OK
    print(f"{out}: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in STATUSES))
    for run in runs:
        shown = f"{run['metric']} {run['value']:.1f}" if run["value"] is not None else ""
        print(f"  {run['status']:8s} {run['id']:45s} {shown}")
    if best:
        print("chosen so far (highest selection-split metric of each grid; eval split shown):")
        for b in best:
            print(f"  {b['task']:6s} {b['method']:4s} {b['student']:6s} {b['value']:6.1f}  {b['run']}")
    from kdlab.ray_executor import status_lines  # needs no Ray: the driver's note in the registry

    for line in status_lines(registry):
        print(line)
    return EXIT_OK


def _selection_metrics(out: Path) -> dict[str, str]:
    """The metric each task of the study in `out` chooses on, from its study.yaml (empty if unreadable)."""
    try:
        from kdlab.resolve import resolve_config
        from kdlab.tasks import get_task

        config = resolve_config(load_config(Layout(out).study_config))
        return {name: get_task(name, settings).metric for name, settings in config.tasks.items()}
    except (OSError, ValueError):
        return {}


def cmd_registry_rebuild(args: argparse.Namespace) -> int:
    from kdlab.registry import rebuild_registry

    result = rebuild_registry(Path(_out(args)))
    assert result is not None  # only_if_missing is off: it always rebuilds
    if result.backup is not None:
        print(f"old registry kept as {result.backup}")
    for line in result.skipped:
        print(f"skipped {line}", file=sys.stderr)
    registry = Layout(Path(_out(args))).registry
    print(f"{registry}: {len(result.restored)} finished run(s) restored; the next `kdlab run` or "
          "`kdlab sweep` adds and runs the rest")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(preset_text(args.preset))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    """The config checked as far as this machine can: the whole of it with kdlab's training dependencies
    installed, else every section but the task and method settings and the TrainingArguments fields (their
    registries and transformers need torch)."""
    from kdlab.resolve import resolve_config

    config = load_config(args.config, args.set or [])
    unchecked = ""
    try:
        config = resolve_config(config, str(args.config))
        from kdlab.preflight import check_training_arguments
    except ImportError as e:
        unchecked = (f"; task and method settings and TrainingArguments fields not checked ({e}; they need "
                     "kdlab's training dependencies)")
    else:
        check_training_arguments(config)
    print(
        f"{args.config}: valid study config ({len(config.students)} student(s), tasks "
        f"{', '.join(config.tasks)}, methods {', '.join(config.methods) or '(the baseline)'}, "
        f"{len(config.seeds)} seed(s)){unchecked}"
    )
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    import csv

    from kdlab.tasks import get_task

    task = get_task(args.task)
    files = {"reference": args.data, "predictions": args.predictions}
    read = {"reference": task.read_references, "predictions": task.read_predictions}
    loaded: dict[str, Any] = {}
    for what, path in files.items():
        try:
            loaded[what] = read[what](path)
        except (csv.Error, UnicodeDecodeError) as e:
            # A file of another format (SQuAD's one-line JSON read as SST-2's TSV) fails deep in a parser:
            # one line naming the file, not a traceback.
            reason = f"{type(e).__module__.lstrip('_')}.{type(e).__name__}: {e}"
            raise DataError(f"{path}: not readable as the {task.title} {what} file of `kdlab score "
                            f"{task.name}` ({reason})") from None
    print(json.dumps(task.score(loaded["predictions"], loaded["reference"])))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab",
        description="Knowledge-distillation studies on causal language models: adapt a teacher, cache its "
        "outputs, train students (their own tokenizer allowed) with SFT / logit KD / sequence KD / "
        "feature KD / on-policy KD over a grid and seeds, evaluate them on the study's tasks and on "
        "lm-eval benchmarks, and write the results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def study_args(p: argparse.ArgumentParser, *, runs: bool = False) -> None:
        """The options every study command shares; `runs`: also those of commands that train."""
        p.add_argument(
            "config",
            nargs="?",
            metavar="STUDY.yaml",
            help="study config (default: --preset, else OUT/study.yaml, else the demo)",
        )
        p.add_argument("--preset", choices=PRESETS, help="a built-in study: " + ", ".join(PRESETS))
        p.add_argument("--out", help="the study folder (default: the config's output_dir)")
        p.add_argument(
            "--data-dir",
            default=os.environ.get("KDLAB_DATA_DIR"),
            help="folder with sst2/ and squad/ files (default: $KDLAB_DATA_DIR, else the hub)",
        )
        p.add_argument("--set", action="append", metavar="KEY.SUB=VALUE", help="change one config setting, "
                       "e.g. --set training.learning_rate=0.001 --set 'seeds=[1, 2]' (the value is YAML)")
        if runs:
            p.add_argument(
                "--rebuild-cache",
                action="store_true",
                help="rebuild teacher caches that fail verification (fingerprint changed, a file missing, "
                "truncated or corrupt); an intact cache is kept",
            )
            p.add_argument(
                "--force",
                action="store_true",
                help="redo finished runs whose settings changed (otherwise refused: results stay consistent)",
            )
            p.add_argument(
                "--executor",
                choices=("local", "ray"),
                help="where student runs execute: this machine (default; several `kdlab sweep` processes "
                "share the work) or a Ray cluster, one driver for the study (docs/cluster.md; needs "
                "pip install 'kdlab[ray]'); default: the config's executor.kind",
            )
            p.add_argument(
                "--workers",
                type=int,
                metavar="N",
                help="--executor local: N sweep processes on this machine, each with 1/N of the cores as "
                "torch threads (default: the config's executor.workers, 1)",
            )
            p.add_argument(
                "--address",
                help="the Ray cluster for --executor ray: auto, ray://HEAD:10001 or HOST:PORT (default: the "
                "config's executor.address, else RAY_ADDRESS, else a cluster on this machine or a new one)",
            )

    def folder_args(p: argparse.ArgumentParser) -> None:
        """Commands that read a study folder only: --out OUT, as every command, or OUT alone."""
        p.add_argument("folder", nargs="?", metavar="OUT", help="the study folder (the same as --out)")
        p.add_argument("--out", help="the study folder")

    run = sub.add_parser(
        "run",
        help="run a whole study, resuming where it stopped",
        description="Run every stage of a study: data → teacher adaptation and evaluation → "
        "teacher cache → students (grid, best setting, all seeds) → bench → report. "
        "Finished runs are skipped, so re-running resumes.",
    )
    study_args(run, runs=True)
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, data and models, then list the runs the study would do (and the "
                     "status of those it did) without doing or writing anything")
    run.set_defaults(func=cmd_run)

    sweep = sub.add_parser(
        "sweep",
        help="train and evaluate every student run (grid, best setting, seeds)",
        description="Runs the grid on the first seed, picks each method's best setting on "
        "the selection split, then runs it on every seed. Several `kdlab sweep` "
        "processes on the same --out share the work; nothing runs twice.",
    )
    study_args(sweep, runs=True)
    sweep.set_defaults(func=cmd_sweep)

    cache = sub.add_parser(
        "cache",
        help="build, verify or repair the teacher caches of a study",
        description="Runs the teacher once over each task's training examples and stores "
        "answers (KD2), top-k log-probs (KD1) and hidden states (KD3), "
        "fingerprinted, with the size and sha256 of every file in its manifest. A cache whose "
        "fingerprint differs, or with a missing, truncated or corrupt file, is refused; --rebuild "
        "replaces it (built beside, then swapped in).",
    )
    study_args(cache)
    cache.add_argument(
        "--rebuild",
        dest="rebuild_cache",
        action="store_true",
        help="rebuild caches that fail verification (fingerprint changed, a file missing, truncated or "
        "corrupt); an intact cache is kept",
    )
    cache.add_argument(
        "--verify",
        action="store_true",
        help="only check: hash every cache file against the manifest and report (exit 2 if one fails)",
    )
    cache.set_defaults(func=cmd_cache)

    bench = sub.add_parser(
        "bench",
        help="measure parameters, size, latency, throughput, peak memory",
        description="Benchmarks the teacher and every final student on the study's device "
        "and writes OUT/bench.json (used by `kdlab report`).",
    )
    study_args(bench)
    bench.add_argument("--examples", type=int, help="evaluation examples per task (default: bench.examples)")
    bench.add_argument("--warmup", type=int, help="untimed calls before timing (default: bench.warmup)")
    bench.add_argument("--repeats", type=int, help="timed passes over the examples (default: bench.repeats)")
    bench.set_defaults(func=cmd_bench)

    evaluate = sub.add_parser(
        "eval",
        help="re-run only the benchmark stage (lm-eval, evaluation.benchmarks) on a study folder",
        description="Evaluates the base and adapted teachers and every final student on the lm-eval "
        "benchmarks of the study's evaluation.benchmarks (OUT/study.yaml, changed with --set), keeping the "
        "evaluations already done, then rewrites the report. Needs pip install 'kdlab[eval]'.",
    )
    folder_args(evaluate)
    evaluate.add_argument(
        "--data-dir",
        default=os.environ.get("KDLAB_DATA_DIR"),
        help="folder with sst2/ and squad/ files (default: $KDLAB_DATA_DIR, else the hub)",
    )
    evaluate.add_argument("--set", action="append", metavar="KEY.SUB=VALUE",
                          help="change one config setting, e.g. "
                          "--set 'evaluation.benchmarks.tasks=[arc_easy]'")
    evaluate.set_defaults(func=cmd_eval, config=None, preset=None)

    report = sub.add_parser("report", help="write tables, statistics and figures of a study folder")
    folder_args(report)
    report.add_argument(
        "--data-dir",
        default=os.environ.get("KDLAB_DATA_DIR"),
        help="data folder, for per-example statistics (default: $KDLAB_DATA_DIR, else hub)",
    )
    report.set_defaults(func=cmd_report)

    status = sub.add_parser("status", help="runs done / running / failed / to do, and each grid's choice")
    folder_args(status)
    status.add_argument("--run", help="show one run in full (params, metrics, error)")
    status.add_argument("--json", action="store_true", help="the counts, every run and the best as JSON")
    status.set_defaults(func=cmd_status)

    registry = sub.add_parser("registry", help="repair the run registry of a study folder")
    rsub = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    rebuild = rsub.add_parser(
        "rebuild",
        help="rebuild registry.sqlite from the finished runs' folders",
        description="Rebuilds OUT/registry.sqlite from the run.json every finished run keeps in its "
        "folder, so a deleted, unreadable or damaged registry loses no finished run (an existing file is "
        "moved aside first). Runs that had not finished are added again by the next run or sweep. Stop "
        "the study's workers first.",
    )
    folder_args(rebuild)
    rebuild.set_defaults(func=cmd_registry_rebuild)

    config = sub.add_parser("config", help="show or check study configs")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print a preset as YAML to copy and edit")
    show.add_argument("preset", choices=PRESETS)
    show.set_defaults(func=cmd_config_show)
    check = csub.add_parser("check", help="validate a study YAML without running anything")
    check.add_argument("config", metavar="STUDY.yaml")
    check.add_argument("--set", action="append", metavar="KEY.SUB=VALUE", help="as for `kdlab run`")
    check.set_defaults(func=cmd_config_check)

    score = sub.add_parser(
        "score",
        help="score a predictions file like the official scripts",
        description='SQuAD: predictions as {"question id": "answer"}, references as '
        'the official dev-v1.1.json; prints {"exact_match", "f1"}. SST-2: '
        'predictions as JSON lines {"id", "label"}, references as '
        'validation.tsv; prints {"accuracy"}.',
    )
    score.add_argument("task", help="a built-in task (its official file formats, as described above)")
    score.add_argument(
        "predictions",
        type=Path,
        help='SQuAD: {"question id": "answer"} JSON; SST-2: JSON lines {"id", "label"}',
    )
    score.add_argument(
        "--data", type=Path, required=True, help="reference file (dev-v1.1.json / validation.tsv)"
    )
    score.set_defaults(func=cmd_score)
    return parser


# Refused before any work (exit 2): the command, config, data, model, cache or registry cannot be used as
# given. DataError and ConfigError are ValueErrors; OSError covers missing files and folders.
USAGE_ERRORS = (ConfigError, DataError, ValueError, CacheError, RegistryError, OSError)


_PYTHON_SHOWWARNING = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    # kdlab's own warnings (e.g. predictions for unknown ids) as one line; others as Python shows them.
    if category.__module__.startswith("kdlab"):
        print(f"kdlab: warning: {message}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, *args, **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (not the stream of the first call)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _library_bars() -> None:
    """Other libraries' progress bars, for a command about to load models (so not in `configure_logging`:
    importing transformers would slow `kdlab status`): transformers' per-checkpoint bars with -v only
    (`models.show_loading_bars`); with -q no library draws a bar (kdlab's own follow its logger's level)."""
    from kdlab.models import show_loading_bars

    if not log.isEnabledFor(logging.INFO):
        import datasets.utils.logging
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.disable_progress_bar()
    show_loading_bars(log.isEnabledFor(logging.DEBUG))


def configure_logging(level: int) -> None:
    """kdlab's status messages as plain lines on stderr (stdout keeps each command's results); other
    libraries' messages from warnings up, or everything with -v; with -q warnings and errors only."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # other libraries (a no-op if set)
    logging.getLogger().setLevel(min(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run or stage failed, 2 refused before any work (see `kdlab --help`)."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = args.func(args)
        except StudyError as e:
            print(f"kdlab: error: {e}", file=sys.stderr)
            code = EXIT_FAILED
        except USAGE_ERRORS as e:
            print(f"kdlab: error: {e}", file=sys.stderr)
            code = EXIT_USAGE
    _leave_process_group()
    return code


def _leave_process_group() -> None:
    """Under `torchrun` / `accelerate launch`: leave the process group the command joined while the
    interpreter is still whole. Left to interpreter exit, gloo's threads can still hold tensors whose release
    needs the GIL, and a rank whose work is done dies with SIGABRT ("terminate called without an active
    exception"), failing the launch. Not after an unexpected exception: another rank may be mid-collective."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing joined (and `status` stays light)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
