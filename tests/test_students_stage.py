"""A derived student is built by the students stage (`Study.prepare`), never inside a run: a run asks for its
initial weights and gets them, or an error if the stage has not built them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdlab.config import load_config
from kdlab.errors import StudyError
from kdlab.stages import students
from kdlab.study import Study

FIXTURE = Path(__file__).parent / "fixtures" / "smoke_study_0.1.0"


def test_a_run_never_derives_its_student(tmp_path: Path, tiny_data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(shutil.copytree(FIXTURE, tmp_path / "study"))  # run records only: no students/ folder
    study = Study(load_config(folder / "study.yaml"), output_dir=folder, data_dir=tiny_data_dir)
    student = study.config.students[0]
    assert student.derive is not None

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run derived a student")

    monkeypatch.setattr(students, "derive_student", forbidden)
    with pytest.raises(StudyError, match="not built; the students stage builds it"):
        study.initial_weights(student)
    assert not (folder / "students").exists()
    monkeypatch.undo()

    students.build_student(study, student)  # the stage
    assert study.initial_weights(student) == str(study.layout.student_init("s1"))
    assert (study.layout.student_init("s1") / "derived_from.json").is_file()
