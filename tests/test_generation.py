"""Greedy answer generation: where an answer starts and stops (SQuAD predictions and KD2 teacher answers)."""

from __future__ import annotations

import torch

from kdlab.evaluation import first_answer_line, generate_answers
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
