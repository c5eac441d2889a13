"""The config's `tasks:` and `methods:` sections validated by the registries that define them.

`kdlab.config` reads and checks what the user wrote with pydantic alone (no torch, no registries); this step
imports the `plugins:` modules, then types each task section with its task's (or kind's) settings class and
each method section with its method's, so every later stage sees `SST2Settings`, `KD1Settings`, ...
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from kdlab.config import ConfigError, Strict, StudyConfig, TaskSettings, typed_sections


def import_plugin(name: str) -> None:
    """Import a plugin module (its `@register` calls add methods or tasks): a module name, or a .py file."""
    try:
        if name.endswith(".py"):
            path = Path(name).expanduser()
            spec = importlib.util.spec_from_file_location(path.stem, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except Exception as e:
        raise ValueError(f"plugins: cannot import {name!r} ({type(e).__name__}: {e})") from None


def is_resolved(config: StudyConfig) -> bool:
    """Whether every task and method section already holds its typed settings."""
    return bool(config.methods) and all(isinstance(s, TaskSettings) for s in config.tasks.values()) \
        and all(isinstance(s, Strict) for s in config.methods.values())


def resolve_config(config: StudyConfig, source: str = "<config>") -> StudyConfig:
    """`config` with its task and method sections validated and typed by their registries (the plugins
    imported first; no `methods:` means the baseline alone). ConfigError names `source` and the dotted
    field. A resolved config is returned as it is."""
    if is_resolved(config):
        return config
    from kdlab.methods import baseline, get_method
    from kdlab.tasks import settings_class

    try:
        for name in config.plugins:
            import_plugin(name)
        tasks = typed_sections(config.tasks, settings_class, "tasks")
        methods = typed_sections(
            config.methods or {baseline().name: {}}, lambda name, _body: get_method(name).settings, "methods"
        )
    except ValueError as e:
        raise ConfigError(f"{source}: invalid study config: {e}") from None
    for name, settings in methods.items():
        unknown = [t for t in getattr(settings, "tasks", None) or [] if t not in tasks]
        if unknown:
            raise ConfigError(f"{source}: invalid study config: methods.{name}.tasks: {unknown[0]!r} is not "
                              f"a task of this study ({', '.join(tasks)})")
    return config.model_copy(update={"tasks": tasks, "methods": methods})
