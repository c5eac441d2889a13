"""On-disk cache of teacher outputs for knowledge distillation.

A teacher LLM is run once per task+split and, for each example id, we keep what the distillation
methods need: the generated answer text (sequence-level KD), the top-k token indices/log-probs at
each answer position plus, per temperature, the log-sum-exp of the tempered log-probs of every other
token (logit KD, exact at that temperature) and hidden states at selected layers (feature KD).  This
module only stores arrays that the caller computed; it contains no model code.

Layout of a cache directory::

    manifest.json                  written LAST, atomically: its presence marks a complete cache; it holds
                                   the size and sha256 of every other file ("checksums"), checked on open
    index.json                     example id -> (shard, row offset, n rows) per field, columnar
    answers.jsonl                  {"id": ..., "answer": ...} per line (if answers are stored; null
                                   when the example has no answer target)
    shard-00000.topk_idx.npy       [rows, k] uint16 (vocab <= 65536) or uint32
    shard-00000.topk_lp.npy        [rows, k] float16 log-probs at T = 1
    shard-00000.tail-T2.npy        [rows] float32 logsumexp over the non-top-k tokens of logp / T, one
                                   file per temperature T the cache was built for (here T = 2)
    shard-00000.hidden-L12.npy     [rows, d] float16, or bfloat16 bits stored as uint16
    ...

Shards are plain ``.npy`` files (never pickled) so the reader can memory-map them.

Opening a cache checks every file's size against the manifest (cheap, always) and its sha256 the first time
this process opens that manifest (``verify="auto"``; ``"hash"`` always, ``"size"`` never), so flipped bytes
in a shard are caught before any of them is read. Rebuilding over an existing cache builds beside it and
swaps it in (``overwrite=True``), so a crash mid-build keeps the old one.
"""

from __future__ import annotations

import copy
import datetime as _dt
import fnmatch
import hashlib
import io
import itertools
import json
import operator
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.errors import CacheError, CacheExistsError, CacheMismatchError
from kdlab.files import atomic_write_json, fsync_dir, hash_file, hash_tree
from kdlab.hashing import canonical_hash, canonical_json, plain_json
from kdlab.registry import pid_alive

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheExistsError",
    "CacheMismatchError",
    "TeacherCache",
    "TeacherCacheWriter",
    "hash_directory",
    "temperature_tag",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.json"
ANSWERS_NAME = "answers.jsonl"
HIDDEN_DTYPES = ("float16", "bfloat16")
# Studies replace this generic hint with the exact command for their folder (see `Study.cache_stage`).
REBUILD_HINT = (
    "rebuild it with `kdlab cache --out STUDY_DIR --rebuild` or `kdlab run --rebuild-cache` "
    "(or build with TeacherCacheWriter(..., overwrite=True))"
)
VERIFY_MODES = ("auto", "size", "hash")

_FP16_MAX = 65504.0
# A little slack above 0 for log-softmax rounding; anything larger is almost surely raw logits.
_LOGPROB_SLACK = 1e-3
_DEFAULT_SHARD_ROWS = 1_000_000
_DEFAULT_SHARD_BYTES = 512 << 20

ExampleId = str | int

# (directory, sha256 of its manifest) of the caches whose files this process has hashed already.
_VERIFIED: set[tuple[str, str]] = set()


# --------------------------------------------------------------------------------------------------
# Fingerprints and hashing
# --------------------------------------------------------------------------------------------------


def hash_directory(
    path: str | os.PathLike[str],
    patterns: Sequence[str] = ("*.safetensors", "*.bin", "*.json"),
) -> str:
    """Hex sha256 over every file below ``path`` whose name matches one of ``patterns``.

    Relative paths are part of the hash (renaming a shard changes it), files are visited in sorted
    order so the result does not depend on filesystem listing order, and symlinks (as in the
    Hugging Face cache) are followed.
    """
    return hash_tree(path, patterns, hash_file)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _index_dtype(vocab_size: int) -> np.dtype:
    # uint16 halves the index bytes of the common (<=64K vocab) case; uint32 covers the rest.
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _normalize_id(example_id: Any) -> ExampleId:
    if isinstance(example_id, bool):
        raise TypeError(f"example id must be str or int, got bool {example_id!r}")
    if isinstance(example_id, np.integer):
        return int(example_id)
    if isinstance(example_id, (str, int)):
        return example_id
    raise TypeError(f"example id must be str or int, got {type(example_id).__name__} {example_id!r}")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _short(value: Any, limit: int = 60) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_ABSENT = object()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # Nested dicts are diffed per leaf so the error names e.g. "teacher.revision", not "teacher".
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff_inputs(cached: Mapping[str, Any], requested: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(cached), _flatten(requested)
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va is _ABSENT or vb is _ABSENT or canonical_json({"v": va}) != canonical_json({"v": vb}):
            diffs.append((key, va, vb))
    return diffs


def _write_npy(path: Path, chunks: Sequence[np.ndarray], dtype: np.dtype, cols: int | None) -> dict[str, Any]:
    """Stream ``chunks`` (all [*, cols], or [*] when cols is None, of ``dtype``) into one .npy without
    concatenating in RAM; returns the file's checksum entry, hashed as it is written (no second read)."""
    rows = sum(c.shape[0] for c in chunks)
    shape = (rows,) if cols is None else (rows, cols)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for data in itertools.chain([header.getvalue()], (np.ascontiguousarray(c, dtype=dtype).tobytes()
                                                          for c in chunks)):
            f.write(data)
            h.update(data)
            size += len(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _checksum(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": hash_file(path)}


def _plain_name(name: Any) -> bool:
    """A manifest's file entry must name a file inside the cache folder: no separators, no '..'."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
    )


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, durable=True, ensure_ascii=False, indent=1)


def _is_cache_file(p: Path) -> bool:
    """Files an unfinished writer may have left behind (safe to clear before a fresh build)."""
    name = p.name
    return p.is_file() and (
        fnmatch.fnmatch(name, "shard-*.npy")
        or name in (INDEX_NAME, ANSWERS_NAME)
        or fnmatch.fnmatch(name, "*.tmp-*")
        or fnmatch.fnmatch(name, ".*.tmp")  # a temporary file of `files.atomic_output`
    )


def _hidden_file(shard: str, layer: int) -> str:
    return f"{shard}.hidden-L{layer}.npy"


def _tail_file(shard: str, tag: str) -> str:
    return f"{shard}.tail-T{tag}.npy"


def temperature_tag(temperature: float) -> str:
    """Text form of a temperature in file names and manifests: 2.0 -> "2", 0.5 -> "0.5"."""
    text = repr(float(temperature))
    return text[:-2] if text.endswith(".0") else text


def _check_temperatures(temperatures: Sequence[float]) -> list[float]:
    temps = sorted(float(t) for t in temperatures)
    if any(not (np.isfinite(t) and t > 0) for t in temps):
        raise ValueError(f"temperatures must be finite and > 0, got {list(temperatures)}")
    tags = [temperature_tag(t) for t in temps]
    if len(set(tags)) != len(tags):
        raise ValueError(f"temperatures has duplicates: {list(temperatures)}")
    return temps


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class TeacherCacheWriter:
    """Builds a cache directory shard by shard; use as a context manager.

    On a clean exit the last shard, the index and finally ``manifest.json`` are written.  If the
    with-block raises, nothing is committed (no manifest) and the partial build is removed.
    Building over an existing complete cache requires ``overwrite=True``; the new cache is then
    built in a temporary sibling directory and swapped in at close, so a crash mid-build leaves the
    old cache intact.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fingerprint_inputs: Mapping[str, Any],
        vocab_size: int,
        top_k: int | None,
        hidden_layers: Sequence[int] = (),
        hidden_size: int | None = None,
        hidden_dtype: str = "float16",
        store_answers: bool = False,
        temperatures: Sequence[float] = (),
        shard_rows: int = _DEFAULT_SHARD_ROWS,
        shard_bytes: int = _DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        if int(vocab_size) <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if top_k is not None and int(top_k) <= 0:
            raise ValueError(f"top_k must be positive or None, got {top_k}")
        if hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype must be one of {HIDDEN_DTYPES}, got {hidden_dtype!r}")
        layers = [operator.index(layer) for layer in hidden_layers]
        if len(set(layers)) != len(layers):
            raise ValueError(f"hidden_layers has duplicates: {layers}")
        if hidden_size is not None and int(hidden_size) <= 0:
            raise ValueError(f"hidden_size must be positive or None, got {hidden_size}")
        if hidden_size is not None and not layers:
            raise ValueError("hidden_size given but hidden_layers is empty")
        if shard_rows <= 0 or shard_bytes <= 0:
            raise ValueError("shard_rows and shard_bytes must be positive")
        if top_k is None and not layers and not store_answers:
            raise ValueError("nothing to store: set top_k, hidden_layers and/or store_answers=True")
        temps = _check_temperatures(temperatures)
        if temps and top_k is None:
            raise ValueError("temperatures given but top_k is None: the tails belong to the top-k field")

        self.fingerprint_inputs: dict[str, Any] = plain_json(fingerprint_inputs)
        self.fingerprint = canonical_hash(fingerprint_inputs)
        self.vocab_size = int(vocab_size)
        self.top_k = None if top_k is None else int(top_k)
        self.hidden_layers: tuple[int, ...] = tuple(layers)
        self.hidden_size = None if hidden_size is None else int(hidden_size)
        self.hidden_dtype = hidden_dtype
        self.store_answers = bool(store_answers)
        self.temperatures: tuple[float, ...] = tuple(temps)
        self._tail_tags = [temperature_tag(t) for t in temps]
        # Filled in by the builder (counts of empty/replaced/dropped answers); written to the manifest.
        self.answer_stats: dict[str, Any] | None = None
        self.shard_rows = int(shard_rows)
        self.shard_bytes = int(shard_bytes)
        self.directory = Path(directory)
        self._idx_dtype = _index_dtype(self.vocab_size)
        self._hid_np_dtype = np.dtype(np.float16) if hidden_dtype == "float16" else np.dtype(np.uint16)

        self._build_dir, self._swap, self._created_dir = self._prepare_directory(overwrite)

        # Index columns (small: a few ints per example) stay in RAM until close.
        self._ids: list[ExampleId] = []
        self._id_set: set[ExampleId] = set()
        self._col_shard: list[int] = []
        self._col_topk_off: list[int] = []
        self._col_topk_n: list[int] = []
        self._col_hid_off: list[int] = []
        self._col_hid_n: list[int] = []
        self._shards: list[dict[str, Any]] = []
        self._checksums: dict[str, dict[str, Any]] = {}  # file name -> size and sha256, for the manifest
        self._num_tokens = 0
        self._num_hidden_rows = 0
        self._reset_buffers()
        # Answers are streamed to disk as they come, so they never pile up in RAM.
        self._answers_fh = None
        if self.store_answers:
            self._answers_fh = open(self._build_dir / ANSWERS_NAME, "w", encoding="utf-8")  # noqa: SIM115
        self._closed = False

    @property
    def fields(self) -> tuple[str, ...]:
        out = []
        if self.store_answers:
            out.append("answer")
        if self.top_k is not None:
            out.append("topk")
        if self.hidden_layers:
            out.append("hidden")
        return tuple(out)

    def __len__(self) -> int:
        return len(self._ids)

    # ---- directory handling ----------------------------------------------------------------------

    def _prepare_directory(self, overwrite: bool) -> tuple[Path, bool, bool]:
        """Return (build dir, swap at close?, did we create the target?)."""
        target = self.directory
        self._clear_stale_siblings()
        if (target / MANIFEST_NAME).exists():
            if not overwrite:
                raise CacheExistsError(
                    f"a complete teacher cache already exists at {target}; pass overwrite=True to rebuild it"
                )
            return self._temp_sibling(), True, False
        if target.exists():
            if not target.is_dir():
                raise CacheExistsError(f"cache path {target} exists and is not a directory")
            entries = list(target.iterdir())
            if entries and all(_is_cache_file(p) for p in entries):
                # Leftovers of an unfinished build (no manifest): nothing worth keeping.
                for p in entries:
                    p.unlink()
                return target, False, False
            if not entries:
                return target, False, False
            if not overwrite:
                raise CacheExistsError(
                    f"{target} is not empty and holds no teacher cache; pass overwrite=True to replace it"
                )
            return self._temp_sibling(), True, False
        target.mkdir(parents=True)
        return target, False, True

    def _clear_stale_siblings(self) -> None:
        """Remove what killed builds left beside the target: build folders of dead processes on this host,
        and old caches a swap had set aside (the swap is done or its new cache was never committed)."""
        parent, name = self.directory.parent, self.directory.name
        if not parent.is_dir():
            return
        for p in parent.glob(f".{name}.building-*"):
            pid = p.name[len(f".{name}.building-") :].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
        for p in parent.glob(f".{name}.old-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _temp_sibling(self) -> Path:
        parent = self.directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{self.directory.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    # ---- adding examples -------------------------------------------------------------------------

    def _reset_buffers(self) -> None:
        self._buf_idx: list[np.ndarray] = []
        self._buf_lp: list[np.ndarray] = []
        self._buf_tail: dict[str, list[np.ndarray]] = {tag: [] for tag in self._tail_tags}
        self._buf_hidden: dict[int, list[np.ndarray]] = {layer: [] for layer in self.hidden_layers}
        self._buf_examples = 0
        self._buf_topk_rows = 0
        self._buf_hid_rows = 0
        self._buf_bytes = 0

    def add(
        self,
        example_id: ExampleId,
        *,
        answer: str | None = None,
        topk_indices: Any = None,
        topk_logprobs: Any = None,
        topk_tail: Mapping[float, Any] | None = None,
        hidden: Mapping[int, Any] | None = None,
    ) -> None:
        """Append one example.  Every field the cache declares must be given; others must not.

        Arrays may be numpy arrays or torch tensors (any device/dtype).  ``topk_tail`` maps each
        declared temperature T to the [n] log-sum-exp over the non-top-k tokens of ``logp / T``
        (stored as float32).  ``answer=None`` in a cache that stores answers marks an example with
        no answer target.  Everything is validated before any state changes, so a rejected call
        leaves the writer usable.
        """
        if self._closed:
            raise RuntimeError(f"writer for {self.directory} is closed")
        key = _normalize_id(example_id)
        if key in self._id_set:
            raise ValueError(
                f"duplicate example id {key!r}: already added to the cache being built at {self.directory}"
            )
        if self.store_answers:
            if answer is not None and not isinstance(answer, str):
                raise ValueError(
                    f"example {key!r}: this cache stores answers; answer must be a str (or None: no "
                    f"answer target), got {answer!r}"
                )
        elif answer is not None:
            raise ValueError(
                f"example {key!r}: answer given but the writer was created with store_answers=False"
            )
        idx, lp = self._prepare_topk(key, topk_indices, topk_logprobs)
        tails = self._prepare_tail(key, topk_tail, None if idx is None else idx.shape[0])
        hid, width = self._prepare_hidden(key, hidden)

        n = 0 if idx is None else idx.shape[0]
        m = 0 if hid is None else next(iter(hid.values())).shape[0]
        nbytes = 0 if idx is None else idx.nbytes + lp.nbytes
        nbytes += sum(a.nbytes for a in tails.values())
        nbytes += 0 if hid is None else sum(a.nbytes for a in hid.values())
        too_many_rows = max(self._buf_topk_rows + n, self._buf_hid_rows + m) > self.shard_rows
        if self._buf_examples and (too_many_rows or self._buf_bytes + nbytes > self.shard_bytes):
            self._flush_shard()

        # Commit.
        if width is not None:
            self.hidden_size = width
        self._ids.append(key)
        self._id_set.add(key)
        self._col_shard.append(len(self._shards))
        self._col_topk_off.append(self._buf_topk_rows)
        self._col_topk_n.append(n)
        self._col_hid_off.append(self._buf_hid_rows)
        self._col_hid_n.append(m)
        if idx is not None:
            self._buf_idx.append(idx)
            self._buf_lp.append(lp)
        for tag, arr in tails.items():
            self._buf_tail[tag].append(arr)
        if hid is not None:
            for layer, arr in hid.items():
                self._buf_hidden[layer].append(arr)
        self._buf_examples += 1
        self._buf_topk_rows += n
        self._buf_hid_rows += m
        self._buf_bytes += nbytes
        self._num_tokens += n
        self._num_hidden_rows += m
        if self._answers_fh is not None:
            self._answers_fh.write(json.dumps({"id": key, "answer": answer}, ensure_ascii=False) + "\n")

    def _prepare_topk(
        self, key: ExampleId, topk_indices: Any, topk_logprobs: Any
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        if (topk_indices is None) != (topk_logprobs is None):
            raise ValueError(f"example {key!r}: give both topk_indices and topk_logprobs, or neither")
        if topk_indices is None:
            if self.top_k is not None:
                raise ValueError(
                    f"example {key!r}: this cache stores top-k (k={self.top_k}); topk_indices and "
                    "topk_logprobs are required"
                )
            return None, None
        if self.top_k is None:
            raise ValueError(f"example {key!r}: top-k given but the writer was created with top_k=None")
        k = self.top_k
        idx, lp = _to_numpy(topk_indices), _to_numpy(topk_logprobs)
        for name, arr in (("topk_indices", idx), ("topk_logprobs", lp)):
            if arr.ndim != 2 or arr.shape[1] != k:
                raise ValueError(
                    f"example {key!r}: {name} must have shape [n, k={k}], got {tuple(arr.shape)}"
                )
        if idx.shape[0] != lp.shape[0]:
            raise ValueError(
                f"example {key!r}: topk_indices has {idx.shape[0]} rows but topk_logprobs has {lp.shape[0]}"
            )
        if idx.dtype.kind not in "iu":
            raise ValueError(f"example {key!r}: topk_indices must be integers, got dtype {idx.dtype}")
        if lp.dtype.kind != "f":
            raise ValueError(f"example {key!r}: topk_logprobs must be floating point, got dtype {lp.dtype}")
        if idx.size:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"example {key!r}: topk_indices out of range [0, vocab_size={self.vocab_size}): "
                    f"min {lo}, max {hi}"
                )
            if np.isnan(lp).any():
                raise ValueError(f"example {key!r}: topk_logprobs contains NaN")
            top = float(lp.max())
            if top > _LOGPROB_SLACK:
                raise ValueError(
                    f"example {key!r}: topk_logprobs must be log-probabilities (<= 0), got max {top:.4g}; "
                    "raw logits passed by mistake?"
                )
        return idx.astype(self._idx_dtype), lp.astype(np.float16)

    def _prepare_tail(
        self, key: ExampleId, topk_tail: Mapping[float, Any] | None, rows: int | None
    ) -> dict[str, np.ndarray]:
        if not self.temperatures or rows is None:
            if topk_tail is not None:
                raise ValueError(
                    f"example {key!r}: topk_tail given but the writer declared no temperatures "
                    "(or no top-k for this example)"
                )
            return {}
        if not isinstance(topk_tail, Mapping):
            raise ValueError(
                f"example {key!r}: this cache stores top-k tails for temperatures "
                f"{list(self.temperatures)}; topk_tail must be a dict {{T: array [n]}}"
            )
        given = {temperature_tag(t): v for t, v in topk_tail.items()}
        if set(given) != set(self._tail_tags):
            raise ValueError(
                f"example {key!r}: topk_tail has temperatures {sorted(given)}, the writer declared "
                f"{self._tail_tags}"
            )
        out: dict[str, np.ndarray] = {}
        for tag in self._tail_tags:
            arr = _to_numpy(given[tag])
            if arr.shape != (rows,):
                raise ValueError(
                    f"example {key!r}: topk_tail[{tag}] must have shape [n={rows}], got {tuple(arr.shape)}"
                )
            if arr.dtype.kind != "f":
                raise ValueError(f"example {key!r}: topk_tail[{tag}] must be floating point, got {arr.dtype}")
            # -inf is legal (no possible token outside the top-k); NaN and +inf are not.
            if np.isnan(arr).any() or np.isposinf(arr).any():
                raise ValueError(f"example {key!r}: topk_tail[{tag}] contains NaN or +inf")
            out[tag] = arr.astype(np.float32)
        return out

    def _prepare_hidden(
        self, key: ExampleId, hidden: Mapping[int, Any] | None
    ) -> tuple[dict[int, np.ndarray] | None, int | None]:
        if hidden is None:
            if self.hidden_layers:
                raise ValueError(
                    f"example {key!r}: this cache stores hidden states for layers "
                    f"{list(self.hidden_layers)}; hidden is required"
                )
            return None, None
        if not self.hidden_layers:
            raise ValueError(f"example {key!r}: hidden given but the writer declared no hidden_layers")
        if not isinstance(hidden, Mapping):
            raise ValueError(
                f"example {key!r}: hidden must be a dict {{layer: array [m, d]}}, got {type(hidden).__name__}"
            )
        by_layer = {operator.index(layer): v for layer, v in hidden.items()}
        declared = set(self.hidden_layers)
        undeclared = sorted(set(by_layer) - declared)
        if undeclared:
            raise ValueError(
                f"example {key!r}: hidden layer(s) {undeclared} not declared; declared hidden_layers="
                f"{list(self.hidden_layers)}"
            )
        missing = sorted(declared - set(by_layer))
        if missing:
            raise ValueError(f"example {key!r}: hidden is missing declared layer(s) {missing}")
        width = self.hidden_size
        rows = None
        out: dict[int, np.ndarray] = {}
        for layer in self.hidden_layers:
            arr = _to_numpy(by_layer[layer])
            if arr.ndim != 2:
                raise ValueError(
                    f"example {key!r}: hidden[{layer}] must be 2-D [m, d], got shape {tuple(arr.shape)}"
                )
            if arr.dtype.kind != "f":
                raise ValueError(
                    f"example {key!r}: hidden[{layer}] must be floating point, got dtype {arr.dtype}"
                )
            if width is None:
                width = arr.shape[1]  # inferred from the first example when not declared
            if arr.shape[1] != width:
                raise ValueError(
                    f"example {key!r}: hidden[{layer}] has width {arr.shape[1]}, expected hidden_size={width}"
                )
            if rows is None:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise ValueError(
                    f"example {key!r}: hidden layers must cover the same positions; hidden[{layer}] has "
                    f"{arr.shape[0]} rows, expected {rows}"
                )
            out[layer] = self._encode_hidden(key, layer, arr)
        return out, (width if self.hidden_size is None else None)

    def _encode_hidden(self, key: ExampleId, layer: int, arr: np.ndarray) -> np.ndarray:
        if arr.size and not np.isfinite(arr).all():
            raise ValueError(f"example {key!r}: hidden[{layer}] contains inf/NaN")
        if self.hidden_dtype == "float16":
            if arr.size and float(np.abs(arr).max()) > _FP16_MAX:
                raise ValueError(
                    f"example {key!r}: hidden[{layer}] has |values| up to {float(np.abs(arr).max()):.4g}, "
                    "beyond float16 range; use hidden_dtype='bfloat16'"
                )
            return arr.astype(np.float16)
        # bfloat16: round via torch, keep the raw bits as uint16 (numpy has no bfloat16 dtype).
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16).copy()

    # ---- flushing / committing -------------------------------------------------------------------

    def _flush_shard(self) -> None:
        if not self._buf_examples:
            return
        name = f"shard-{len(self._shards):05d}"
        files: dict[str, Any] = {}
        if self.top_k is not None:
            files["topk_idx"] = f"{name}.topk_idx.npy"
            files["topk_lp"] = f"{name}.topk_lp.npy"
            self._write_shard_file(files["topk_idx"], self._buf_idx, self._idx_dtype, self.top_k)
            self._write_shard_file(files["topk_lp"], self._buf_lp, np.dtype(np.float16), self.top_k)
            if self._tail_tags:
                files["tail"] = {}
                for tag in self._tail_tags:
                    fname = _tail_file(name, tag)
                    files["tail"][tag] = fname
                    self._write_shard_file(fname, self._buf_tail[tag], np.dtype(np.float32), None)
        if self.hidden_layers:
            files["hidden"] = {}
            for layer in self.hidden_layers:
                fname = _hidden_file(name, layer)
                files["hidden"][str(layer)] = fname
                assert self.hidden_size is not None  # set by the first add()
                chunks = self._buf_hidden[layer]
                self._write_shard_file(fname, chunks, self._hid_np_dtype, self.hidden_size)
        self._shards.append(
            {
                "name": name,
                "num_examples": self._buf_examples,
                "topk_rows": self._buf_topk_rows,
                "hidden_rows": self._buf_hid_rows,
                "files": files,
            }
        )
        self._reset_buffers()

    def _write_shard_file(
        self, fname: str, chunks: Sequence[np.ndarray], dtype: np.dtype, cols: int | None
    ) -> None:
        self._checksums[fname] = _write_npy(self._build_dir / fname, chunks, dtype, cols)

    def close(self) -> None:
        """Flush the last shard, write the index, then the manifest (the commit point)."""
        if self._closed:
            return
        self._flush_shard()
        if self._answers_fh is not None:
            self._answers_fh.flush()
            os.fsync(self._answers_fh.fileno())
            self._answers_fh.close()
        _write_json_atomic(
            self._build_dir / INDEX_NAME,
            {
                "ids": self._ids,
                "shard": self._col_shard,
                "topk_offset": self._col_topk_off,
                "topk_rows": self._col_topk_n,
                "hidden_offset": self._col_hid_off,
                "hidden_rows": self._col_hid_n,
            },
        )
        self._checksums[INDEX_NAME] = _checksum(self._build_dir / INDEX_NAME)
        if self.store_answers:
            self._checksums[ANSWERS_NAME] = _checksum(self._build_dir / ANSWERS_NAME)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_inputs": self.fingerprint_inputs,
            "fields": list(self.fields),
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "index_dtype": self._idx_dtype.name,
            "logprob_dtype": "float16",
            "temperatures": list(self.temperatures),
            "tail_dtype": "float32",
            "hidden_layers": list(self.hidden_layers),
            "hidden_size": self.hidden_size,
            "hidden_dtype": self.hidden_dtype if self.hidden_layers else None,
            "num_examples": len(self._ids),
            "num_tokens": self._num_tokens,
            "num_hidden_rows": self._num_hidden_rows,
            "index_file": INDEX_NAME,
            "answers_file": ANSWERS_NAME if self.store_answers else None,
            "shards": self._shards,
            "checksums": self._checksums,
            "answers": self.answer_stats,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        fsync_dir(self._build_dir)
        _write_json_atomic(self._build_dir / MANIFEST_NAME, manifest)
        fsync_dir(self._build_dir)
        if self._swap:
            self._swap_in()
        self._closed = True

    def _swap_in(self) -> None:
        target = self.directory
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        # Two renames; between them the old cache sits intact at `backup`, the new one at the
        # build dir, so no crash point loses both.
        os.replace(target, backup)
        try:
            os.replace(self._build_dir, target)
        except BaseException:
            os.replace(backup, target)
            raise
        fsync_dir(target.parent)
        shutil.rmtree(backup, ignore_errors=True)

    def abort(self) -> None:
        """Discard the build: no manifest is written and any existing cache is left untouched."""
        if self._closed:
            return
        self._closed = True
        if self._answers_fh is not None:
            self._answers_fh.close()
        if self._swap or self._created_dir:
            shutil.rmtree(self._build_dir, ignore_errors=True)
        else:
            # In-place build into a directory that was empty (or held only build leftovers).
            for p in self._build_dir.iterdir():
                if _is_cache_file(p):
                    p.unlink()

    def __enter__(self) -> TeacherCacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


def _reopen(directory: str, expected_fingerprint: str) -> TeacherCache:
    # The pickling process verified the files already; a worker checks sizes only.
    return TeacherCache.open(directory, expected_fingerprint=expected_fingerprint, verify="size")


class TeacherCache:
    """Read-only, memory-mapped view of a complete cache.  Create with :meth:`open`.

    Shard arrays are mapped lazily and per process (re-mapped after a fork), and pickling only
    carries the path + fingerprint, so the object can be handed to DataLoader workers.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], index: dict[str, Any]) -> None:
        self._dir = directory
        self._manifest = manifest
        self._ids: list[ExampleId] = list(index["ids"])
        self._pos: dict[ExampleId, int] = {key: i for i, key in enumerate(self._ids)}
        self._col_shard = np.asarray(index["shard"], dtype=np.int64)
        self._col_topk_off = np.asarray(index["topk_offset"], dtype=np.int64)
        self._col_topk_n = np.asarray(index["topk_rows"], dtype=np.int64)
        self._col_hid_off = np.asarray(index["hidden_offset"], dtype=np.int64)
        self._col_hid_n = np.asarray(index["hidden_rows"], dtype=np.int64)
        self._idx_dtype = np.dtype(manifest["index_dtype"])
        self._hidden_layers: tuple[int, ...] = tuple(int(x) for x in manifest["hidden_layers"])
        # Older manifests have no tails: they hold no temperature.
        self._temperatures: tuple[float, ...] = tuple(float(t) for t in manifest.get("temperatures", []))
        self._mmaps: dict[tuple[int, str], np.memmap] = {}
        self._answers: dict[ExampleId, str | None] | None = None
        self._pid = os.getpid()

    # ---- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        expected_inputs: Mapping[str, Any] | None = None,
        *,
        verify: str = "auto",
    ) -> TeacherCache:
        """Open a complete cache, optionally checking it was built from the expected inputs.

        Every file's size is checked against the manifest; its sha256 too with ``verify="hash"``, or with
        ``"auto"`` (default) the first time this process opens this manifest; ``"size"`` skips the hashes.
        Raises CacheError if the manifest is missing (absent or unfinished build) or the cache is corrupt
        (the message names the file), CacheMismatchError if the fingerprint differs.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        d = Path(directory)
        manifest_path = d / MANIFEST_NAME
        if not manifest_path.is_file():
            state = "incomplete (a build did not finish)" if d.is_dir() else "absent"
            raise CacheError(
                f"teacher cache at {d} is incomplete or absent ({state}: no {MANIFEST_NAME}); "
                f"build it first, e.g. {REBUILD_HINT}"
            )
        try:
            manifest_bytes = manifest_path.read_bytes()
            manifest = json.loads(manifest_bytes.decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CacheError(f"teacher cache at {d}: unreadable {MANIFEST_NAME} ({e}); {REBUILD_HINT}") from e
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"teacher cache at {d} has format version {version}, this code reads {FORMAT_VERSION}; "
                f"{REBUILD_HINT}"
            )
        try:
            stored = canonical_hash(manifest["fingerprint_inputs"])
        except (KeyError, TypeError) as e:
            raise CacheError(f"teacher cache at {d}: {MANIFEST_NAME} has no usable fingerprint inputs ({e}); "
                             f"{REBUILD_HINT}") from None
        if stored != manifest.get("fingerprint"):
            raise CacheError(
                f"teacher cache at {d}: manifest fingerprint does not match its inputs (corrupt?); "
                f"{REBUILD_HINT}"
            )

        expected = expected_fingerprint
        if expected_inputs is not None:
            computed = canonical_hash(expected_inputs)
            if expected is not None and expected != computed:
                raise ValueError("expected_fingerprint does not equal canonical_hash(expected_inputs)")
            expected = computed
        if expected is not None and expected != manifest["fingerprint"]:
            raise cls._mismatch(d, manifest, expected, expected_inputs)

        checksums = cls._check_files(d, manifest)
        key = (str(d.resolve()), hashlib.sha256(manifest_bytes).hexdigest())
        if verify == "hash" or (verify == "auto" and key not in _VERIFIED):
            for fname, entry in checksums.items():
                if hash_file(d / fname) != entry["sha256"]:
                    raise CacheError(
                        f"teacher cache at {d}: {fname} is corrupt (its sha256 differs from the manifest's); "
                        f"{REBUILD_HINT}"
                    )
            _VERIFIED.add(key)

        try:
            index = json.loads((d / manifest.get("index_file", INDEX_NAME)).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CacheError(f"teacher cache at {d}: unreadable index ({e}); {REBUILD_HINT}") from e
        n = manifest["num_examples"]
        if any(len(index[col]) != n for col in index):
            raise CacheError(
                f"teacher cache at {d}: index length disagrees with manifest ({n} examples); {REBUILD_HINT}"
            )
        return cls(d, manifest, index)

    @staticmethod
    def _check_files(d: Path, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Every file the manifest names: a plain name inside ``d``, present, with its recorded size.
        Returns the checksum entries (to hash when asked)."""
        checksums = manifest.get("checksums")
        if not isinstance(checksums, dict):
            raise CacheError(
                f"teacher cache at {d}: {MANIFEST_NAME} has no file checksums (built by an older kdlab, or "
                f"edited); {REBUILD_HINT}"
            )
        names = [manifest.get("index_file", INDEX_NAME)]
        if manifest.get("answers_file"):
            names.append(manifest["answers_file"])
        for shard in manifest.get("shards", []):
            files = shard.get("files", {})
            names += [files[k] for k in ("topk_idx", "topk_lp") if k in files]
            names += list(files.get("tail", {}).values())
            names += list(files.get("hidden", {}).values())
        for fname in names + list(checksums):
            if not _plain_name(fname):
                raise CacheError(
                    f"teacher cache at {d}: {MANIFEST_NAME} names {fname!r}, not a file of the cache folder; "
                    f"{REBUILD_HINT}"
                )
        for fname in names:
            entry = checksums.get(fname)
            if not isinstance(entry, dict) or not {"size", "sha256"} <= set(entry):
                raise CacheError(
                    f"teacher cache at {d}: no checksum for {fname} in {MANIFEST_NAME}; {REBUILD_HINT}"
                )
            path = d / fname
            if not path.is_file():
                raise CacheError(f"teacher cache at {d}: {fname} is missing; {REBUILD_HINT}")
            size = path.stat().st_size
            if size != entry["size"]:
                raise CacheError(
                    f"teacher cache at {d}: {fname} has {size} bytes, the manifest says {entry['size']} "
                    f"(truncated or overwritten); {REBUILD_HINT}"
                )
        return {fname: checksums[fname] for fname in names}

    @staticmethod
    def _mismatch(
        d: Path, manifest: Mapping[str, Any], expected: str, expected_inputs: Mapping[str, Any] | None
    ) -> CacheMismatchError:
        head = (
            f"teacher cache at {d} was built from different inputs "
            f"(fingerprint {manifest['fingerprint'][:12]}… != requested {expected[:12]}…)."
        )
        if expected_inputs is None:
            body = "\n  (pass expected_inputs to see which inputs differ); cached inputs: " + _short(
                manifest["fingerprint_inputs"], 200
            )
            diffs: list[tuple[str, Any, Any]] = []
        else:
            diffs = _diff_inputs(manifest["fingerprint_inputs"], plain_json(expected_inputs))
            body = "\n  differing inputs:" + "".join(
                f"\n    {key}: cached={_short(old)} requested={_short(new)}" for key, old, new in diffs
            )
        return CacheMismatchError(f"{head}{body}\n  To rebuild: {REBUILD_HINT}.", diffs)

    # ---- pickling / fork safety ------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # memmaps pickle poorly (they would be copied into the pickle); reopen from disk instead.
        return (_reopen, (str(self._dir), self._manifest["fingerprint"]))

    def _array(self, shard: int, name: str) -> np.memmap:
        """Memory-mapped array of a shard: 'topk_idx', 'topk_lp', 'tail-T<tag>' or 'hidden-L<layer>'."""
        if os.getpid() != self._pid:  # forked: do not share mappings/handles with the parent
            self._mmaps = {}
            self._pid = os.getpid()
        arr = self._mmaps.get((shard, name))
        if arr is not None:
            return arr
        info = self._manifest["shards"][shard]
        files = info["files"]
        shape: tuple[int, ...]
        if name.startswith("hidden-L"):
            fname = files["hidden"][name[len("hidden-L") :]]
            shape = (info["hidden_rows"], self._manifest["hidden_size"])
            dtype = np.dtype(np.float16 if self._manifest["hidden_dtype"] == "float16" else np.uint16)
        elif name.startswith("tail-T"):
            fname = files["tail"][name[len("tail-T") :]]
            shape, dtype = (info["topk_rows"],), np.dtype(np.float32)
        else:
            fname = files[name]
            shape = (info["topk_rows"], self._manifest["top_k"])
            dtype = self._idx_dtype if name == "topk_idx" else np.dtype(np.float16)
        arr = np.load(self._dir / fname, mmap_mode="r", allow_pickle=False)
        if arr.shape != shape or arr.dtype != dtype:
            raise CacheError(
                f"teacher cache at {self._dir}: {fname} has shape {arr.shape} dtype {arr.dtype}, "
                f"expected {shape} {dtype}; {REBUILD_HINT}"
            )
        self._mmaps[(shard, name)] = arr
        return arr

    # ---- metadata --------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._manifest["fields"])

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def top_k(self) -> int | None:
        return self._manifest["top_k"]

    @property
    def vocab_size(self) -> int:
        return self._manifest["vocab_size"]

    @property
    def temperatures(self) -> tuple[float, ...]:
        """Temperatures whose top-k tails the cache holds (sorted)."""
        return self._temperatures

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return self._hidden_layers

    @property
    def hidden_size(self) -> int | None:
        return self._manifest["hidden_size"]

    @property
    def num_tokens(self) -> int:
        return self._manifest["num_tokens"]

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, example_id: object) -> bool:
        try:
            return _normalize_id(example_id) in self._pos
        except TypeError:
            return False

    def ids(self) -> list[ExampleId]:
        """Example ids in insertion order."""
        return list(self._ids)

    def __repr__(self) -> str:
        return f"TeacherCache({str(self._dir)!r}, examples={len(self)}, fields={list(self.fields)})"

    def _locate(self, example_id: Any) -> int:
        try:
            return self._pos[_normalize_id(example_id)]
        except (KeyError, TypeError):
            raise KeyError(f"example id {example_id!r} not in teacher cache at {self._dir}") from None

    def _require(self, field: str) -> None:
        if field not in self._manifest["fields"]:
            raise CacheError(
                f"teacher cache at {self._dir} has no {field!r} field (it holds {list(self.fields)}); "
                f"{REBUILD_HINT}"
            )

    # ---- data access -----------------------------------------------------------------------------

    def answer(self, example_id: ExampleId) -> str | None:
        """The teacher's answer (a target text); None when the build dropped it (an empty answer)."""
        self._require("answer")
        i = self._locate(example_id)
        if self._answers is None:
            answers: dict[ExampleId, str | None] = {}
            with open(self._dir / ANSWERS_NAME, encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    answers[rec["id"]] = rec["answer"]
            if len(answers) != len(self._ids):
                raise CacheError(
                    f"teacher cache at {self._dir}: {ANSWERS_NAME} has {len(answers)} answers, "
                    f"expected {len(self._ids)}; {REBUILD_HINT}"
                )
            self._answers = answers
        return self._answers[self._ids[i]]


    def batch_topk(self, example_ids: Sequence[ExampleId]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``example_ids`` concatenated in the order given: ([sum n, k] int64, [sum n, k] float32)."""
        self._require("topk")
        pos = [self._locate(e) for e in example_ids]
        k = self._manifest["top_k"]
        total = int(sum(int(self._col_topk_n[p]) for p in pos))
        out_idx = np.empty((total, k), dtype=np.int64)
        out_lp = np.empty((total, k), dtype=np.float32)
        row = 0
        for p in pos:
            s, off, n = int(self._col_shard[p]), int(self._col_topk_off[p]), int(self._col_topk_n[p])
            if n:
                out_idx[row : row + n] = self._array(s, "topk_idx")[off : off + n]
                out_lp[row : row + n] = self._array(s, "topk_lp")[off : off + n]
            row += n
        return torch.from_numpy(out_idx), torch.from_numpy(out_lp)

    def _tail_name(self, temperature: float) -> str:
        tag = temperature_tag(temperature)
        if tag not in {temperature_tag(t) for t in self._temperatures}:
            held = [float(t) for t in self._temperatures]
            raise CacheError(
                f"teacher cache at {self._dir} has no top-k tail for temperature T={float(temperature)} "
                f"(it holds T in {held}); a run at a temperature needs the cache built for it: "
                f"{REBUILD_HINT}"
            )
        return f"tail-T{tag}"

    def batch_topk_tail(
        self, example_ids: Sequence[ExampleId], temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch_topk` plus the [sum n] float32 tail at ``temperature``.

        The tail is ``logsumexp`` over the tokens outside the top-k of ``logp / T`` (fp32, from the full
        teacher logits), what ``losses.kd_divergence_topk`` needs to be exact at that temperature.
        Raises CacheError naming the temperatures the cache holds when it lacks ``temperature``.
        """
        self._require("topk")
        name = self._tail_name(temperature)
        idx, lp = self.batch_topk(example_ids)
        out = np.empty(idx.shape[0], dtype=np.float32)
        row = 0
        for p in (self._locate(e) for e in example_ids):
            s, off, n = int(self._col_shard[p]), int(self._col_topk_off[p]), int(self._col_topk_n[p])
            if n:
                out[row : row + n] = self._array(s, name)[off : off + n]
            row += n
        return idx, lp, torch.from_numpy(out)


    def batch_hidden(self, example_ids: Sequence[ExampleId]) -> dict[int, torch.Tensor]:
        """{layer: float32 [sum m, d]} with rows concatenated in the order given."""
        self._require("hidden")
        pos = [self._locate(e) for e in example_ids]
        d = self._manifest["hidden_size"]
        total = int(sum(int(self._col_hid_n[p]) for p in pos))
        bf16 = self._manifest["hidden_dtype"] == "bfloat16"
        out: dict[int, torch.Tensor] = {}
        for layer in self._hidden_layers:
            # bfloat16 bits are the top half of a float32: widen to uint32 and shift, no torch needed.
            buf = np.empty((total, d), dtype=np.uint32 if bf16 else np.float32)
            row = 0
            for p in pos:
                s, off, m = int(self._col_shard[p]), int(self._col_hid_off[p]), int(self._col_hid_n[p])
                if m:
                    buf[row : row + m] = self._array(s, f"hidden-L{layer}")[off : off + m]
                row += m
            if bf16:
                buf <<= 16
                buf = buf.view(np.float32)
            out[layer] = torch.from_numpy(buf)
        return out

    def bytes_per_token_parts(self) -> dict[str, float]:
        """Measured bytes per answer token of the KD1 data (npy headers excluded), by part:
        ``{"topk": indices + log-probs, "tail-T<tag>": one tail per temperature, ...}``."""
        self._require("topk")
        names = {"topk": ["topk_idx", "topk_lp"]}
        for t in self._temperatures:
            names[f"tail-T{temperature_tag(t)}"] = [f"tail-T{temperature_tag(t)}"]
        tokens = self._manifest["num_tokens"]
        shards = range(len(self._manifest["shards"]))
        parts: dict[str, float] = {}
        for part, arrays in names.items():
            nbytes = sum(self._array(s, a).nbytes for s in shards for a in arrays)
            parts[part] = nbytes / tokens if tokens else 0.0
        return parts

    def bytes_per_token(self) -> float:
        """Measured bytes of stored KD1 data per answer token: top-k indices + log-probs + every tail."""
        return sum(self.bytes_per_token_parts().values())
