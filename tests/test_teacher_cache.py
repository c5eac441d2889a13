"""Tests for kdlab.teacher_cache: round trips, compact dtypes, atomicity, fingerprints, mmap/pickling."""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kdlab.files import hash_file
from kdlab.hashing import canonical_hash
from kdlab.teacher_cache import (
    CacheError,
    CacheExistsError,
    CacheMismatchError,
    TeacherCache,
    TeacherCacheWriter,
    hash_directory,
)

INPUTS = {
    "teacher": {"name": "tiny-teacher", "revision": "abc"},
    "task": "gsm8k",
    "split": "train",
    "max_length": 512,
    "k": 8,
}


def make_example(rng: np.random.Generator, i: int, k: int, vocab: int, layers, d: int) -> dict:
    n = int(rng.integers(0, 13))  # includes empty answers (n = 0)
    m = int(rng.integers(1, 9))
    logits = rng.normal(size=(n, vocab if vocab <= 512 else 512)).astype(np.float32)
    lp_full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-lp_full, axis=-1)[:, :k]
    # Spread indices over the whole vocab so a narrow dtype would be caught.
    idx = (order * (vocab // lp_full.shape[1])).astype(np.int64)
    lp = np.take_along_axis(lp_full, order, axis=-1)
    hidden = {layer: rng.normal(scale=3.0, size=(m, d)).astype(np.float32) for layer in layers}
    return {"id": f"ex-{i}", "answer": f"answer {i}: {'x' * i} ünï", "idx": idx, "lp": lp, "hidden": hidden}


def write_cache(path: Path, examples, *, k=8, vocab=50000, layers=(3, 7), d=16, shard_rows=40, **kw) -> None:
    with TeacherCacheWriter(
        path,
        fingerprint_inputs=kw.pop("inputs", INPUTS),
        vocab_size=vocab,
        top_k=k,
        hidden_layers=layers,
        hidden_size=d,
        store_answers=True,
        shard_rows=shard_rows,
        **kw,
    ) as w:
        for j, ex in enumerate(examples):
            # Alternate numpy inputs and torch tensors (bf16 hidden included) to cover both paths.
            if j % 2:
                hidden = {layer: torch.from_numpy(h).to(torch.bfloat16) for layer, h in ex["hidden"].items()}
                w.add(
                    ex["id"],
                    answer=ex["answer"],
                    topk_indices=torch.from_numpy(ex["idx"]),
                    topk_logprobs=torch.from_numpy(ex["lp"]),
                    hidden=hidden,
                )
            else:
                w.add(
                    ex["id"],
                    answer=ex["answer"],
                    topk_indices=ex["idx"],
                    topk_logprobs=ex["lp"],
                    hidden=ex["hidden"],
                )


def expected_hidden(ex: dict, j: int, layer: int, hidden_dtype: str) -> np.ndarray:
    h = torch.from_numpy(ex["hidden"][layer])
    if j % 2:
        h = h.to(torch.bfloat16).float()  # what the writer was actually given
    h = h.to(torch.bfloat16) if hidden_dtype == "bfloat16" else h.to(torch.float16)
    return h.float().numpy()


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    return [make_example(rng, i, 8, 50000, (3, 7), 16) for i in range(50)]


@pytest.mark.parametrize("hidden_dtype", ["float16", "bfloat16"])
def test_round_trip_shuffled_across_shards(tmp_path, examples, hidden_dtype):
    path = tmp_path / "cache"
    write_cache(path, examples, hidden_dtype=hidden_dtype)
    cache = TeacherCache.open(path, expected_inputs=INPUTS)

    assert len(cache) == 50
    assert cache.ids() == [ex["id"] for ex in examples]
    assert set(cache.fields) == {"answer", "topk", "hidden"}
    m = cache.manifest
    assert len(m["shards"]) >= 4, "small shard_rows must rotate shards"
    assert m["num_tokens"] == sum(ex["idx"].shape[0] for ex in examples)
    assert m["hidden_dtype"] == hidden_dtype and m["hidden_layers"] == [3, 7]

    order = list(range(50))
    random.Random(1).shuffle(order)
    for j in order:
        ex = examples[j]
        assert ex["id"] in cache
        idx, lp = cache.batch_topk([ex["id"]])
        assert idx.dtype == torch.int64 and lp.dtype == torch.float32
        np.testing.assert_array_equal(idx.numpy(), ex["idx"])
        np.testing.assert_array_equal(lp.numpy(), ex["lp"].astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(lp.numpy(), ex["lp"], atol=2e-2, rtol=1e-3)
        assert cache.answer(ex["id"]) == ex["answer"]
        hid = cache.batch_hidden([ex["id"]])
        assert sorted(hid) == [3, 7]
        for layer in (3, 7):
            assert hid[layer].dtype == torch.float32
            np.testing.assert_array_equal(hid[layer].numpy(), expected_hidden(ex, j, layer, hidden_dtype))
        assert cache.batch_topk([ex["id"]])[0].shape[0] == ex["idx"].shape[0]

    # Batches follow the order of the ids given, not the on-disk order.
    batch_ids = [examples[j]["id"] for j in order[:20]]
    bidx, blp = cache.batch_topk(batch_ids)
    np.testing.assert_array_equal(bidx.numpy(), np.concatenate([examples[j]["idx"] for j in order[:20]]))
    want_lp = np.concatenate([examples[j]["lp"] for j in order[:20]]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(blp.numpy(), want_lp)
    bh = cache.batch_hidden(batch_ids)
    for layer in (3, 7):
        want = np.concatenate([expected_hidden(examples[j], j, layer, hidden_dtype) for j in order[:20]])
        np.testing.assert_array_equal(bh[layer].numpy(), want)

    empty_idx, empty_lp = cache.batch_topk([])
    assert tuple(empty_idx.shape) == (0, 8) and tuple(empty_lp.shape) == (0, 8)


def test_index_dtype_and_bytes_per_token(tmp_path):
    rng = np.random.default_rng(1)
    for vocab, want in ((50000, np.uint16), (65536, np.uint16), (70000, np.uint32)):
        exs = [make_example(rng, i, 4, vocab, (), 0) for i in range(5)]
        exs[0]["idx"][0, 0] = vocab - 1  # the largest index must survive
        exs[0]["lp"][0, 0] = -0.01
        path = tmp_path / f"v{vocab}"
        with TeacherCacheWriter(path, fingerprint_inputs={"v": vocab}, vocab_size=vocab, top_k=4) as w:
            for ex in exs:
                w.add(ex["id"], topk_indices=ex["idx"], topk_logprobs=ex["lp"])
        cache = TeacherCache.open(path)
        assert cache.manifest["index_dtype"] == np.dtype(want).name
        assert cache._array(0, "topk_idx").dtype == want
        assert cache.fields == ("topk",)
        for ex in exs:
            np.testing.assert_array_equal(cache.batch_topk([ex["id"]])[0].numpy(), ex["idx"])
        with pytest.raises(CacheError, match="no 'hidden' field"):
            cache.batch_hidden([exs[0]["id"]])

    # Storage target: <= 128 bytes per answer token at k=32 with a 49152-token vocab.
    path = tmp_path / "k32"
    n_tokens = 0
    with TeacherCacheWriter(
        path, fingerprint_inputs={"k": 32}, vocab_size=49152, top_k=32, shard_rows=100
    ) as w:
        for i in range(20):
            n = int(rng.integers(1, 30))
            n_tokens += n
            idx = rng.integers(0, 49152, size=(n, 32))
            lp = -rng.random((n, 32)).astype(np.float32) * 10
            w.add(i, topk_indices=idx, topk_logprobs=lp)
    cache = TeacherCache.open(path)
    assert cache.manifest["num_tokens"] == n_tokens
    assert cache.bytes_per_token() <= 128
    assert cache.bytes_per_token() > 0
    assert 7 in cache and "7" not in cache  # int ids keep their type


def test_incomplete_cache_cannot_be_opened(tmp_path, examples):
    # Writer never closed: shards exist (small shard_rows) but no manifest.
    path = tmp_path / "unclosed"
    w = TeacherCacheWriter(path, fingerprint_inputs=INPUTS, vocab_size=50000, top_k=8, shard_rows=5)
    for ex in examples[:20]:
        w.add(ex["id"], topk_indices=ex["idx"], topk_logprobs=ex["lp"])
    assert any(path.glob("shard-*.npy"))
    with pytest.raises(CacheError, match="incomplete or absent"):
        TeacherCache.open(path)

    # Exception inside the with-block: nothing is committed.
    path2 = tmp_path / "raised"
    writer = TeacherCacheWriter(path2, fingerprint_inputs=INPUTS, vocab_size=50000, top_k=8, shard_rows=5)
    with pytest.raises(RuntimeError, match="boom"), writer as w2:
        for ex in examples[:20]:
            w2.add(ex["id"], topk_indices=ex["idx"], topk_logprobs=ex["lp"])
        raise RuntimeError("boom")
    with pytest.raises(CacheError, match="incomplete or absent"):
        TeacherCache.open(path2)

    with pytest.raises(CacheError, match="incomplete or absent"):
        TeacherCache.open(tmp_path / "never-built")

    # A leftover unfinished build does not block a fresh one.
    w.abort()
    write_cache(path, examples[:3])
    assert len(TeacherCache.open(path)) == 3


def test_overwrite_is_atomic(tmp_path, examples):
    path = tmp_path / "cache"
    write_cache(path, examples[:10])
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    with pytest.raises(CacheExistsError, match="overwrite=True"):
        write_cache(path, examples[10:20])

    # Overwrite build that dies midway (after several shards were flushed) leaves the old cache as is.
    writer = TeacherCacheWriter(
        path, fingerprint_inputs={"new": 1}, vocab_size=50000, top_k=8, shard_rows=5, overwrite=True
    )
    with pytest.raises(RuntimeError, match="midway"), writer as w:
        for ex in examples[10:40]:
            w.add(ex["id"], topk_indices=ex["idx"], topk_logprobs=ex["lp"])
        assert any(writer._build_dir.glob("shard-*.npy")), "shards should have been flushed already"
        raise RuntimeError("midway")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "temp build dir left behind"
    cache = TeacherCache.open(path, expected_inputs=INPUTS)
    assert cache.ids() == [ex["id"] for ex in examples[:10]]
    old_reader_idx = cache.batch_topk([examples[0]["id"]])[0]

    # A successful overwrite swaps the new cache in.
    write_cache(path, examples[20:25], overwrite=True, inputs={"new": 2})
    new = TeacherCache.open(path, expected_inputs={"new": 2})
    assert new.ids() == [ex["id"] for ex in examples[20:25]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    # A reader opened before the swap keeps a consistent view of the old data.
    np.testing.assert_array_equal(cache.batch_topk([examples[0]["id"]])[0].numpy(), old_reader_idx.numpy())


def test_fingerprint_mismatch_and_restart(tmp_path, examples):
    path = tmp_path / "cache"
    write_cache(path, examples[:5])
    fp = canonical_hash(INPUTS)
    assert len(fp) == 64 and int(fp, 16) >= 0
    # Canonical: key order and tuple-vs-list do not matter; values do.
    assert canonical_hash(dict(reversed(list(INPUTS.items())))) == fp
    assert canonical_hash({"a": (1, 2)}) == canonical_hash({"a": [1, 2]})
    assert canonical_hash({**INPUTS, "max_length": 1024}) != fp

    changed = {**INPUTS, "max_length": 1024, "teacher": {"name": "tiny-teacher", "revision": "def"}}
    with pytest.raises(CacheMismatchError) as err:
        TeacherCache.open(path, expected_inputs=changed)
    msg = str(err.value)
    assert "max_length" in msg and "512" in msg and "1024" in msg
    assert "teacher.revision" in msg and '"abc"' in msg and '"def"' in msg
    assert "task" not in {d[0] for d in err.value.differences}
    assert "kdlab cache --out" in msg and "--rebuild" in msg
    assert isinstance(err.value, CacheError)

    with pytest.raises(CacheMismatchError, match="fingerprint"):
        TeacherCache.open(path, expected_fingerprint=canonical_hash(changed))

    # Matching fingerprint accepted; a fresh object (as after a restart) sees the same data.
    first = TeacherCache.open(path, expected_fingerprint=fp)
    want = first.batch_topk(first.ids())
    del first
    again = TeacherCache.open(str(path), expected_inputs=dict(INPUTS))
    assert again.fingerprint == fp
    got = again.batch_topk(again.ids())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class _CacheDataset(Dataset):
    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.ids = cache.ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        idx, lp = self.cache.batch_topk([self.ids[i]])
        return self.ids[i], idx.sum().item(), float(lp.sum())


def test_memmap_pickle_and_workers(tmp_path, examples):
    path = tmp_path / "cache"
    write_cache(path, examples)
    cache = TeacherCache.open(path)
    cache.batch_topk([examples[0]["id"]])
    cache.batch_hidden([examples[0]["id"]])
    assert cache._mmaps, "arrays should be mapped lazily on first access"
    for arr in cache._mmaps.values():
        assert isinstance(arr, np.memmap)
    assert isinstance(cache._array(0, "hidden-L7"), np.memmap)

    blob = pickle.dumps(cache)
    assert len(blob) < 2000, "pickle must carry the path, not the data"
    clone = pickle.loads(blob)
    assert clone.ids() == cache.ids()
    assert clone._mmaps == {}
    for ex in examples[:5]:
        assert torch.equal(clone.batch_topk([ex["id"]])[0], cache.batch_topk([ex["id"]])[0])
        assert clone.answer(ex["id"]) == ex["answer"]

    # Forked DataLoader workers read through the (re-mapped) cache.
    loader = DataLoader(_CacheDataset(cache), batch_size=None, num_workers=2)
    got = {eid: (s, f) for eid, s, f in loader}
    for ex in examples:
        idx, lp = cache.batch_topk([ex["id"]])
        assert got[ex["id"]][0] == idx.sum().item()
        assert got[ex["id"]][1] == pytest.approx(float(lp.sum()))


def test_bad_inputs(tmp_path, examples):
    ex = next(e for e in examples if e["idx"].shape[0] >= 3)  # non-empty, so value checks apply
    path = tmp_path / "cache"
    w = TeacherCacheWriter(
        path, fingerprint_inputs=INPUTS, vocab_size=50000, top_k=8, hidden_layers=(3, 7), hidden_size=16
    )
    good = {"topk_indices": ex["idx"], "topk_logprobs": ex["lp"], "hidden": ex["hidden"]}
    with pytest.raises(ValueError, match=r"shape \[n, k=8\]"):
        w.add("a", topk_indices=ex["idx"][:, :5], topk_logprobs=ex["lp"][:, :5], hidden=ex["hidden"])
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\] not declared"):
        w.add(
            "a", topk_indices=ex["idx"], topk_logprobs=ex["lp"], hidden={**ex["hidden"], 5: ex["hidden"][3]}
        )
    with pytest.raises(ValueError, match=r"missing declared layer\(s\) \[7\]"):
        w.add("a", topk_indices=ex["idx"], topk_logprobs=ex["lp"], hidden={3: ex["hidden"][3]})
    with pytest.raises(ValueError, match="hidden_size=16"):
        w.add(
            "a",
            topk_indices=ex["idx"],
            topk_logprobs=ex["lp"],
            hidden={3: np.zeros((2, 8)), 7: np.zeros((2, 8))},
        )
    with pytest.raises(ValueError, match="out of range"):
        w.add("a", topk_indices=ex["idx"] + 50000, topk_logprobs=ex["lp"], hidden=ex["hidden"])
    with pytest.raises(ValueError, match="raw logits"):
        w.add("a", topk_indices=ex["idx"], topk_logprobs=ex["lp"] + 5.0, hidden=ex["hidden"])
    with pytest.raises(ValueError, match="topk_indices and topk_logprobs are required"):
        w.add("a", hidden=ex["hidden"])
    with pytest.raises(ValueError, match="bfloat16"):
        w.add("a", **{**good, "hidden": {3: ex["hidden"][3] * 1e5, 7: ex["hidden"][7]}})
    w.add("a", **good)
    with pytest.raises(ValueError, match="duplicate example id 'a'"):
        w.add("a", **good)
    w.close()

    # Rejected calls left no trace: the cache holds exactly the one good example.
    cache = TeacherCache.open(path)
    assert cache.ids() == ["a"]
    with pytest.raises(KeyError, match="'nope'.*" + str(path).replace("\\", "\\\\")):
        cache.batch_topk(["nope"])
    with pytest.raises(KeyError, match="nope"):
        cache.batch_hidden(["nope"])
    with pytest.raises(CacheError, match="no 'answer' field"):
        cache.answer("a")

    with pytest.raises(ValueError, match="hidden_dtype"):
        TeacherCacheWriter(tmp_path / "x", fingerprint_inputs={}, vocab_size=10, top_k=2, hidden_dtype="fp8")
    with pytest.raises(ValueError, match="duplicates"):
        TeacherCacheWriter(
            tmp_path / "y", fingerprint_inputs={}, vocab_size=10, top_k=2, hidden_layers=(1, 1)
        )


def test_hash_helpers(tmp_path):
    weights = tmp_path / "model"
    (weights / "sub").mkdir(parents=True)
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several read chunks
    (weights / "model.safetensors").write_bytes(data)
    (weights / "config.json").write_text('{"a": 1}')
    (weights / "sub" / "adapter.bin").write_bytes(b"adapter")
    (weights / "README.md").write_text("ignored")
    assert hash_file(weights / "model.safetensors") == hashlib.sha256(data).hexdigest()
    assert hash_file(weights / "model.safetensors", chunk_size=4096) == hashlib.sha256(data).hexdigest()

    h = hash_directory(weights)
    (weights / "README.md").write_text("changed, but not a matched pattern")
    assert hash_directory(weights) == h
    (weights / "sub" / "adapter.bin").write_bytes(b"adapter v2")
    assert hash_directory(weights) != h
    assert hash_directory(weights, patterns=("*.json",)) != hash_directory(weights)
    with pytest.raises(ValueError, match="no file"):
        hash_directory(weights, patterns=("*.gguf",))


# --------------------------------------------------------------------------------------------------
# Exact top-k tails per temperature (KD1) and the empty-answer policy (KD2)


def _tails(lp_full: np.ndarray, order: np.ndarray, temps) -> dict[float, np.ndarray]:
    """float64 log(sum over the non-listed tokens of p_j^(1/T)), written independently of the cache code."""
    out = {}
    for temp in temps:
        w = np.exp(lp_full.astype(np.float64) / temp)
        np.put_along_axis(w, order, 0.0, axis=-1)
        with np.errstate(divide="ignore"):
            out[temp] = np.log(w.sum(-1)).astype(np.float32)
    return out


def test_tail_round_trip_and_missing_temperature(tmp_path):
    rng = np.random.default_rng(3)
    vocab, k, temps = 300, 8, (2.0, 0.5, 1.0)
    path = tmp_path / "cache"
    want = {}
    with TeacherCacheWriter(path, fingerprint_inputs={"t": 1}, vocab_size=vocab, top_k=k, temperatures=temps,
                            shard_rows=20) as w:
        for i in range(12):
            n = int(rng.integers(0, 7))
            logits = rng.normal(scale=3.0, size=(n, vocab)).astype(np.float32)
            lp_full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            order = np.argsort(-lp_full, axis=-1)[:, :k]
            tails = _tails(lp_full, order, temps)
            want[f"e{i}"] = tails
            # Tails may come keyed by int or float temperatures, as torch tensors or numpy arrays.
            given = {1 if t == 1.0 else t: (torch.from_numpy(v) if i % 2 else v) for t, v in tails.items()}
            w.add(f"e{i}", topk_indices=order, topk_logprobs=np.take_along_axis(lp_full, order, -1),
                  topk_tail=given)
    cache = TeacherCache.open(path)
    assert cache.temperatures == (0.5, 1.0, 2.0)
    assert len(cache.manifest["shards"]) >= 2
    assert sorted(p.name for p in path.glob("shard-00000.tail-*.npy")) == [
        "shard-00000.tail-T0.5.npy", "shard-00000.tail-T1.npy", "shard-00000.tail-T2.npy"]
    ids = [f"e{i}" for i in (7, 0, 11, 3, 5)]
    for temp in temps:
        idx, lp, tail = cache.batch_topk_tail(ids, temp)
        b_idx, b_lp = cache.batch_topk(ids)
        assert torch.equal(idx, b_idx) and torch.equal(lp, b_lp)
        assert tail.dtype == torch.float32 and tail.shape == (idx.shape[0],)
        np.testing.assert_array_equal(tail.numpy(), np.concatenate([want[i][temp] for i in ids]))
    assert cache.batch_topk_tail([], 2.0)[2].shape == (0,)

    with pytest.raises(CacheError) as err:
        cache.batch_topk_tail(ids, 4.0)
    msg = str(err.value)
    assert "T=4.0" in msg and "[0.5, 1.0, 2.0]" in msg and "kdlab cache --out" in msg

    parts = cache.bytes_per_token_parts()
    assert parts == {"topk": pytest.approx(2 * k + 2 * k), "tail-T0.5": 4.0, "tail-T1": 4.0, "tail-T2": 4.0}
    assert cache.bytes_per_token() == pytest.approx(4 * k + 12)

    # A cache built without temperatures holds no tail at all.
    plain = tmp_path / "plain"
    with TeacherCacheWriter(plain, fingerprint_inputs={"t": 2}, vocab_size=vocab, top_k=k) as w:
        w.add("a", topk_indices=np.arange(k)[None], topk_logprobs=-np.ones((1, k)))
    with pytest.raises(CacheError, match=r"T=2\.0 \(it holds T in \[\]\)"):
        TeacherCache.open(plain).batch_topk_tail(["a"], 2)


def test_tail_writer_checks(tmp_path):
    idx, lp = np.arange(4)[None].repeat(2, 0), -np.ones((2, 4))
    w = TeacherCacheWriter(tmp_path / "c", fingerprint_inputs={}, vocab_size=10, top_k=4, temperatures=[2.0])
    with pytest.raises(ValueError, match="topk_tail must be a dict"):
        w.add("a", topk_indices=idx, topk_logprobs=lp)
    with pytest.raises(ValueError, match="temperatures"):
        w.add("a", topk_indices=idx, topk_logprobs=lp, topk_tail={1.0: np.zeros(2)})
    with pytest.raises(ValueError, match=r"shape \[n=2\]"):
        w.add("a", topk_indices=idx, topk_logprobs=lp, topk_tail={2.0: np.zeros(3)})
    with pytest.raises(ValueError, match="NaN"):
        w.add("a", topk_indices=idx, topk_logprobs=lp, topk_tail={2.0: np.array([0.0, np.nan])})
    # -inf is a legal tail: no possible token outside the top-k.
    w.add("a", topk_indices=idx, topk_logprobs=lp, topk_tail={2.0: np.array([-1.0, -np.inf])})
    w.close()
    assert TeacherCache.open(tmp_path / "c").batch_topk_tail(["a"], 2.0)[2].tolist() == [-1.0, float("-inf")]
    with pytest.raises(ValueError, match="duplicates"):
        TeacherCacheWriter(tmp_path / "d", fingerprint_inputs={}, vocab_size=10, top_k=4,
                           temperatures=[2, 2.0])
    with pytest.raises(ValueError, match="top_k is None"):
        TeacherCacheWriter(tmp_path / "e", fingerprint_inputs={}, vocab_size=10, top_k=None,
                           store_answers=True, temperatures=[2.0])
    with pytest.raises(ValueError, match="> 0"):
        TeacherCacheWriter(tmp_path / "f", fingerprint_inputs={}, vocab_size=10, top_k=4, temperatures=[0.0])


def test_build_teacher_cache_stores_exact_fp32_tails(tmp_path, tiny_tokenizer):
    from kdlab.scored import forward_scored
    from kdlab.stages.cache import build_teacher_cache
    from kdlab.tasks import SST2Task
    from kdlab.tasks.base import Encoded, Example, collate
    from kdlab.tiny import build_tiny_llama

    vocab = len(tiny_tokenizer)
    teacher = build_tiny_llama(tiny_tokenizer, num_layers=2, seed=0).eval()
    rng = random.Random(0)
    examples = [Example(f"x{i}", {"sentence": "s"}, label=i % 2) for i in range(5)]
    encoded = {}
    for i, ex in enumerate(examples):
        prompt = [rng.randrange(4, vocab) for _ in range(3 + i)]
        answer = [rng.randrange(4, vocab) for _ in range(1 + i % 3)] + [2]
        encoded[ex.id] = Encoded(ex.id, prompt + answer, [-100] * len(prompt) + answer)
    cache = build_teacher_cache(
        tmp_path / "cache", task=SST2Task(), teacher=teacher, tokenizer=tiny_tokenizer, examples=examples,
        encoded=encoded, fingerprint_inputs={"t": 1}, top_k=8, hidden_layers=[], answers=False, batch_size=2,
        temperatures=[2.0, 0.5, 1.0],
    )
    assert cache.temperatures == (0.5, 1.0, 2.0)
    ids = [ex.id for ex in examples]
    batch = collate([encoded[i] for i in ids], tiny_tokenizer.pad_token_id, padding_side="left")
    batch.pop("example_ids")
    with torch.no_grad():
        logp = forward_scored(teacher, batch, vocab_size=vocab).logits.double().log_softmax(-1)
    for temp in (0.5, 1.0, 2.0):
        idx, lp, tail = cache.batch_topk_tail(ids, temp)
        assert torch.equal(idx, logp.topk(8, dim=-1).indices)
        outside = torch.ones_like(logp, dtype=torch.bool).scatter(1, idx, False)
        want = torch.log((logp / temp).exp().where(outside, 0.0).sum(-1))
        torch.testing.assert_close(tail.double(), want, rtol=1e-6, atol=1e-5)


def test_fingerprint_changes_with_temperatures_and_answer_policy(tiny_tokenizer):
    from kdlab.stages.cache import cache_fingerprint_inputs
    from kdlab.tasks import SST2Task

    def fp(**kw):
        base = dict(teacher_weights="w", tokenizer=tiny_tokenizer, task=SST2Task(), split="train",
                    example_ids=["a", "b"], top_k=8, hidden_layers=[], answers=True, dtype="bfloat16",
                    hidden_dtype="float16", temperatures=[2.0])
        return canonical_hash(cache_fingerprint_inputs(**{**base, **kw}))

    assert fp() == fp(temperatures=[2]) == fp(temperatures=(2.0, 2.0))
    assert fp(temperatures=[1.0, 2.0]) == fp(temperatures=[2.0, 1.0])
    assert len({fp(), fp(temperatures=[1.0, 2.0]), fp(temperatures=[4.0]), fp(temperatures=None)}) == 4
    assert fp(empty_answers="drop") != fp()
    with pytest.raises(ValueError, match="empty_answers"):
        fp(empty_answers="skip")


@pytest.mark.parametrize("policy", ["gold", "drop"])
def test_empty_teacher_answers_policy(tmp_path, monkeypatch, tiny_tokenizer, policy):
    import kdlab.stages.cache as teacher_mod
    from kdlab.tasks import SquadTask
    from kdlab.tasks.base import Encoded, Example

    task = SquadTask()
    generated = {"q1": "Paris", "q2": "", "q3": "  ... ", "q4": "1984", "q5": "\u00e9t\u00e9"}
    examples = [Example(i, {"context": "c", "question": "q"}, answers=(f"gold {i}",)) for i in generated]
    monkeypatch.setattr(teacher_mod, "predict", lambda *a, **kw: (dict(generated), {}))
    encoded = {ex.id: Encoded(ex.id, [1, 5, 6, 2], [-100, -100, 6, 2]) for ex in examples}
    cache = teacher_mod.build_teacher_cache(
        tmp_path / policy, task=task, teacher=torch.nn.Linear(1, 1), tokenizer=tiny_tokenizer,
        examples=examples, encoded=encoded, fingerprint_inputs={"p": policy}, top_k=None, hidden_layers=[],
        answers=True, batch_size=2, empty_answers=policy,
    )
    kept = {"q1": "Paris", "q4": "1984", "q5": "\u00e9t\u00e9"}
    for i, text in kept.items():
        assert cache.answer(i) == text
    for i in ("q2", "q3"):  # empty, and no letter or digit
        assert cache.answer(i) == (task.gold_answer(examples[int(i[1]) - 1]) if policy == "gold" else None)
    replaced, dropped = (2, 0) if policy == "gold" else (0, 2)
    assert cache.manifest["answers"] == {"total": 5, "empty": 2, "policy": policy, "replaced": replaced,
                                         "dropped": dropped}
    # Reopened from disk (as another process would), None survives the round trip.
    again = TeacherCache.open(tmp_path / policy)
    assert [again.answer(i) for i in generated] == [cache.answer(i) for i in generated]
    with pytest.raises(ValueError, match="empty_answers"):
        teacher_mod.build_teacher_cache(
            tmp_path / "bad", task=task, teacher=torch.nn.Linear(1, 1), tokenizer=tiny_tokenizer,
            examples=examples, encoded=encoded, fingerprint_inputs={}, top_k=None, hidden_layers=[],
            answers=True, batch_size=2, empty_answers="skip",
        )
