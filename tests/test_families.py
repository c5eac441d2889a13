"""Decoder families other than Llama: derived students, LoRA defaults, widths from configs, and a tiny study
per family (a derived and a separate student, all four methods), on tiny models built in code."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel

from kdlab.config import LoraSettings, parse_config, preset_text
from kdlab.models import (
    DeriveError,
    add_lora,
    check_derivable,
    decoder_blocks,
    default_lora_targets,
    derive_student,
    derived_config,
    hidden_width,
    lora_target_modules,
    num_layers,
    teacher_blocks_logits,
    verify_derived,
)
from kdlab.registry import Registry
from kdlab.study import Study
from kdlab.tiny import TINY_FAMILIES, build_tiny_model, build_tiny_tokenizer, write_tiny_model

# Where each family keeps its blocks, written out here rather than found, so the tests check the finder.
BLOCKS = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "gemma3_text": "model.layers", "phi": "model.layers", "phi3": "model.layers", "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers",
}
# LoRA targets when a config names none: peft's table, else every linear layer.
LORA_DEFAULTS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "phi3": "all-linear", "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
}
KEEP = [0, 1, 4]  # of 5 blocks: mixes sliding and full attention in qwen2 and gemma3_text
assert set(BLOCKS) == set(TINY_FAMILIES) == set(LORA_DEFAULTS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def teachers(tokenizer) -> dict[str, PreTrainedModel]:
    return {f: build_tiny_model(f, tokenizer, num_layers=5, seed=7).eval() for f in TINY_FAMILIES}


def _prompt(tokenizer, length: int = 20) -> dict[str, torch.Tensor]:
    # Longer than the sliding windows (8) of the tiny qwen2 and gemma3_text models.
    text = "Review: a great film with a moving story and fine performances . Sentiment: positive . the end"
    ids = torch.tensor(tokenizer(text)["input_ids"][:length])[None]
    assert ids.shape[1] == length
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _by_hand(teacher: PreTrainedModel, path: str, layers: list[int]) -> PreTrainedModel:
    """A copy of the teacher whose block list is cut down to `layers` (the teacher's own modules, with their
    own layer indices), its config told the new count and per-layer types."""
    model = copy.deepcopy(teacher)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList([getattr(parent, attr)[i] for i in layers]))
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


# ---------------------------------------------------------------------------------------------------------
# block lists and derived students


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_decoder_blocks_found(family: str, tokenizer) -> None:
    model = build_tiny_model(family, tokenizer, num_layers=3)
    name, blocks = decoder_blocks(model)
    assert name == BLOCKS[family] and len(blocks) == 3 and blocks is model.get_submodule(name)
    peft_model = add_lora(copy.deepcopy(model), LoraSettings(r=2, alpha=4, dropout=0.0))
    assert decoder_blocks(peft_model)[0] == name  # found under peft too


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_derived_logits_equal_manual_forward(family: str, teachers, tokenizer, tmp_path: Path) -> None:
    teacher = teachers[family]
    inputs = _prompt(tokenizer)
    before = _logits(teacher, inputs)
    student = derive_student(teacher, KEEP)
    expected = _logits(_by_hand(teacher, BLOCKS[family], KEEP), inputs)
    assert torch.allclose(_logits(student, inputs), expected, atol=1e-5), family
    assert torch.allclose(teacher_blocks_logits(teacher, KEEP, inputs), expected, atol=1e-5)
    assert torch.equal(_logits(teacher, inputs), before)  # the teacher is left as it was
    assert num_layers(teacher.config) == 5 and num_layers(student.config) == 3
    if getattr(teacher.config, "layer_types", None):
        types = [teacher.config.layer_types[i] for i in KEEP]
        assert student.config.layer_types == types
        if family in ("qwen2", "gemma3_text"):
            assert len(set(types)) == 2  # the check covers sliding and full layers
    # Every module of block j knows it is layer j (the KV cache is indexed by it).
    for j, block in enumerate(decoder_blocks(student)[1]):
        indices = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices == {j}, (family, j, indices)
    # Weights are copies: training the student must not move the teacher.
    assert all(
        p.data_ptr() != q.data_ptr() for p in student.parameters() for q in teacher.parameters()
    )
    # Its config describes it: saved and loaded like any checkpoint, it computes the same.
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(_logits(reloaded, inputs), expected, atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_derived_student_generates_with_kv_cache(family: str, teachers, tokenizer) -> None:
    student = derive_student(teachers[family], KEEP).eval()
    inputs = _prompt(tokenizer)
    with torch.no_grad():
        cached = student.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]
        ids = inputs["input_ids"]
        for _ in range(6):  # greedy without a cache: the whole sequence each step
            ids = torch.cat([ids, _logits(student, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == ids[0, -6:].tolist(), family


def test_derived_config_renumbers_per_layer_fields() -> None:
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(num_hidden_layers=6, mlp_only_layers=[1, 4], use_sliding_window=True,
                            sliding_window=8, max_window_layers=3)
    derived = derived_config(config, [0, 4, 5])
    assert derived.num_hidden_layers == 3 and config.num_hidden_layers == 6
    assert derived.mlp_only_layers == [1]  # teacher block 4 is now block 1
    assert derived.layer_types == [config.layer_types[i] for i in (0, 4, 5)]
    assert GPT2Config(n_layer=4).n_layer == 4
    assert derived_config(GPT2Config(n_layer=4), [1, 3]).n_layer == 2  # GPT-2 names it n_layer


def test_unsupported_families_fail_before_any_work(tokenizer) -> None:
    from transformers import Qwen2MoeConfig

    # GPT-2 with attention scaled by 1/(layer index + 1): a copied block would compute something else.
    gpt2 = GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=len(tokenizer),
                      scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(DeriveError, match=r"gpt2.*scale_attn_by_inverse_layer_idx"):
        check_derivable(gpt2, [0, 3])
    with pytest.raises(DeriveError, match="gpt2"):
        derive_student(AutoModelForCausalLM.from_config(gpt2), [0, 3])
    # Qwen2-MoE with a sparse block every second layer: teacher blocks 1 (sparse) and 2 (dense) would land
    # at positions whose type the config fixes the other way round. Found on the meta device, in no time.
    moe = Qwen2MoeConfig(num_hidden_layers=4, decoder_sparse_step=2, hidden_size=32, intermediate_size=64,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    start = time.perf_counter()
    with pytest.raises(DeriveError, match=r"qwen2_moe.*position 0.*teacher block 1"):
        check_derivable(moe, [1, 2])
    assert time.perf_counter() - start < 5
    check_derivable(moe, [2, 3])  # dense then sparse, as the config lays them out: fine
    with pytest.raises(ValueError, match="out of range"):
        check_derivable(moe, [0, 4])
    # DiffLlama sets each layer's attention lambda from its index: known, refused up front.
    from transformers import DiffLlamaConfig

    with pytest.raises(DeriveError, match="diffllama"):
        check_derivable(DiffLlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4), [0, 3])


def test_no_block_list_is_a_clear_error(tokenizer) -> None:
    model = build_tiny_model("llama", tokenizer, num_layers=3)
    model.model.layers = nn.Sequential(*model.model.layers)  # no ModuleList of 3 blocks anywhere
    with pytest.raises(DeriveError, match=r"llama model \(LlamaForCausalLM\): no list of 3 decoder blocks"):
        derive_student(model, [0, 2])


def test_verify_derived_catches_a_different_block(teachers) -> None:
    teacher = teachers["gpt2"]
    student = derive_student(teacher, KEEP)
    with torch.no_grad():
        decoder_blocks(student)[1][1].mlp.c_fc.weight.mul_(1.5)
    with pytest.raises(DeriveError, match="computes something else"):
        verify_derived(teacher, student, KEEP)


# ---------------------------------------------------------------------------------------------------------
# LoRA targets and widths


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_lora_default_targets(family: str, tokenizer) -> None:
    model = build_tiny_model(family, tokenizer, num_layers=2)
    assert default_lora_targets(model) == LORA_DEFAULTS[family]
    lora = LoraSettings(r=2, alpha=4, dropout=0.0)  # no target_modules
    peft_model = add_lora(model, lora)
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    if LORA_DEFAULTS[family] == "all-linear":
        assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # the head is left out
    else:
        assert adapted == set(LORA_DEFAULTS[family])
    assert any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)


def test_lora_explicit_targets(tokenizer) -> None:
    gpt2 = build_tiny_model("gpt2", tokenizer, num_layers=1)
    with pytest.raises(ValueError, match=r"\['q_proj', 'v_proj'\].*GPT2LMHeadModel.*c_attn.*c_fc.*c_proj"):
        add_lora(gpt2, LoraSettings(target_modules=["q_proj", "v_proj"]))
    assert lora_target_modules(gpt2, LoraSettings(target_modules=["attn.c_attn"])) == ["attn.c_attn"]
    assert lora_target_modules(gpt2, LoraSettings(target_modules="all-linear")) == "all-linear"
    with pytest.raises(ValueError, match="target_modules"):
        LoraSettings(target_modules=[])


def test_widths_and_layer_counts_from_configs() -> None:
    from transformers import Gemma3Config, GPTNeoXConfig

    gpt2 = GPT2Config(n_embd=48, n_layer=3)  # GPT-2 names them n_embd and n_layer
    assert (hidden_width(gpt2), num_layers(gpt2)) == (48, 3)
    neox = GPTNeoXConfig(hidden_size=40, num_hidden_layers=5, num_attention_heads=4)
    assert (hidden_width(neox), num_layers(neox)) == (40, 5)
    # A multimodal config: the language model's width and depth, not the vision tower's.
    gemma3 = Gemma3Config(text_config={"hidden_size": 96, "num_hidden_layers": 7, "head_dim": 24})
    assert (hidden_width(gemma3), num_layers(gemma3)) == (96, 7)


# ---------------------------------------------------------------------------------------------------------
# a tiny study per family: derived + separate student, every method

# squad for two families: the students' evaluation generates with the KV cache (derived blocks renumbered).
STUDY_TASKS = {
    "llama": {"sst2": {"train_size": 8, "selection_size": 4, "eval_size": 4, "max_length": 64}},
    "qwen2": {"squad": {"train_size": 6, "selection_size": 2, "eval_size": 2, "max_length": 128,
                        "max_new_tokens": 4}},
    "gpt2": {"squad": {"train_size": 6, "selection_size": 2, "eval_size": 2, "max_length": 128,
                       "max_new_tokens": 4}},
    "gpt_neox": {"sst2": {"train_size": 8, "selection_size": 4, "eval_size": 4, "max_length": 64}},
}


def _family_config(family: str, root: Path) -> dict:
    teacher = write_tiny_model(root / "teacher", family, num_layers=4, hidden_size=64, seed=1)
    student = write_tiny_model(root / "student", family, num_layers=2, hidden_size=32, seed=2)
    data = yaml.safe_load(preset_text("smoke"))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}  # no target_modules: the family's default
    data["teacher"] = {
        "model": str(teacher), "adapt": True, "finetune": "lora", "lora": lora,
        "training": {"learning_rate": 0.003, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.0,
                     "logging_steps": 1},
    }
    data["students"] = [
        {"name": "d", "derive": {"num_layers": 2}, "finetune": "lora", "lora": lora},
        {"name": "s", "model": str(student), "finetune": "full"},
    ]
    data["tasks"] = STUDY_TASKS[family]
    data["methods"] = {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 4},
                       "kd2": {"lambda": 0.5}, "kd3": {"lambda": 0.5, "layer_map": "auto"}}
    data["training"] = {"learning_rate": 0.001, "batch_size": 8, "epochs": 1, "warmup_ratio": 0.0,
                        "logging_steps": 1}
    data["seeds"] = [1]
    data["bench"] = {"enabled": False}
    return data


@pytest.mark.parametrize("family", sorted(STUDY_TASKS))
def test_family_study(family: str, tmp_path: Path, tiny_data_dir: Path) -> None:
    start = time.perf_counter()
    config = parse_config(_family_config(family, tmp_path))
    study = Study(config, output_dir=tmp_path / "out", data_dir=tiny_data_dir)
    study.prepare()
    assert study.sweep() == []
    runs = {r.id: r for r in Registry(tmp_path / "out" / "registry.sqlite").runs()}
    assert all(r.status == "done" for r in runs.values()), {i: (r.status, r.error) for i, r in runs.items()}
    task = next(iter(STUDY_TASKS[family]))
    students = {(r.student, r.method) for r in runs.values() if r.kind == "student"}
    assert students == {(s, m) for s in ("d", "s") for m in ("sft", "kd1", "kd2", "kd3")}
    assert f"teacher-{task}" in runs and f"cache-{task}" in runs
    # The derived student: its family, 2 of the 4 teacher blocks, KD3 pairs each with its source block.
    init = tmp_path / "out" / "students" / "d" / "init"
    origin = json.loads((init / "derived_from.json").read_text())
    assert origin["teacher_layers"] == [0, 3]
    assert json.loads((init / "config.json").read_text())["model_type"] == family
    kd3 = runs[f"kd3-{task}-d-lam0.5-seed1"]
    assert kd3.params["layer_pairs"] == [[1, 1], [2, 4]]
    # The separate student (2 blocks) is paired uniformly with the teacher's 4: block 1 -> 2, block 2 -> 4.
    assert runs[f"kd3-{task}-s-lam0.5-seed1"].params["layer_pairs"] == [[1, 2], [2, 4]]
    provenance = study.provenance()
    assert provenance["models"]["students.s"]["fingerprint"]
    print(f"{family} study: {time.perf_counter() - start:.1f}s")
