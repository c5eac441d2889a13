"""The students: their initial weights (a model of their own, or blocks of the teacher copied into a derived
student, built once under students/<name>/init), and which of their hidden states pair with the teacher's."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from kdlab import losses
from kdlab.config import StudentSettings
from kdlab.errors import StudyError
from kdlab.files import atomic_folder
from kdlab.methods import METHODS, MethodSettings, get_method
from kdlab.models import (
    check_derivable,
    count_parameters,
    derive_layers,
    derive_student,
    hub_snapshot_info,
    load_model,
    load_tokenizer,
    model_config,
    num_layers,
    resolve_model_path,
    save_model,
)
from kdlab.seeding import seed_everything

if TYPE_CHECKING:
    from kdlab.stages.shared import StudyView


def initial_weights(study: StudyView, student: StudentSettings) -> str:
    """The folder a student's runs start from: its model's, or the derived student `build_student` made
    (a run never builds one)."""
    if student.model is not None:
        return resolve_model_path(student.model, student.revision)
    folder = study.layout.student_init(student.name)
    if not (folder / "config.json").is_file():
        raise StudyError(f"students.{student.name}: the derived student {folder} is not built; the students "
                         "stage builds it (`kdlab run`, `kdlab sweep`)")
    return str(folder)


def build_student(study: StudyView, student: StudentSettings) -> None:
    """The students stage: a derived student's initial weights, built once under students/<name>/init
    (derived_from.json beside them names the teacher blocks it copied); nothing for a student of its own."""
    if student.model is not None:
        return
    folder = study.layout.student_init(student.name)
    if study.ranks.share((folder / "config.json").is_file()):
        return
    cfg = study.config.teacher
    teacher_path = resolve_model_path(cfg.model, cfg.revision)
    # Checked on the config alone (meta device), so an unsupported family fails before the teacher loads.
    config = model_config(teacher_path, trust_remote_code=cfg.trust_remote_code)
    layers = derive_layers(config, student.derive)
    check_derivable(config, layers, trust_remote_code=cfg.trust_remote_code)
    teacher = load_model(teacher_path, trust_remote_code=cfg.trust_remote_code)
    n = num_layers(teacher.config)
    seed_everything(study.seed("student-init"))
    model = derive_student(teacher, layers)  # checks its logits against the teacher's blocks

    def build(tmp: Path) -> None:
        save_model(model, study.tokenizer, tmp)
        origin = {"teacher": cfg.model, "revision": cfg.revision, "teacher_layers": layers}
        if (hub := hub_snapshot_info(teacher_path)) is not None:
            origin["commit"] = hub[1]
        (tmp / "derived_from.json").write_text(json.dumps(origin))

    # Built aside and renamed: a killed build or a second process never leaves a half-written student.
    if study.ranks.leader:
        atomic_folder(folder, build)
    study.ranks.barrier()
    study.log(
        f"[student] {student.name}: {len(layers)} of {n} teacher layers {layers}, "
        f"{count_parameters(model)[0] / 1e6:.1f}M parameters"
    )


def check_vocabulary(
    student: StudentSettings, path: str, teacher_tokenizer: PreTrainedTokenizerBase,
    methods: Mapping[str, MethodSettings],
) -> None:
    """A student whose tokenizer differs from the teacher's: every method of the study must have a form across
    tokenizers for its settings (`Method.across_tokenizers_refused`), and both tokenizers must give character
    offsets (fast ones)."""
    tok = load_tokenizer(path, trust_remote_code=student.trust_remote_code)
    if tok.get_vocab() == teacher_tokenizer.get_vocab():
        return
    differs = f"its tokenizer differs from the teacher's ({len(tok)} vs {len(teacher_tokenizer)} tokens)"
    for name, settings in methods.items():
        reason = get_method(name).across_tokenizers_refused(settings)
        if reason is not None:
            able = ", ".join(m for m, method in METHODS.items() if method.across_tokenizers)
            raise ValueError(
                f"students.{student.name}: {differs}, and methods.{name} cannot train it across tokenizers: "
                f"{reason} (methods with a cross-tokenizer form: {able}); give this student the teacher's "
                f"tokenizer or drop {name}"
            )
    for who, t in (("the student", tok), ("the teacher", teacher_tokenizer)):
        if not getattr(t, "is_fast", False):
            raise ValueError(f"students.{student.name}: {differs}; aligning them needs fast tokenizers (with "
                             f"offset mappings), and {who}'s is {type(t).__name__}")


def layer_counts(study: StudyView, student: StudentSettings) -> tuple[list[int] | None, int, int]:
    """(a derived student's teacher blocks or None, student layers, teacher layers), from the configs
    alone, so layer maps resolve before the derived student is built."""
    # Layer counts from each family's config (num_hidden_layers, n_layer, ...; the text part of multimodal
    # configs), so any decoder family works; hidden states come from output_hidden_states (scored.py).
    cfg = study.config.teacher
    teacher_config = model_config(study.base_teacher_path, trust_remote_code=cfg.trust_remote_code)
    t_layers = num_layers(teacher_config)
    if student.derive is not None:
        kept = derive_layers(teacher_config, student.derive)
        return kept, len(kept), t_layers
    path = resolve_model_path(student.model, student.revision)
    trust = student.trust_remote_code or cfg.trust_remote_code
    return None, num_layers(model_config(path, trust_remote_code=trust)), t_layers


def layer_pairs(
    study: StudyView, student: StudentSettings, layer_map: Any, method: str
) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state pairs of `method`'s layer map for this student."""
    kept, s_layers, t_layers = layer_counts(study, student)
    return resolve_layer_pairs(layer_map, kept, s_layers, t_layers, f"methods.{method}.layer_map")


def resolve_layer_pairs(
    layer_map: Any, kept: Sequence[int] | None, s_layers: int, t_layers: int, where: str
) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state pairs of one layer map for one student. `kept` are a derived
    student's teacher blocks (None: a separate student model): "derived" pairs each of its blocks with the
    teacher block it was copied from; "auto" is "derived" for derived students, else "uniform". `where`
    names the config field in errors."""
    if layer_map in ("auto", "derived"):
        if kept is not None:
            return losses.derived_layer_map(kept, t_layers)
        if layer_map == "derived":
            raise ValueError(f"{where}: 'derived' needs a student derived from the teacher (students.derive)")
        layer_map = "uniform"
    try:
        return losses.resolve_layer_map(layer_map, s_layers, t_layers)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
