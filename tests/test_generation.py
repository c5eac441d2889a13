"""Greedy answer generation: where an answer starts and stops (SQuAD predictions and KD2 teacher answers)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

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


class _FakeVLLM:
    """Stands in for the `vllm` package (not installed here): records what kdlab asks of its offline API and
    answers every prompt with a continuation that opens with a newline, as real models do."""

    def __init__(self) -> None:
        self.engines: list[dict] = []
        self.calls: list[tuple[list[dict], object]] = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs) -> None:
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs) -> None:
                fake.engines.append(kwargs)

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                    text=f"\n answer{len(p['prompt_token_ids'])}\nnext")]) for p in prompts]

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_vllm_backend_generates_greedily_from_the_saved_weights(monkeypatch, tiny_tokenizer) -> None:
    """`evaluation.backend: vllm`: one engine over the saved folder, every prompt's token ids in order,
    greedy sampling with the answer budget, and each answer cut to its first line with text as the hf
    backend cuts it. Without a folder (an in-memory model) it refuses rather than generating from stale
    weights."""
    fake = _FakeVLLM()
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
