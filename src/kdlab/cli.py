"""`kdlab` command line. Each command calls the same functions a notebook would."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

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

EPILOG = """examples:
  kdlab run                                  # the demo study (2-core CPU, under 20 minutes)
  kdlab run --preset thesis --out runs/thesis --data-dir ../shared/data
  kdlab config show thesis > my_study.yaml   # copy a preset, edit it, then: kdlab run my_study.yaml
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
    """STUDY.yaml, else --preset, else the study.yaml an earlier run left in --out, else the demo preset."""
    if args.config and args.preset:
        raise ConfigError("give a STUDY.yaml or --preset, not both")
    if args.config:
        return load_config(args.config)
    if args.preset:
        return load_preset(args.preset)
    if args.out and (Path(args.out) / "study.yaml").is_file():
        return load_config(Path(args.out) / "study.yaml")
    return load_preset("demo")


def _study(args: argparse.Namespace, *, inspect_only: bool = False):
    from kdlab.study import Study

    return Study(
        _study_config(args),
        output_dir=args.out,
        data_dir=args.data_dir,
        rebuild_cache=getattr(args, "rebuild_cache", False),
        force=getattr(args, "force", False),
        inspect_only=inspect_only,
    )


def cmd_run(args: argparse.Namespace) -> int:
    return EXIT_FAILED if _study(args).run() else EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    study = _study(args)
    study.prepare()
    failed = study.sweep()
    if failed:
        print(f"kdlab: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
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


def cmd_report(args: argparse.Namespace) -> int:
    from kdlab.report import write_report

    for path in write_report(Path(args.out), data_dir=args.data_dir):
        print(path)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from kdlab.registry import REGISTRY_NAME, Registry

    if not Path(args.out).is_dir():
        raise FileNotFoundError(f"{args.out}: no such study folder")
    registry = Registry(Path(args.out) / REGISTRY_NAME, readonly=True)  # status never writes
    if args.run:
        record = registry.get(args.run)
        if record is None:
            raise ValueError(f"--run {args.run}: no such run in {registry.path}")
        print(json.dumps({k: v for k, v in record.__dict__.items()}, indent=1, default=str))
        return EXIT_OK
    counts = registry.counts()
    print(
        f"{args.out}: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "running", "failed", "todo"))
    )
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for r in registry.runs():
        ev = (r.metrics or {}).get("eval", {})
        main_metric = "accuracy" if "accuracy" in ev else "f1"
        value = ev.get(main_metric)
        shown = f"{main_metric} {value:.1f}" if value is not None else ""
        print(f"  {r.status:8s} {r.id:45s} {shown}")
        if value is not None and r.kind == "student":
            key = (r.task, r.method)
            if key not in best or value > best[key][0]:
                best[key] = (value, r.id)
    if best:
        print("best so far (eval split):")
        for (task, method), (value, rid) in sorted(best.items()):
            print(f"  {task:6s} {method:4s} {value:6.1f}  {rid}")
    return EXIT_OK


def cmd_registry_rebuild(args: argparse.Namespace) -> int:
    from kdlab.registry import rebuild_registry

    result = rebuild_registry(Path(args.out))
    assert result is not None  # only_if_missing is off: it always rebuilds
    if result.backup is not None:
        print(f"old registry kept as {result.backup}")
    for line in result.skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{Path(args.out) / 'registry.sqlite'}: {len(result.restored)} finished run(s) restored; the next "
          "`kdlab run` or `kdlab sweep` adds and runs the rest")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(preset_text(args.preset))
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: valid study config ({len(config.students)} student(s), tasks "
        f"{', '.join(config.tasks)}, methods {', '.join(config.methods)}, {len(config.seeds)} seed(s))"
    )
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from kdlab.tasks import get_task

    task = get_task(args.task)
    references = task.read_references(args.data)
    predictions = task.read_predictions(args.predictions)
    print(json.dumps(task.score(predictions, references)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab",
        description="Knowledge-distillation studies on causal language models: adapt a teacher, cache its "
        "outputs, train students with SFT / logit KD / sequence KD / feature KD over a grid and "
        "seeds, evaluate on SST-2 and SQuAD v1.1, and write the results.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
        p.add_argument("--out", help="output folder (default: the config's output_dir)")
        p.add_argument(
            "--data-dir",
            default=os.environ.get("KDLAB_DATA_DIR"),
            help="folder with sst2/ and squad/ files (default: $KDLAB_DATA_DIR, else the hub)",
        )
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

    run = sub.add_parser(
        "run",
        help="run a whole study, resuming where it stopped",
        description="Run every stage of a study: data → teacher adaptation and evaluation → "
        "teacher cache → students (grid, best setting, all seeds) → bench → report. "
        "Finished runs are skipped, so re-running resumes.",
    )
    study_args(run, runs=True)
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

    report = sub.add_parser("report", help="write tables, statistics and figures of a study folder")
    report.add_argument("out", metavar="OUT", help="the study's output folder")
    report.add_argument(
        "--data-dir",
        default=os.environ.get("KDLAB_DATA_DIR"),
        help="data folder, for per-example statistics (default: $KDLAB_DATA_DIR, else hub)",
    )
    report.set_defaults(func=cmd_report)

    status = sub.add_parser("status", help="runs done / running / failed / to do, and the best so far")
    status.add_argument("out", metavar="OUT", help="the study's output folder")
    status.add_argument("--run", help="show one run in full (params, metrics, error)")
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
    rebuild.add_argument("--out", required=True, help="the study's output folder")
    rebuild.set_defaults(func=cmd_registry_rebuild)

    config = sub.add_parser("config", help="show or check study configs")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print a preset as YAML to copy and edit")
    show.add_argument("preset", choices=PRESETS)
    show.set_defaults(func=cmd_config_show)
    check = csub.add_parser("check", help="validate a study YAML without running anything")
    check.add_argument("config", metavar="STUDY.yaml")
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


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run or stage failed, 2 refused before any work (see `kdlab --help`)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except StudyError as e:
            print(f"kdlab: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        except USAGE_ERRORS as e:
            print(f"kdlab: error: {e}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
