"""kd1 across tokenizers on real weights: the packaged SmolLM2-135M-Instruct (49,152 tokens) teaches a tiny
2-layer student with its own byte-level BPE (1,500 tokens trained on the sentences) to continue "Review:"
with real SST-2 validation sentences; prints the matched vocabulary and the KD loss of each step for hybrid
and ULD (live teacher). Data: $KDLAB_DATA_DIR, else ../shared/data beside the checkout.

    python bench/cross_tokenizer_real.py
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

from kdlab.alignment import vocabulary_map
from kdlab.config import TrainingSettings
from kdlab.methods import METHODS
from kdlab.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model_path
from kdlab.tasks.base import Encoded, encode_prompt, target_ids
from kdlab.tiny import _CORPUS, build_tiny_llama, build_tiny_tokenizer
from kdlab.training import TrainItem, train, with_teacher_view

PROMPT = "Review:"


def encoded(i: int, answer: str, tokenizer) -> Encoded:
    p, t = encode_prompt(PROMPT, tokenizer), target_ids(answer, tokenizer)
    return Encoded(f"sst2-{i}", p + t, [-100] * len(p) + t)


def main() -> None:
    data = Path(os.environ.get("KDLAB_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    with open(data / "sst2" / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = [" " + r["sentence"].strip() for r in rows[:64]]
    path = resolve_model_path(SMOLLM2_ALIAS)
    teacher_tok, teacher = load_tokenizer(path), load_model(path, dtype="float32").eval()
    student_tok = build_tiny_tokenizer(1500, corpus="\n".join(sentences * 3) + _CORPUS)
    items = [with_teacher_view(TrainItem(gold=encoded(i, s, student_tok)), encoded(i, s, teacher_tok), s,
                               student_tok, teacher_tok) for i, s in enumerate(sentences[:16])]
    vocabulary = vocabulary_map(student_tok, teacher_tok)
    print(f"matched vocabulary: {vocabulary.size} of {len(student_tok)} student tokens "
          f"(teacher {len(teacher_tok)})")
    settings = TrainingSettings(learning_rate=1e-2, batch_size=8, max_steps=8, warmup_ratio=0.0,
                                logging_steps=1, lr_scheduler="constant")
    for mode in ("hybrid", "uld"):
        params = {"lam": 1.0, "temperature": 1.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 32,
                  "cross_tokenizer": mode}
        result = train(build_tiny_llama(student_tok, num_layers=2, seed=0), items, method=METHODS["kd1"],
                       params=params, settings=settings, output_dir=tempfile.mkdtemp(), seed=1,
                       pad_id=student_tok.pad_token_id, vocab_size=len(student_tok), live_teacher=teacher,
                       teacher_pad_id=teacher_tok.pad_token_id, teacher_vocab_size=len(teacher_tok),
                       vocabulary=vocabulary)
        kd = [round(e["loss_kd"], 3) for e in result.log_history if "loss_kd" in e]
        print(f"{mode}: loss_kd by step {kd}")


if __name__ == "__main__":
    main()
