from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.tasks import (
    TASKS,
    DataUnavailableError,
    Encoded,
    Example,
    SquadSettings,
    SquadTask,
    SST2Settings,
    SST2Task,
    collate,
    collate_prompts,
    encode,
    encode_prompt,
    get_task,
    settings_class,
    split_train_selection,
    subset,
)
from kdlab.tiny import build_tiny_tokenizer


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # A data folder in the developer's environment must not change what these tests load.
    monkeypatch.delenv("KDLAB_DATA_DIR", raising=False)


# ---------------------------------------------------------------------------------------------------------
# registry and settings


def test_registry_matches_config_sections() -> None:
    assert set(TASKS) == {"sst2", "squad"}
    for name, cls in TASKS.items():
        assert cls.name == name
        assert settings_class(name, {}) is cls.settings_class
    assert isinstance(get_task("sst2", SST2Settings()), SST2Task)
    assert isinstance(get_task("squad"), SquadTask)
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        get_task("mnli")


def test_settings_type_and_template_checked() -> None:
    with pytest.raises(TypeError, match="SST2Settings"):
        SST2Task(SquadSettings())
    with pytest.raises(ValueError, match=r"tasks\.sst2\.template.*'review'"):
        SST2Task(SST2Settings(template="{review} ->"))
    with pytest.raises(ValueError, match=r"tasks.squad.template: must contain \{context\}"):
        SquadTask(SquadSettings(template="Q: {question}"))
    task = SquadTask(SquadSettings(template="{title}: {context} Q: {question} A:"))
    ex = Example("q", {"context": "c", "question": "q?", "title": "T"}, ("a",), answer_start=0)
    assert task.format_prompt(ex) == "T: c Q: q? A:"


# ---------------------------------------------------------------------------------------------------------
# encoding


def test_encode_masks_exactly_the_prompt(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = SST2Task()
    ex = task.load("train", tiny_data_dir)[1]
    assert ex.label == 1
    prompt = task.format_prompt(ex)
    enc = encode(task, ex, prompt, tiny_tokenizer)
    assert enc is not None and enc.id == ex.id
    p_ids = encode_prompt(prompt, tiny_tokenizer)
    n = len(p_ids)
    assert p_ids[0] == tiny_tokenizer.bos_token_id  # this tokenizer adds BOS, and it is kept
    assert enc.input_ids[:n] == p_ids
    assert enc.labels[:n] == [-100] * n
    target = enc.input_ids[n:]
    assert enc.labels[n:] == target
    assert target[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(target[:-1]) == " positive"
    assert -100 not in enc.labels[n:]

    # A teacher's answer replaces the gold target.
    enc_t = encode(task, ex, prompt, tiny_tokenizer, target=task.answer_target(0))
    assert tiny_tokenizer.decode(enc_t.input_ids[n:-1]) == " negative"


def test_encode_strips_an_eos_the_tokenizer_appends(tiny_data_dir: Path, tiny_tokenizer) -> None:
    eos_tok = build_tiny_tokenizer(add_bos=True, add_eos=True)
    assert eos_tok("hello").input_ids[-1] == eos_tok.eos_token_id  # the tokenizer does append eos
    task = SST2Task()
    ex = task.load("train", tiny_data_dir)[0]
    prompt = task.format_prompt(ex)
    assert encode_prompt(prompt, eos_tok) == encode_prompt(prompt, tiny_tokenizer)
    enc = encode(task, ex, prompt, eos_tok)
    assert enc.input_ids.count(eos_tok.eos_token_id) == 1 and enc.input_ids[-1] == eos_tok.eos_token_id


def test_encode_too_long_returns_none(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = SST2Task(SST2Settings(max_length=10))
    ex = task.load("train", tiny_data_dir)[0]
    assert encode(task, ex, task.format_prompt(ex), tiny_tokenizer) is None


def test_collate_pads_dynamically_and_never_labels_padding(tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    short = Encoded("s", [1, 10, 11, 12, eos], [-100, -100, -100, 12, eos])
    long = Encoded("l", [1, 10, 11, 12, 13, 14, 15, eos], [-100] * 5 + [14, 15, eos])
    batch = collate([short, long], pad_id=eos)  # pad == eos, as many causal LMs are set up
    assert batch["input_ids"].shape == (2, 8)  # padded to the batch's longest, not to max_length
    assert batch["example_ids"] == ["s", "l"]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 12, eos, -100, -100, -100]
    assert batch["input_ids"][0].tolist() == [1, 10, 11, 12, eos, eos, eos, eos]
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert batch["labels"][1].tolist() == long.labels
    assert str(batch["input_ids"].dtype) == "torch.int64" and str(batch["labels"].dtype) == "torch.int64"
    # Real tokens are labelled only where the Encoded labels say so: padding adds nothing.
    assert int((batch["labels"] != -100).sum()) == 2 + 3

    left = collate([short, long], pad_id=eos, padding_side="left")
    assert left["labels"][0].tolist() == [-100] * 3 + short.labels
    assert left["attention_mask"][0].tolist() == [0] * 3 + [1] * 5

    other = collate([short], pad_id=0)
    assert other["input_ids"].shape == (1, 5)  # a batch of one is not padded at all
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([[5, 6], [7, 8, 9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


# ---------------------------------------------------------------------------------------------------------
# loading and ids


def test_sst2_local_files_ids_and_stripping(tiny_data_dir: Path) -> None:
    task = SST2Task()
    train = task.load("train", tiny_data_dir)
    assert len(train) == 60 and len(task.load("validation", tiny_data_dir)) == 20
    assert [ex.id for ex in train] == [f"train-{i}" for i in range(60)]
    assert [ex.id for ex in task.load("train", tiny_data_dir)] == [ex.id for ex in train]  # stable on reload
    lines = (tiny_data_dir / "sst2" / "train.tsv").read_text().splitlines()[1:]
    for ex, line in zip(train, lines, strict=True):
        text, label = line.split("\t")
        assert ex.fields == {"sentence": text.strip()} and ex.label == int(label)
        assert ex.answers == () and ex.answer_start is None
    assert any(line.split("\t")[0].endswith(" ") for line in lines)  # the fixture has trailing spaces
    assert train[5].fields["sentence"].endswith('with "quotes')  # QUOTE_NONE keeps quote characters
    with pytest.raises(ValueError, match="unknown split"):
        task.load("test", tiny_data_dir)


def test_squad_local_files(tiny_data_dir: Path) -> None:
    task = SquadTask()
    dev = task.load("dev", tiny_data_dir)
    assert [ex.id for ex in task.load("validation", tiny_data_dir)] == [ex.id for ex in dev]  # alias
    assert len(dev) == 20 and len({ex.id for ex in dev}) == 20
    ex = dev[0]
    assert set(ex.fields) == {"context", "question", "title"}
    assert len(ex.answers) == 3  # every gold answer is kept for scoring
    assert ex.fields["context"][ex.answer_start:].startswith(ex.answers[0])
    assert task.target_text(ex) == " " + ex.answers[0]
    assert task.answer_target("  Paris \n") == " Paris"


def test_env_var_points_at_data(tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDLAB_DATA_DIR", str(tiny_data_dir))
    assert len(SST2Task().load("validation")) == 20


def test_missing_local_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"sst2/validation\.tsv"):
        SST2Task().load("validation", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"squad/dev-v1\.1\.json"):
        SquadTask().load("dev", tmp_path)


def test_real_data_ids(real_data_dir: Path) -> None:
    sst2 = SST2Task()
    val = sst2.load("validation", real_data_dir)
    assert len(val) == 872
    assert val[0].id == "validation-0"
    assert val[0].fields["sentence"].startswith("it 's a charming and often affecting journey")
    assert val[0].label == 1
    assert not any(ex.fields["sentence"] != ex.fields["sentence"].strip() for ex in val)
    assert [ex.id for ex in sst2.read_references(real_data_dir / "sst2" / "validation.tsv")] == \
        [ex.id for ex in val]

    squad = SquadTask()
    dev = squad.load("dev", real_data_dir)
    assert len(dev) == 10570
    # The first question of the official file (read with plain json, not with the loader under test).
    raw = json.loads((real_data_dir / "squad" / "dev-v1.1.json").read_text())
    first = raw["data"][0]["paragraphs"][0]["qas"][0]
    assert first["id"] == "56be4db0acb8001400a502ec"
    assert dev[0].id == first["id"] and dev[0].answers == ("Denver Broncos",) * 3
    assert [ex.id for ex in squad.load("dev", real_data_dir)] == [ex.id for ex in dev]


class _FakeLoad:
    def __init__(self, data: dict) -> None:
        self.data = data
        self.calls: list[tuple[str, str]] = []

    def __call__(self, path: str, split: str, **kwargs):
        import datasets

        self.calls.append((path, split))
        return datasets.Dataset.from_dict(self.data)


def test_hub_fallback_sst2(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    fake = _FakeLoad({"idx": [0, 1, 2], "sentence": ["good film ", "bad film", "fine"], "label": [1, 0, 1]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    examples = SST2Task().load("validation")
    assert fake.calls == [("stanfordnlp/sst2", "validation")]
    assert [ex.id for ex in examples] == ["validation-0", "validation-1", "validation-2"]
    assert examples[0].fields == {"sentence": "good film"} and examples[1].label == 0


def test_hub_fallback_squad(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    fake = _FakeLoad({
        "id": ["a1", "a2"],
        "title": ["T", "T"],
        "context": ["Paris is in France.", "Rome is in Italy."],
        "question": ["Where is Paris?", "Where is Rome?"],
        "answers": [{"text": ["France", "in France"], "answer_start": [12, 9]},
                    {"text": ["Italy"], "answer_start": [11]}],
    })
    monkeypatch.setattr(datasets, "load_dataset", fake)
    examples = SquadTask().load("dev")
    assert fake.calls == [("rajpurkar/squad", "validation")]
    assert [ex.id for ex in examples] == ["a1", "a2"]
    assert examples[0].answers == ("France", "in France") and examples[0].answer_start == 12
    assert examples[1].fields == {"context": "Rome is in Italy.", "question": "Where is Rome?", "title": "T"}


def test_hub_failure_explains_local_data(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataUnavailableError, match="KDLAB_DATA_DIR") as info:
        SquadTask().load("train")
    assert "--data-dir" in str(info.value) and "squad/dev-v1.1.json" in str(info.value)
    assert "no network" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# subsets


def _examples(n: int) -> list[Example]:
    return [Example(f"e{i}", {"sentence": str(i)}, label=i % 2) for i in range(n)]


def test_subset_deterministic_and_ordered() -> None:
    data = _examples(100)
    a = subset(data, 20, seed=1)
    assert [e.id for e in a] == [e.id for e in subset(data, 20, seed=1)]
    assert [e.id for e in a] != [e.id for e in subset(data, 20, seed=2)]
    positions = [data.index(e) for e in a]
    assert positions == sorted(positions) and len(set(positions)) == 20
    assert {e.id for e in a} <= {e.id for e in subset(data, 50, seed=1)}  # larger subsets nest
    assert subset(data, None, seed=1) == data
    with pytest.raises(ValueError, match=r"101.*only 100"):
        subset(data, 101, seed=1)


def test_split_train_selection_disjoint_and_stable() -> None:
    data = _examples(200)
    train, sel = split_train_selection(data, 50, 30, seed=7)
    assert len(train) == 50 and len(sel) == 30
    assert not {e.id for e in train} & {e.id for e in sel}
    for part in (train, sel):
        pos = [data.index(e) for e in part]
        assert pos == sorted(pos)
    train2, sel2 = split_train_selection(data, 120, 30, seed=7)
    assert sel2 == sel  # the selection set does not depend on train_size
    assert {e.id for e in train} <= {e.id for e in train2}
    rest, sel3 = split_train_selection(data, None, 30, seed=7)
    assert sel3 == sel and len(rest) == 170
    assert {e.id for e in rest} | {e.id for e in sel} == {e.id for e in data}  # all the rest, disjoint
    _, other = split_train_selection(data, 50, 30, seed=8)
    assert other != sel
    with pytest.raises(ValueError, match="200"):
        split_train_selection(data, 180, 30, seed=7)


# ---------------------------------------------------------------------------------------------------------
# prompt fitting


def test_squad_training_windows_keep_the_answer(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = SquadTask()  # max_length 384; the long contexts are ~1500 tokens
    train = task.load("train", tiny_data_dir)
    kept, counts = task.build_prompts(train, tiny_tokenizer, training=True)
    assert counts == {"truncated": 2, "skipped": 1}  # long-middle, long-end cut; long-wrong skipped
    kept_ids = [ex.id for ex, _ in kept]
    assert "train-long-wrong" not in kept_ids
    assert kept_ids == [ex.id for ex in train if ex.id != "train-long-wrong"]  # input order
    by_id = dict((ex.id, (ex, p)) for ex, p in kept)
    for qid, answer in (("train-long-middle", "seven hundred"), ("train-long-end", "nine hundred")):
        ex, prompt = by_id[qid]
        assert f"The key was {answer}." in prompt  # the window holds the answer and its neighbourhood
        assert len(prompt) < len(task.format_prompt(ex))
        assert prompt.endswith(f"Question: {ex.fields['question']}\nAnswer:")
    for ex, prompt in kept:
        enc = encode(task, ex, prompt, tiny_tokenizer)
        assert enc is not None and len(enc.input_ids) <= task.settings.max_length


def test_squad_training_skips_an_answer_that_cannot_fit(tiny_tokenizer) -> None:
    task = SquadTask(SquadSettings(max_length=40, max_new_tokens=8))
    answer = "the river city bridge king queen castle garden music painter village mountain forest lake"
    context = "The forest. " * 60 + f"It was {answer}. " + "The lake. " * 60
    ex = Example("big", {"context": context, "question": "What?", "title": ""}, (answer,),
                 answer_start=context.index(answer))
    kept, counts = task.build_prompts([ex], tiny_tokenizer, training=True)
    assert kept == [] and counts == {"truncated": 0, "skipped": 1}
    none_start = Example("ns", ex.fields, (answer,), answer_start=None)
    assert task.build_prompts([none_start], tiny_tokenizer, training=True)[1]["skipped"] == 1


def test_squad_eval_truncation_keeps_the_head(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = SquadTask()
    dev = task.load("dev", tiny_data_dir)
    kept, counts = task.build_prompts(dev, tiny_tokenizer, training=False)
    assert counts == {"truncated": 3, "skipped": 0}  # every question is evaluated
    assert [ex.id for ex, _ in kept] == [ex.id for ex in dev]
    for ex, prompt in kept:
        n = len(encode_prompt(prompt, tiny_tokenizer))
        assert n + task.settings.max_new_tokens <= task.settings.max_length
        context = prompt.split("\nQuestion:")[0].removeprefix("Context: ")
        assert ex.fields["context"].startswith(context)
    cut = next(p for ex, p in kept if ex.id == "dev-long-end")
    assert "nine hundred" not in cut  # evaluation never windows onto the answer
    # Nearly the whole budget is used: the head is cut at a token boundary close to the limit.
    budget = task.settings.max_length - task.settings.max_new_tokens
    assert len(encode_prompt(cut, tiny_tokenizer)) > budget - 8


class _OvershootingSquad(SquadTask):
    """Cuts 5 tokens too many on the first try, as tokenizers whose pieces do not add up can."""

    calls = 0

    def cut_field(self, ex, text, offsets, width, *, training):
        type(self).calls += 1
        return super().cut_field(ex, text, offsets, width + (5 if self.calls == 1 else 0), training=training)


def test_prompt_fitting_recuts_an_overshoot(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = _OvershootingSquad()
    ex = next(e for e in task.load("dev", tiny_data_dir) if e.id == "dev-long-middle")
    kept, counts = task.build_prompts([ex], tiny_tokenizer, training=False)
    assert counts == {"truncated": 1, "skipped": 0} and task.calls == 2
    budget = task.settings.max_length - task.settings.max_new_tokens
    assert len(encode_prompt(kept[0][1], tiny_tokenizer)) <= budget


def test_sst2_long_sentences(tiny_data_dir: Path, tiny_tokenizer) -> None:
    task = SST2Task(SST2Settings(max_length=16))
    val = task.load("validation", tiny_data_dir)
    kept, counts = task.build_prompts(val, tiny_tokenizer, training=False)
    assert len(kept) == 20 and counts["truncated"] > 0 and counts["skipped"] == 0
    assert all(len(encode_prompt(p, tiny_tokenizer)) <= 15 for _, p in kept)  # room for one label token
    kept_t, counts_t = task.build_prompts(val, tiny_tokenizer, training=True)
    assert counts_t["truncated"] == 0 and counts_t["skipped"] == 20 - len(kept_t) > 0
    short = SST2Task().build_prompts(val, tiny_tokenizer, training=True)
    assert short[1] == {"truncated": 0, "skipped": 0} and len(short[0]) == 20


def test_labels_are_scored_whole(tiny_tokenizer) -> None:
    """Each label's whole continuation is a choice, so labels that share their first token are fine; two
    labels that are the same tokens are refused, naming the setting."""
    words = (" negative", " positive")
    assert SST2Task().choice_ids(tiny_tokenizer) == [tiny_tokenizer(w, add_special_tokens=False).input_ids
                                                      for w in words]
    clash = [" positive", " positively"]
    first = [tiny_tokenizer(w, add_special_tokens=False).input_ids[0] for w in clash]
    assert first[0] == first[1]  # precondition: the two words really share their first token
    task = SST2Task(SST2Settings(label_words=clash))
    task.check(tiny_tokenizer)
    assert task.eval_room(tiny_tokenizer) == max(len(ids) for ids in task.choice_ids(tiny_tokenizer))
    with pytest.raises(ValueError, match=r"tasks\.sst2\.label_words: ' positive' and ' positive'"):
        SST2Task(SST2Settings(label_words=[" positive", " positive"])).check(tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------------
# scoring and prediction files


def test_sst2_predictions_round_trip_and_score(tiny_data_dir: Path, tmp_path: Path) -> None:
    task = SST2Task()
    val = task.load("validation", tiny_data_dir)
    preds = {ex.id: ex.label for ex in val}
    preds[val[0].id] = 1 - val[0].label
    path = tmp_path / "out" / "predictions.jsonl"
    task.write_predictions(preds, path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"id": val[0].id, "label": preds[val[0].id]}
    assert task.read_predictions(path) == preds
    # One of 10 negatives called positive: F1 of the negatives 18/19, of the positives 20/21.
    expected = {"accuracy": 95.0, "macro_f1": pytest.approx(100 * (18 / 19 + 20 / 21) / 2)}
    assert val[0].label == 0 and sum(ex.label for ex in val) == 10
    assert task.score(task.read_predictions(path), val) == expected
    refs = task.read_references(tiny_data_dir / "sst2" / "validation.tsv")
    assert task.score(preds, refs) == expected
    path.write_text('{"id": "x", "label": 2}\n')
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        task.read_predictions(path)


def test_squad_predictions_round_trip_and_score(tiny_data_dir: Path, tmp_path: Path) -> None:
    task = SquadTask()
    dev = task.load("dev", tiny_data_dir)
    preds = {ex.id: ex.answers[1] for ex in dev}  # another gold answer: still exact
    preds[dev[0].id] = "Zürich — «naïve»"  # non-ASCII survives the round trip
    path = tmp_path / "predictions.json"
    task.write_predictions(preds, path)
    assert json.loads(path.read_text()) == preds  # one JSON object, the official format
    assert task.read_predictions(path) == preds
    scores = task.score(preds, task.read_references(tiny_data_dir / "squad" / "dev-v1.1.json"))
    assert scores["exact_match"] == pytest.approx(95.0) and scores["f1"] == pytest.approx(95.0)
    path.write_text('["not", "an", "object"]')
    with pytest.raises(ValueError, match="official SQuAD predictions format"):
        task.read_predictions(path)
