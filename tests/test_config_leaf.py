"""The config is a leaf: reading and checking a study YAML needs pydantic and PyYAML, not torch,
transformers or the method and task registries (`kdlab config check` works on a machine without torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

# Run in a fresh interpreter where importing torch or transformers fails as if they were not installed.
BLOCK_HEAVY = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def _run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + code], capture_output=True, text=True,
                          timeout=120)


def _check_without_torch(path: Path) -> subprocess.CompletedProcess[str]:
    argv = ["config", "check", str(path)]
    return _run_without_torch(f"from kdlab.cli import main\nsys.exit(main({argv!r}))")


def _config(tmp_path: Path, **changes: object) -> Path:
    data = {
        "teacher": {"model": "tiny-llama", "adapt": False},
        "students": [{"name": "s1", "derive": {"num_layers": 2}}],
        "tasks": {"sst2": {"train_size": 16}},
        "methods": {"sft": {}, "kd1": {"lambda": [0.5, 1.0]}},
        "training": {"learning_rate": 0.001, "optim": "adamw_torch"},
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_module_imports_no_torch_transformers_or_registry() -> None:
    result = _run_without_torch(
        "import kdlab.config, kdlab.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "               or m in ('kdlab.methods', 'kdlab.tasks', 'kdlab.training', 'kdlab.models'))\n"
        "print(heavy)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_config_check_without_torch(tmp_path: Path) -> None:
    path = _config(tmp_path)
    result = _check_without_torch(path)
    assert result.returncode == 0, result.stderr
    assert "valid study config" in result.stdout and "methods kd1, sft" in result.stdout
    assert "task and method settings and TrainingArguments fields not checked" in result.stdout  # said

    # What the leaf can check, it still refuses, naming the field.
    bad = _config(tmp_path, training={"batch_size": "eight"})
    result = _check_without_torch(bad)
    assert result.returncode == 2 and "training.batch_size" in result.stderr


def test_config_check_with_torch_checks_the_sections(tmp_path: Path) -> None:
    from kdlab.cli import main

    assert main(["config", "check", str(_config(tmp_path))]) == 0
    path = _config(tmp_path, methods={"kd1": {"lambda": -0.1}})
    assert main(["config", "check", str(path)]) == 2
