"""CI must fail, not skip, when an optional test dependency or the shared data is missing
(KDLAB_STRICT_TESTS=1, set by `.ci/run`); skips for hardware the machine lacks stay skips either way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODULE_SKIP = '''
import pytest
pytest.importorskip("kdlab_no_such_module")

def test_never_collected():
    pass
'''

TESTS = '''
import pytest
import torch

def test_optional_dependency():
    pytest.importorskip("kdlab_no_such_module_either")

def test_shared_data(real_data_dir):
    assert real_data_dir.is_dir()

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_hardware():
    pass

def test_plain():
    pass
'''


def _run(folder: Path, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("KDLAB_STRICT_TESTS", "KDLAB_DATA_DIR")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env={**environ, **env},
                          timeout=300)
    return proc.stdout + proc.stderr + f"\nrc={proc.returncode}"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("strict")
    shutil.copy(Path(__file__).with_name("conftest.py"), folder / "conftest.py")
    (folder / "test_module_skip.py").write_text(MODULE_SKIP)
    (folder / "test_skips.py").write_text(TESTS)
    return folder


def test_without_the_flag_missing_things_are_skipped(suite: Path, tmp_path: Path) -> None:
    out = _run(suite, KDLAB_DATA_DIR=str(tmp_path))  # an empty data folder
    assert "rc=0" in out and "1 passed, 4 skipped" in out, out
    assert f"real data folder {tmp_path} not present" in out, out  # KDLAB_DATA_DIR is the folder looked at


def test_with_the_flag_missing_things_fail(suite: Path, tmp_path: Path) -> None:
    out = _run(suite, KDLAB_DATA_DIR=str(tmp_path), KDLAB_STRICT_TESTS="1")
    assert "rc=1" in out, out
    # The importorskip in a test fails; the data fixture and the module-level importorskip are errors.
    assert "1 failed" in out and "2 errors" in out, out
    assert "1 skipped" in out and "needs a CUDA device" in out, out  # hardware: still a skip
    assert "kdlab_no_such_module_either" in out and f"real data folder {tmp_path}" in out, out
    assert "ERROR test_module_skip.py" in out, out
