"""Writing files and folders so that a crash never leaves half of one: everything kdlab writes for later
stages is made under a temporary name beside its place and moved there by one `os.replace`, which readers see
either before or after."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; moved onto `path` when the block succeeds, removed if it
    fails. `durable`: fsync the file and its folder too, for files whose loss after a power cut would be
    silent (cache manifests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any, *, durable: bool = False, **dumps: Any) -> None:
    atomic_write_text(path, json.dumps(data, **dumps), durable=durable)


def atomic_folder(final: Path, build: Callable[[Path], object], *, replace: bool = False) -> Path:
    """Build a folder in a temporary sibling and rename it into place. An existing folder is kept (another
    process built the same thing first), or with `replace` swapped out for the new one."""
    if final.is_dir() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        if replace and final.is_dir():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise  # else another process won the race; its copy is as good as ours
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def built_once(final: Path, build: Callable[[Path], object]) -> Path:
    """`atomic_folder`, with the processes that need the same folder taking turns (a lock file beside it):
    the first builds it, the others wait and find it built instead of building it again."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(final.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        try:
            return atomic_folder(final, build)
        finally:
            # Whoever still waits on it finds the folder (atomic_folder looks again), and later callers
            # return before locking; after a failed build, at worst two retries build side by side.
            with contextlib.suppress(OSError):
                lock_path.unlink()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def hash_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so multi-GB weights never sit in RAM."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(path: str | os.PathLike[str], patterns: Sequence[str], file_hash: Callable[[Path], str]) -> str:
    """Hex sha256 over every file below `path` whose name matches one of `patterns`: each file's relative path
    and `file_hash(file)`, in sorted order (independent of listing order; symlinks are followed)."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(f"no file under {root} matches {list(patterns)}")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{file_hash(p)}\n".encode())
    return h.hexdigest()
