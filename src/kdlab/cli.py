"""`kdlab` command line. Each command calls the same functions a notebook would."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kdlab import __version__
from kdlab.config import PRESETS, ConfigError, StudyConfig, load_config, load_preset, preset_text

EPILOG = """examples:
  kdlab run                                  # the demo study (2-core CPU, under 20 minutes)
  kdlab run --preset thesis --out runs/thesis --data-dir ../shared/data
  kdlab config show thesis > my_study.yaml   # copy a preset, edit it, then: kdlab run my_study.yaml
  kdlab score squad predictions.json --data ../shared/data/squad/dev-v1.1.json
  kdlab score sst2 predictions.jsonl --data ../shared/data/sst2/validation.tsv

Data: --data-dir DIR (or KDLAB_DATA_DIR) holds sst2/{train,validation}.tsv and squad/{train,dev}-v1.1.json;
without it the Hugging Face hub is used (stanfordnlp/sst2, rajpurkar/squad)."""


def _study_config(args: argparse.Namespace) -> StudyConfig:
    if args.config and args.preset:
        raise ConfigError("give a STUDY.yaml or --preset, not both")
    return load_config(args.config) if args.config else load_preset(args.preset or "demo")


def cmd_run(args: argparse.Namespace) -> int:
    from kdlab.study import Study

    config = _study_config(args)
    Study(config, output_dir=args.out, data_dir=args.data_dir, rebuild_cache=args.rebuild_cache).run()
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(preset_text(args.preset))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: valid study config ({len(config.students)} student(s), tasks "
          f"{', '.join(config.tasks)}, methods {', '.join(config.methods)}, {len(config.seeds)} seed(s))")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from kdlab.tasks import get_task

    task = get_task(args.task)
    references = task.read_references(args.data)
    predictions = task.read_predictions(args.predictions)
    print(json.dumps(task.score(predictions, references)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab",
        description="Knowledge-distillation studies on causal language models: adapt a teacher, cache its "
                    "outputs, train students with SFT / logit KD / sequence KD / feature KD over a grid and "
                    "seeds, evaluate on SST-2 and SQuAD v1.1, and write the results.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a whole study, resuming where it stopped",
                         description="Run every stage of a study: data → teacher adaptation and evaluation → "
                                     "teacher cache → students (grid, best setting, all seeds) → results. "
                                     "Finished runs are skipped, so re-running resumes.")
    run.add_argument("config", nargs="?", metavar="STUDY.yaml", help="study config (default: --preset demo)")
    run.add_argument("--preset", choices=PRESETS, help="a built-in study: " + ", ".join(PRESETS))
    run.add_argument("--out", help="output folder (default: the config's output_dir)")
    run.add_argument("--data-dir", default=os.environ.get("KDLAB_DATA_DIR"),
                     help="folder with sst2/ and squad/ files (default: $KDLAB_DATA_DIR, else the hub)")
    run.add_argument("--rebuild-cache", action="store_true",
                     help="rebuild teacher caches whose fingerprint no longer matches")
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="show or check study configs")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print a preset as YAML to copy and edit")
    show.add_argument("preset", choices=PRESETS)
    show.set_defaults(func=cmd_config_show)
    check = csub.add_parser("check", help="validate a study YAML without running anything")
    check.add_argument("config", metavar="STUDY.yaml")
    check.set_defaults(func=cmd_config_check)

    score = sub.add_parser("score", help="score a predictions file like the official scripts",
                           description="SQuAD: predictions as {\"question id\": \"answer\"}, references as "
                                       "the official dev-v1.1.json; prints {\"exact_match\", \"f1\"}. SST-2: "
                                       "predictions as JSON lines {\"id\", \"label\"}, references as "
                                       "validation.tsv; prints {\"accuracy\"}.")
    score.add_argument("task", choices=["sst2", "squad"])
    score.add_argument("predictions", type=Path)
    score.add_argument("--data", type=Path, required=True, help="reference file (dev-v1.1.json / validation.tsv)")
    score.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"kdlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
