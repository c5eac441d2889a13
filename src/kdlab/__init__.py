"""kdlab: knowledge-distillation studies on causal language models.

The Python API is the command line's own functions:

    import kdlab

    study = kdlab.Study(kdlab.load_config("study.yaml"))  # output_dir=..., data_dir=... as on the CLI
    results = study.run()  # pandas DataFrame: one row per run, as results.csv; study.failed lists failures

Status messages go to the "kdlab" logger (`logging.basicConfig(level=logging.INFO)` shows them).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Study", "__version__", "load_config", "load_preset"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `kdlab --help` and `import kdlab` stay fast (torch loads with the study).
    if name == "Study":
        from kdlab.study import Study

        return Study
    if name in ("load_config", "load_preset"):
        from kdlab import config

        return getattr(config, name)
    raise AttributeError(f"module 'kdlab' has no attribute {name!r}")
