"""Study configuration: one YAML file describes a whole study, validated before anything is written.

Every section is a strict pydantic model, so an unknown key, a wrong type or an impossible value fails with
the dotted path of the field and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PRESETS = ("demo", "thesis", "smoke")


class ConfigError(ValueError):
    """A study config that cannot run; the message names the field or file and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


def as_list(value: Any) -> Any:
    """Grid axes accept one value or a list; downstream code always sees a list."""
    return value if isinstance(value, list) else [value]


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="modules LoRA adapts (names or dotted suffixes, each naming a module of the model), or "
        "'all-linear' (every linear layer but the output head). Left out: the family's usual attention "
        "projections from peft's table (q_proj+v_proj for Llama, Mistral, Qwen2/3, Gemma; c_attn for GPT-2; "
        "query_key_value for GPT-NeoX, Falcon, Bloom; q_proj+v_proj+fc1+fc2 for Phi), else 'all-linear'",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, list) and not v:
            raise ValueError("name a module, give 'all-linear', or leave it out for the family's default")
        return v


class TrainingSettings(Strict):
    """Hugging Face Trainer settings shared by every run of a study (teacher adaptation has its own copy).

    Besides kdlab's own fields below, any other field of transformers' `TrainingArguments` passes through to
    the Trainer (report_to, optim, lr_scheduler_kwargs, save_total_limit, ...), type-checked against
    TrainingArguments' annotations and then by TrainingArguments itself (`training.check_trainer_arguments`,
    called by preflight: the config stays free of transformers).
    """

    model_config = ConfigDict(extra="allow", validate_default=True, populate_by_name=True)

    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: train for `epochs`")
    gradient_checkpointing: bool = False
    bf16: bool = Field(False, description="bf16 autocast (CUDA, and CPUs with fast bf16)")
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps for resume; 0: only at the end")
    packing: bool = Field(
        False,
        description="padding-free batches: each batch's sequences back to back in one row, positions "
        "restarting per sequence; attention keeps to each sequence (transformers' masks read the position "
        "ids; best with attn_implementation flash_attention_2). Checked on the model before training",
    )
    attn_implementation: str | None = Field(
        None,
        description="the attention kernel the student and a live teacher load with (sdpa, eager, "
        "flash_attention_2, ...); None: transformers' default",
    )

    teacher_sharding: Literal["replicate", "shard"] = Field(
        "replicate",
        description="under FSDP, what happens to a live teacher (cache.mode: online): replicate (every rank "
        "holds it whole) or shard (FSDP2 over the ranks, for a teacher too big for one device)",
    )

    @property
    def compute_dtype(self) -> str:
        """The dtype mixed precision computes in (`bf16`, or TrainingArguments' `fp16`): the dtype frozen
        weights are stored in."""
        return "bfloat16" if self.bf16 else "float16" if (self.model_extra or {}).get("fp16") else "float32"



_REVISION = Field(
    None,
    description="hub ids only: the branch, tag or commit to use (default: main); the commit used is recorded "
    "in provenance.json",
)


class TeacherSettings(Strict):
    model: str = Field(..., description="hub id, local folder, .gguf file or built-in alias")
    revision: str | None = _REVISION
    adapt: bool = Field(True, description="fine-tune the teacher on each task before distilling")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    train_size: int | None = Field(None, gt=0, description="examples for adaptation; default: the task's")
    trust_remote_code: bool = False


class DeriveSettings(Strict):
    """A student made from the teacher by keeping a subset of its layers (DistilBERT/Minitron init)."""

    num_layers: int | None = Field(None, gt=0)
    layers: list[int] | None = Field(None, description="explicit 0-based teacher block indices")

    @model_validator(mode="after")
    def _one_of(self) -> DeriveSettings:
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError("give exactly one of num_layers or layers")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers must be a non-empty list of distinct teacher block indices")
        return self


# Letters, digits and _, with single dots inside: a name is one folder (students/<name>, teacher/<task>) and
# part of run ids.
_STUDENT_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class StudentSettings(Strict):
    name: str = Field(..., max_length=64, description="short name used in run ids and folders (s1, s2)")
    model: str | None = Field(None, description="hub id, local folder, .gguf or alias; omit with derive")
    revision: str | None = _REVISION
    derive: DeriveSettings | None = None
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    save: Literal["merged", "adapter"] = "merged"
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _STUDENT_NAME.match(v):
            raise ValueError(
                f"student name {v!r} must be letters, digits and _ with single dots inside (no '..', no path "
                "separators, no leading dot): it names the folder students/<name> and is part of run ids"
            )
        return v

    @model_validator(mode="after")
    def _source(self) -> StudentSettings:
        if (self.model is None) == (self.derive is None):
            raise ValueError("give exactly one of `model` (a model spec) or `derive` (layers of the teacher)")
        if self.revision is not None and self.model is None:
            raise ValueError("revision applies to `model` (a hub id); a derived student takes the teacher's")
        return self


class TaskSettings(Strict):
    """Settings common to every task; a task module may subclass it with its own fields."""

    train_size: int | None = Field(None, gt=0, description="training examples (None: the whole split)")
    selection_size: int = Field(
        100, gt=0, description="examples held out from train to choose the best grid setting"
    )
    eval_size: int | None = Field(None, gt=0, description="evaluation examples (None: the whole split)")
    transfer_size: int = Field(
        0,
        ge=0,
        description="transfer set: more training inputs, without their gold labels, that only the KD losses "
        "use (the teacher labels them: answers, soft targets, hidden states); drawn from the training split, "
        "disjoint from the train and selection examples",
    )
    max_length: int = Field(256, gt=8, description="tokens of prompt + answer")
    template: str | None = Field(None, description="prompt template; None: the task's default")

    # Sizes of a built-in task's standard files, so impossible sizes fail before anything is loaded or written
    # (None: known once the data is read; preflight checks them then).
    train_split_size: ClassVar[int | None] = None
    eval_split_size: ClassVar[int | None] = None

    @model_validator(mode="after")
    def _fits_splits(self) -> TaskSettings:
        if self.transfer_size and self.train_size is None:
            raise ValueError("transfer_size needs a train_size: the transfer set is drawn from the rest of "
                             "the training split")
        if self.eval_split_size is not None and self.eval_size is not None \
                and self.eval_size > self.eval_split_size:
            raise ValueError(
                f"eval_size {self.eval_size} is larger than the evaluation split "
                f"({self.eval_split_size} examples)"
            )
        need = (self.train_size or 0) + self.selection_size + self.transfer_size
        if self.train_split_size is not None and need > self.train_split_size:
            raise ValueError(
                f"train_size + selection_size + transfer_size = {need} is larger than the training split "
                f"({self.train_split_size} examples)"
            )
        return self


class EvaluationSettings(Strict):
    batch_size: int = Field(16, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="inference dtype (bf16 matmuls ran 2.3x faster than fp32 on the dev CPU)"
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="greedy generation (SQuAD answers, KD2 teacher answers): transformers' generate, or "
        "vLLM's offline engine (`pip install vllm`; not exercised by kdlab's tests)",
    )
    static_cache: bool = Field(
        False,
        description="hf backend: a static KV cache (cache_implementation='static') for generation; "
        "worth trying with torch.compile on GPUs, not measured yet",
    )
    # Left out of study.yaml while unset, and never part of a run's config hash (`scoring`): adding a
    # benchmark to a finished study redoes no training.
    benchmarks: BenchmarkSettings | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="general-ability benchmarks through lm-evaluation-harness (None: none)",
    )

    def scoring(self) -> EvaluationSettings:
        """These settings without the benchmarks: what decides the task metrics (the runs' hashes)."""
        return self.model_copy(update={"benchmarks": None})


# lm-eval task and group names as its registry spells them (arc_easy, mmlu, lambada_openai, ...): they also
# name the study's benchmark runs and folders, so nothing that could leave a folder.
_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class BenchmarkSettings(Strict):
    """General-ability benchmarks through EleutherAI's lm-evaluation-harness (`pip install 'kdlab[eval]'`):
    the teacher (zero-shot and adapted) and every final student are evaluated on them in-process
    (`kdlab.stages.benchmarks`). Changing these settings redoes only the benchmark evaluations."""

    tasks: list[str] = Field(
        ..., min_length=1,
        description="lm-eval task or group names (hellaswag, arc_easy, mmlu, or a task of `include_path`)",
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples; None: each task's default")
    limit: int | None = Field(
        None, gt=0,
        description="only the first N documents of each task (lm-eval's --limit: for quick checks; numbers "
        "on a subset are not the benchmark's)",
    )
    include_path: str | None = Field(
        None,
        description="a folder of your own lm-eval YAML tasks (data in local JSONL/CSV files works offline, "
        "HF_HUB_OFFLINE=1); hub tasks need their datasets in the Hugging Face cache",
    )

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not _BENCHMARK_NAME.match(t)]
        if bad:
            raise ValueError(
                f"benchmark name(s) {bad} must be an lm-eval task or group name: letters, digits, _ . and - "
                "(they name the benchmark runs and their folders)"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"benchmark names must be distinct, got {v}")
        return v


class BenchSettings(Strict):
    """Efficiency measurements of the teacher and final students (`kdlab bench`, a stage of `kdlab run`)."""

    enabled: bool = Field(True, description="run the bench stage in `kdlab run`")
    examples: int = Field(32, gt=0, description="evaluation examples per task")
    warmup: int = Field(2, ge=0, description="untimed calls before timing")
    repeats: int = Field(3, gt=0, description="timed passes over the examples")


class CacheSettings(Strict):
    mode: Literal["cached", "online"] = Field("cached", description="teacher signals from disk or live")
    hidden_dtype: Literal["float16", "bfloat16"] = "float16"
    dir: str | None = Field(None, description="default: <output_dir>/teacher_cache")
    empty_answers: Literal["gold", "drop"] = Field(
        "gold",
        description="a teacher answer that is empty or has no letter or digit (KD2 target): replace it by "
        "the gold answer, or drop the example from KD2; counted in the cache manifest and the report",
    )


class ExecutorSettings(Strict):
    """Where the student runs of a sweep execute: this machine (`kdlab sweep` processes sharing the registry),
    or a Ray cluster (one driver writes the registry; each run is a Ray task). CLI flags override."""

    kind: Literal["local", "ray"] = Field("local", description="local processes, or tasks on a Ray cluster")
    workers: int = Field(
        1, ge=1, description="local: sweep processes on this machine, each with an equal share of the cores "
        "as torch threads (kdlab.local_workers); on the 2-core demo it gained only ~1.1x (docs/demo.md)"
    )
    address: str | None = Field(
        None,
        description="the Ray cluster: 'auto' (one started with `ray start` on this machine), "
        "'ray://head:10001' (Ray Client), host:port; None: RAY_ADDRESS, else a cluster on this machine, "
        "else a new local one",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each run")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each run (1 for a GPU study)")
    memory_gb: float | None = Field(None, gt=0, description="memory Ray reserves for each run (None: none)")
    max_retries: int = Field(
        3, ge=0, description="times Ray runs a run again whose worker or node died (it resumes from its last "
        "checkpoint when training.save_steps > 0); an error raised by the run itself is not retried"
    )


class StudyConfig(Strict):
    name: str = "study"
    output_dir: str = "runs/study"
    data_dir: str | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    teacher: TeacherSettings
    students: list[StudentSettings] = Field(..., min_length=1)
    # Each task and method section as written (a mapping), until `kdlab.resolve.resolve_config` validates it
    # with the settings class its registry holds (SST2Settings, KD1Settings, ...): this module knows no
    # registry. Typed `Any` so a section dumps as whatever it holds, a subclass's fields included.
    tasks: dict[str, Any] = Field(..., min_length=1)
    methods: dict[str, Any] = Field(
        default_factory=dict, description="empty: the baseline method alone (filled in by resolve_config)"
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    data_seed: int = Field(
        1234, description="picks the train/selection/transfer/eval subsets; shared by every run"
    )
    deterministic: bool = Field(
        False,
        description="deterministic kernels on GPUs (torch.use_deterministic_algorithms, the cuBLAS "
        "workspace setting, math attention): bit-identical reruns at some speed cost. "
        "CPU runs are deterministic anyway",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="modules outside kdlab that register methods (or tasks): importable module names, or "
        "paths of .py files; imported before the rest of the config is read",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, raw: Any) -> Any:
        for name in raw if isinstance(raw, dict) else ():
            if not _STUDENT_NAME.match(str(name)):
                raise ValueError(f"task name {name!r} must be letters, digits and _ with single dots inside: "
                                 "it names folders (data/<task>.json, teacher/<task>) and is part of run ids")
        return _sections(raw, "tasks")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, raw: Any) -> Any:
        return _sections(raw, "methods")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _students_unique(self) -> StudyConfig:
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students: names must be unique, got {names}")
        return self

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _sections(raw: Any, where: str) -> Any:
    """`tasks:` / `methods:` with each section a mapping (an empty one for `name:` alone) or settings already
    typed; what is in a section is checked by `resolve_config`."""
    if not isinstance(raw, dict):
        return raw  # pydantic reports the wrong type
    out: dict[str, Any] = {}
    for name, body in raw.items():
        if body is not None and not isinstance(body, dict | BaseModel):
            raise ValueError(f"{where}.{name}: expected a mapping of settings (got {body!r})")
        out[name] = {} if body is None else body
    return out


def typed_sections(
    raw: dict[str, Any], settings_class: Callable[[str, Any], type[Strict]], where: str
) -> dict[str, Strict]:
    """Validate each named section with its own class (`settings_class(name, body)`, which raises ValueError
    for an unknown section), keeping the dotted path in errors."""
    out: dict[str, Strict] = {}
    for name, body in raw.items():
        if isinstance(body, Strict):
            out[name] = body
            continue
        cls = settings_class(name, body)
        try:
            out[name] = cls.model_validate(body or {})
        except ValidationError as e:
            raise ValueError(_format_errors(e, prefix=f"{where}.{name}")) from None
    return out


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        # A section's own check naming one of its keys first ("optim: ...") reads as that key's error.
        key = re.match(r"([A-Za-z_]\w*): ", msg)
        if key and isinstance(got, dict) and key.group(1) in got:
            path, msg = f"{path}.{key.group(1)}" if path else key.group(1), msg[key.end():]
        lines.append(f"{path or '<root>'}: {msg}{got_s}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid study config: {_format_errors(e)}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """The study config in a YAML file, with `overrides` ("key.sub=value", see `apply_overrides`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study config not found (expected a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return parse_config(apply_overrides(data, overrides), str(path))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each "key.sub=value" set (value read as YAML: 0.001, true, [1, 2], {a: 1}); missing
    sections are created. The config is validated afterwards, so a wrong key fails with its dotted path."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE, e.g. training.learning_rate=0.001")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        *parents, last = key.strip().split(".")
        section = data
        for i, part in enumerate(parents):
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        section[last] = value
    return data


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    return resources.files("kdlab.presets").joinpath(f"{name}.yaml").read_text()


def load_preset(name: str, overrides: Sequence[str] = ()) -> StudyConfig:
    return parse_config(apply_overrides(yaml.safe_load(preset_text(name)), overrides), f"preset {name}")
