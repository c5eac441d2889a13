"""Greedy answer generation: where an answer starts and stops (SQuAD predictions and KD2 teacher answers)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from vllm_standin import VLLMStandIn

from kdlab.evaluation import GenerationOptions, first_answer_line, generate_answers, generation_options
from kdlab.tiny import build_tiny_llama


def test_first_answer_line_skips_leading_blank_lines() -> None:
    assert first_answer_line("\n  Paris\nQuestion: x") == "Paris"
    assert first_answer_line(" Denver Broncos") == "Denver Broncos"
    assert first_answer_line("\n \n") == ""


class _Scripted(torch.nn.Module):
    """Wraps a tiny Llama so that greedy decoding emits `script` token by token (one token per forward)."""

    def __init__(self, model, script: list[int]):
        super().__init__()
        self.inner, self.script, self.calls = model.forward, script, 0

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        step = min(self.calls, len(self.script) - 1)
        self.calls += 1
        logits = torch.full_like(out.logits, -1e4)
        logits[..., self.script[step]] = 0.0
        out.logits = logits
        return out


def test_generation_does_not_stop_at_a_leading_newline(tiny_tokenizer) -> None:
    model = build_tiny_llama(tiny_tokenizer, num_layers=1, hidden_size=32)
    newline = tiny_tokenizer.encode("\n", add_special_tokens=False)
    answer = tiny_tokenizer.encode(" paris", add_special_tokens=False)
    tail = tiny_tokenizer.encode(" later", add_special_tokens=False)
    script = newline + answer + newline + tail
    scripted = _Scripted(model, script)
    model.forward = scripted.forward  # generate() calls the model's own forward
    prompt = tiny_tokenizer.encode("context: paris is a city. answer:", add_special_tokens=False)
    answers = generate_answers(model, tiny_tokenizer, [prompt], max_new_tokens=12, batch_size=1)
    assert answers == ["paris"]
    # It stopped at the newline after the answer: the forward ran once per generated token up to it.
    assert scripted.calls == len(newline + answer + newline)


def test_vllm_backend_generates_greedily_from_the_saved_weights(monkeypatch, tiny_tokenizer) -> None:
    """`evaluation.backend: vllm`: one engine over the saved folder, every prompt's token ids in order,
    greedy sampling with the answer budget, and each answer cut to its first line with text as the hf
    backend cuts it. Without a folder (an in-memory model) it refuses rather than generating from stale
    weights."""
    # Continuations open with a newline, as real models' do.
    fake = VLLMStandIn(answer=lambda ids: f"\n answer{len(ids)}\nnext")
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    prompts = [[5, 6, 7], [8], [9, 10]]
    options = GenerationOptions(backend="vllm", model_path="/models/student", dtype="bfloat16")
    with generation_options(options):
        answers = generate_answers(torch.nn.Linear(1, 1), tiny_tokenizer, prompts, max_new_tokens=12,
                                   batch_size=2)
    assert answers == ["answer3", "answer1", "answer2"]
    assert len(fake.engines) == 1 and fake.engines[0]["model"] == "/models/student"
    assert fake.engines[0]["dtype"] == "bfloat16"
    sent, params = fake.calls[0]
    assert [p["prompt_token_ids"] for p in sent] == prompts
    assert params.kwargs["temperature"] == 0.0 and params.kwargs["max_tokens"] == 12
    with generation_options(GenerationOptions(backend="vllm")), pytest.raises(ValueError, match="saved"):
        generate_answers(torch.nn.Linear(1, 1), tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2)


class _OnGPU(torch.nn.Module):
    """A model that says it lives on a GPU and records where `.to` sends it (no GPU here)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.where = "cuda"

    def to(self, *args: Any, **kwargs: Any) -> _OnGPU:  # type: ignore[override]
        self.where = str(args[0] if args else kwargs["device"])
        return self


def test_vllm_engine_starts_with_the_hf_model_off_the_gpu_and_a_fitting_memory_share(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Any
) -> None:
    """vLLM >= 0.9 refuses to start when `gpu_memory_utilization` (default 0.9) of the GPU is more than is
    free. With 30 of 140 GiB free, kdlab asks for a share of the free memory, and the HF model that called it
    is off the GPU while the engine runs and back on it after."""
    import kdlab.evaluation as evaluation

    model = _OnGPU()
    seen: list[str] = []
    fake = VLLMStandIn(on_start=lambda engine: seen.append(model.where))
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(evaluation, "_device", lambda m: torch.device(getattr(m, "where", "cpu")))
    with generation_options(GenerationOptions(backend="vllm", model_path="/models/teacher")):
        answers = generate_answers(model, tiny_tokenizer, [[5, 6]], max_new_tokens=4, batch_size=1)
    assert answers == ["the answer"]
    assert seen == ["cpu"] and model.where == "cuda"
    share = fake.engines[0]["gpu_memory_utilization"]
    assert 0 < share * 140 <= 30


@pytest.mark.parametrize("call", ["LLM", "SamplingParams", "generate"])
def test_the_vllm_stand_in_refuses_what_vllm_does_not_document(call: str) -> None:
    """The stand-in is only worth something if it refuses undocumented arguments (a misspelt one included)."""
    fake = VLLMStandIn()
    with pytest.raises(TypeError, match="unexpected keyword"):
        if call == "LLM":
            fake.module.LLM(model="m", max_model_length=10)
        elif call == "SamplingParams":
            fake.module.SamplingParams(max_new_tokens=10)
        else:
            fake.module.LLM(model="m").generate([{"prompt_token_ids": [1]}], use_progress_bar=False)
