"""Shared fixtures: a tiny BPE tokenizer built in code, a synthetic data folder, and the real data folder.

``build_tiny_tokenizer`` lives here for now; it is meant to move next to the tiny-model builders.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Template words, label words and plain English, so BPE learns whole-word tokens for the words tests use.
_TINY_CORPUS = """
Review: a charming and often affecting journey . Sentiment: positive
Review: the plot is dull and the jokes fall flat . Sentiment: negative
Review: a great film with a moving story . Sentiment: positive
Review: a bad , boring and terrible mess . Sentiment: negative
Context: The river runs through the old city and the bridge was built in the year one thousand.
Question: When was the bridge built? Answer: one thousand
Context: The capital of the country is a large city near the sea.
Question: What is the capital? Answer: the large city
the a an of to in and is was for on with as by at from that which who what when where why how
one two three four five six seven eight nine ten hundred thousand year years first last new old
positive negative good bad great terrible best worst love hate fun funny sad happy story film movie
river city bridge king queen castle garden music painter village mountain forest lake harbour ship
"""


def build_tiny_tokenizer(
    *, vocab_size: int = 400, add_bos: bool = True, add_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (special tokens <pad> <s> </s> <unk>).

    ``add_bos`` / ``add_eos``: whether encoding with special tokens puts <s> first / </s> last, to mimic
    Llama-style and eos-appending tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_TINY_CORPUS * 3).splitlines(), trainer=trainer)
    single = " ".join([*(["<s>"] if add_bos else []), "$A", *(["</s>"] if add_eos else [])])
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


# ---------------------------------------------------------------------------------------------------------
# synthetic data in the official formats

_WORDS = ("river city bridge king queen castle garden music painter village mountain forest lake harbour "
          "ship story film movie year old new first last good great").split()
_POS = "a charming and moving film", "great fun with a happy story", "the best movie of the year"
_NEG = "a dull and boring mess", "the worst film , terrible jokes", "sad and bad , the plot falls flat"


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _sst2_rows(rng: random.Random, n: int) -> list[str]:
    rows = []
    for i in range(n):
        label = i % 2
        text = f"{rng.choice(_POS if label else _NEG)} {_sentence(rng, 3)}"
        if i % 7 == 3:
            text += " "  # some GLUE rows carry a trailing space
        if i == 5:
            text += ' with "quotes'  # an unbalanced quote must survive QUOTE_NONE reading
        rows.append(f"{text}\t{label}")
    return rows


def _paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(f"The {_sentence(rng, 6)}." for _ in range(n_sentences))


def _qa(qid: str, context: str, answer: str, question: str, extra: tuple[str, ...] = ()) -> dict:
    start = context.index(answer)
    answers = [{"text": answer, "answer_start": start}]
    answers += [{"text": t, "answer_start": context.find(t)} for t in extra]
    return {"id": qid, "question": question, "answers": answers}


def _squad_file(rng: random.Random, prefix: str, n_questions: int, *, dev: bool) -> dict:
    articles = []
    paragraphs = []
    for q in range(n_questions - 3):
        answer = f"the {rng.choice(_WORDS)} of {rng.choice(_WORDS)} {q}"
        context = f"{_paragraph(rng, 2)} It was {answer}. {_paragraph(rng, 1)}"
        extra = (answer.split(" of ")[1], f"{answer}.") if dev else ()
        paragraphs.append({"context": context,
                           "qas": [_qa(f"{prefix}{q:03d}", context, answer, "What was it?", extra)]})
    # A very long context with the answer in the middle, one with the answer near the end, and one whose
    # answer_start does not point at the answer.
    middle = f"{_paragraph(rng, 40)} The key was seven hundred. {_paragraph(rng, 40)}"
    near_end = f"{_paragraph(rng, 80)} The key was nine hundred. {_paragraph(rng, 1)}"
    wrong = f"{_paragraph(rng, 80)} The key was two hundred."
    long_qas = [("long-middle", middle, "seven hundred"), ("long-end", near_end, "nine hundred"),
                ("long-wrong", wrong, "two hundred")]
    for qid, context, answer in long_qas:
        qa = _qa(f"{prefix}{qid}", context, answer, "What was the key?",
                 ("hundred",) if dev else ())
        if qid == "long-wrong":
            qa["answers"][0]["answer_start"] = 3
        paragraphs.append({"context": context, "qas": [qa]})
    for a in range(0, len(paragraphs), 5):
        articles.append({"title": f"Article_{a // 5}", "paragraphs": paragraphs[a:a + 5]})
    return {"version": "1.1", "data": articles}


def write_tiny_data(root: Path) -> Path:
    """A data folder laid out like the real one (sst2/*.tsv, squad/*-v1.1.json), small and deterministic."""
    rng = random.Random(0)
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    (root / "squad").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 60), ("validation", 20)):
        (root / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(_sst2_rows(rng, n)) + "\n")
    for name, n, dev in (("train-v1.1.json", 40, False), ("dev-v1.1.json", 20, True)):
        data = _squad_file(rng, "dev-" if dev else "train-", n, dev=dev)
        (root / "squad" / name).write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "sst2" / "validation.tsv").is_file():
        pytest.skip(f"real data folder {path} not present")
    return path
