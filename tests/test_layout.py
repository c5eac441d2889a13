"""The study folder's paths come from one object (kdlab.layout): no other module of the package spells a file
or folder name the layout owns."""

from __future__ import annotations

import ast
from pathlib import Path

import kdlab
from kdlab.layout import Layout

PACKAGE = Path(kdlab.__file__).parent
# Whole string constants naming a study folder's files: only layout.py may hold them.
OWNED_FILES = {"study.yaml", "registry.sqlite", "selection.json", "provenance.json", "bench.json",
               "results.csv", "report.md", "summary.md", "summary.tex", "per_example_scores.csv",
               "teacher_cache"}
# Folder names joined onto a path (`out / "runs"`): only layout.py may join them.
OWNED_FOLDERS = {"data", "teacher", "teacher_cache", "students", "init", "runs", "figures"}
# Parts of f-strings that build a study folder's names (`f"{task}-zero-shot"`, `f"study.{time}.yaml"`).
OWNED_SUFFIXES = ("-zero-shot", "-eval", "-trainer", ".json", ".yaml")


def _joined(node: ast.AST) -> str | None:
    """The text of a str constant, or the constant parts of an f-string, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = (v.value for v in node.values if isinstance(v, ast.Constant))
        return "".join(p for p in parts if isinstance(p, str))
    return None


def spelled_paths(source: str) -> list[str]:
    """Where a module spells a path the layout owns: `<line>: <text>`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in OWNED_FILES:
            found.append(f"{node.lineno}: {node.value!r}")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            text = _joined(node.right)
            if text is None:
                continue
            if text in OWNED_FOLDERS or text in OWNED_FILES or (
                isinstance(node.right, ast.JoinedStr) and text.endswith(OWNED_SUFFIXES)
            ):
                found.append(f"{node.lineno}: / {text!r}")
    return found


def test_no_module_but_the_layout_spells_a_study_path() -> None:
    spelled = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py" and path.parent == PACKAGE:
            continue
        if found := spelled_paths(path.read_text()):
            spelled[str(path.relative_to(PACKAGE))] = found
    assert spelled == {}


def test_the_scan_finds_what_it_looks_for() -> None:
    found = set(spelled_paths('p = out / "selection.json"'))
    assert found == {"1: 'selection.json'", "1: / 'selection.json'"}
    assert spelled_paths('p = out / "runs" / rid') == ["1: / 'runs'"]
    assert set(spelled_paths('p = out / "teacher" / f"{task}-zero-shot"')) == {"1: / 'teacher'",
                                                                                "1: / '-zero-shot'"}
    assert spelled_paths('"""Writes selection.json."""\nx = 1') == []  # prose may name files


def test_layout_paths(tmp_path: Path) -> None:
    layout = Layout.of(tmp_path / "study")
    assert layout.run("sft-sst2-s1-seed1") == tmp_path / "study" / "runs" / "sft-sst2-s1-seed1"
    assert layout.teacher_cache("sst2") == tmp_path / "study" / "teacher_cache" / "sst2"
    assert layout.teacher_zero_shot("sst2").name == "sst2-zero-shot"
    moved = Layout.of(tmp_path / "study", cache_dir=str(tmp_path / "caches"))  # cache.dir
    assert moved.teacher_cache("squad") == tmp_path / "caches" / "squad"
    assert moved.registry == tmp_path / "study" / "registry.sqlite"
