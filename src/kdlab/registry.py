"""Run registry: a SQLite file recording every run of a study.

Re-running a study skips what is done and redoes what failed or was interrupted; several processes
(on one host or several hosts sharing the output folder) can work on the same study without running
anything twice.

Design notes:
- A fresh connection per call: sqlite connections are neither fork-safe nor shareable across threads
  by default, and the per-call cost is negligible next to a training run.
- Every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction: the write lock is taken up front, so
  the read-decide-update of ``claim`` cannot interleave with another process, and a process killed at
  any moment leaves either the old row or the new one, never half of it.
- WAL journal so readers never block the writer; a busy timeout so concurrent writers wait for the
  lock instead of failing with "database is locked".
- Any SQLite failure (read-only file, not a database, corrupt) becomes a RegistryError saying what to do.
- The registry is rebuildable: every finished run also leaves its row as ``run.json`` in its folder
  (``write_run_record``), and ``rebuild_registry`` puts those rows back into a fresh registry, so deleting
  ``registry.sqlite`` loses no finished run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.errors import RegistryError
from kdlab.files import atomic_write_text
from kdlab.layout import REGISTRY, Layout

__all__ = [
    "KINDS",
    "REGISTRY_NAME",
    "RUN_RECORD",
    "SCHEMA_VERSION",
    "STAGES",
    "STATUSES",
    "Registry",
    "RegistryError",
    "RunRecord",
    "RunSpec",
    "check_local_sharing",
    "default_owner",
    "filesystem_type",
    "find_run_records",
    "local_run_folder",
    "network_filesystem",
    "pid_alive",
    "read_run_record",
    "rebuild_registry",
    "write_run_record",
]

SCHEMA_VERSION = 1
KINDS = ("teacher", "student")
STAGES = ("grid", "final", "teacher")
STATUSES = ("todo", "running", "done", "failed")
MAX_ERROR_CHARS = 4000
REGISTRY_NAME = REGISTRY  # the file's name (kdlab.layout owns it)
RUN_RECORD = "run.json"  # a finished run's registry row, kept in its folder
# Run ids are folder names: letters, digits and - _ . + (as run_id builds them), never '..'.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    task TEXT NOT NULL,
    method TEXT NOT NULL,
    student TEXT NOT NULL,
    stage TEXT NOT NULL,
    params TEXT NOT NULL,
    seed INTEGER,
    config_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('todo', 'running', 'done', 'failed')),
    metrics TEXT,
    wall_time REAL,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    output_dir TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
"""

_COLUMNS = (
    "id, kind, task, method, student, stage, params, seed, config_hash, status, metrics, wall_time, "
    "owner, heartbeat, attempts, error, output_dir, created_at, started_at, finished_at"
)




def default_owner() -> str:
    """Owner tag of this process: ``host:pid`` (the pid lets same-host peers detect a dead owner)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RunSpec:
    """What a run is: everything the study config determines, nothing about its progress."""

    id: str
    kind: str
    task: str
    method: str
    student: str
    stage: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    config_hash: str = ""
    output_dir: str = ""

    def __post_init__(self) -> None:
        # Catch typos early: a misspelt stage would silently never be scheduled by stage filters.
        if not self.id:
            raise ValueError("RunSpec.id must be non-empty")
        if self.kind not in KINDS:
            raise ValueError(f"RunSpec {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage not in STAGES:
            raise ValueError(f"RunSpec {self.id!r}: stage must be one of {STAGES}, got {self.stage!r}")


@dataclass(frozen=True)
class RunRecord:
    """One row of the registry, JSON columns decoded."""

    id: str
    kind: str
    task: str
    method: str
    student: str
    stage: str
    params: dict[str, Any]
    seed: int | None
    config_hash: str
    status: str
    metrics: dict[str, Any] | None
    wall_time: float | None
    owner: str | None
    heartbeat: float | None
    attempts: int
    error: str | None
    output_dir: str
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def done(self) -> bool:
        return self.status == "done"

    def spec(self) -> RunSpec:
        return RunSpec(
            id=self.id,
            kind=self.kind,
            task=self.task,
            method=self.method,
            student=self.student,
            stage=self.stage,
            params=dict(self.params),
            seed=self.seed,
            config_hash=self.config_hash,
            output_dir=self.output_dir,
        )


def _record(row: sqlite3.Row | tuple[Any, ...]) -> RunRecord:
    (
        rid,
        kind,
        task,
        method,
        student,
        stage,
        params,
        seed,
        config_hash,
        status,
        metrics,
        wall_time,
        owner,
        heartbeat,
        attempts,
        error,
        output_dir,
        created_at,
        started_at,
        finished_at,
    ) = row
    return RunRecord(
        id=rid,
        kind=kind,
        task=task,
        method=method,
        student=student,
        stage=stage,
        params=json.loads(params) if params else {},
        seed=seed,
        config_hash=config_hash,
        status=status,
        metrics=json.loads(metrics) if metrics is not None else None,
        wall_time=wall_time,
        owner=owner,
        heartbeat=heartbeat,
        attempts=int(attempts or 0),
        error=error,
        output_dir=output_dir or "",
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
    )


def _dumps(obj: Any) -> str:
    # sort_keys so the stored text is stable across runs (easier diffing / eyeballing in sqlite3).
    return json.dumps(obj, sort_keys=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (unknown counts as alive: never steal)."""
    if pid <= 0:  # os.kill(0 or negative) would target process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True  # unknown: err on the side of not stealing a live run
    return True


def _split_owner(owner: str) -> tuple[str, int | None]:
    host, sep, pid = owner.rpartition(":")
    if not sep:
        return owner, None
    try:
        return host, int(pid)
    except ValueError:
        return host, None


class Registry:
    """The ``runs`` table of one study (``registry.sqlite`` in the study's output folder).

    ``readonly=True`` opens an existing registry without writing anything (``kdlab status``, checks made
    before a command is accepted); it works on a read-only file too.
    """

    def __init__(
        self, path: str | Path, *, stale_after: float = 600.0, timeout: float = 60.0, readonly: bool = False
    ) -> None:
        self.path = Path(path)
        self.stale_after = float(stale_after)
        self.timeout = float(timeout)
        self.readonly = readonly
        self.hostname = socket.gethostname()
        if readonly:
            if not self.path.is_file():
                raise RegistryError(
                    f"{self.path}: no registry file; if this is a study folder whose registry was lost, "
                    f"restore it from the finished run folders with `kdlab registry rebuild --out "
                    f"{self.path.parent}`"
                )
            with self._read() as conn:
                found = self._schema_version(conn)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            found = self._create()
        if str(found) != str(SCHEMA_VERSION):
            raise RegistryError(
                f"{self.path}: registry schema version {found}, this kdlab expects {SCHEMA_VERSION}"
            )

    def _create(self) -> str:
        """Create the schema if needed (idempotent); returns the file's schema version. A new registry is
        made beside its path and linked into place, so no process ever opens a file without its schema."""
        if not self.path.exists():
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            try:
                self._write_schema(tmp)
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass  # another process linked its registry first: use that one
                except OSError:  # a file system without hard links
                    if not self.path.exists():
                        os.replace(tmp, self.path)
            finally:
                for leftover in _sidecars(tmp):
                    leftover.unlink(missing_ok=True)
        return self._write_schema(self.path)

    def _write_schema(self, path: Path) -> str:
        try:
            conn = sqlite3.connect(str(path), timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        except sqlite3.Error as e:
            raise self._translate(e) from None
        try:
            # WAL is persistent in the file; only switch when needed (the switch needs an exclusive lock).
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")  # may stay 'delete' on e.g. NFS: still correct
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            found = self._schema_version(conn)
            conn.execute("COMMIT")
            return found
        except sqlite3.Error as e:
            raise self._translate(e) from None
        finally:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()

    def _schema_version(self, conn: sqlite3.Connection) -> str:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError as e:  # no meta table: some other SQLite file
            raise RegistryError(f"{self.path} is not a kdlab run registry ({e}); {self._repair()}") from None
        if row is None:
            raise RegistryError(
                f"{self.path} is not a kdlab run registry (no schema version); {self._repair()}"
            )
        return str(row[0])

    # ------------------------------------------------------------------ plumbing

    def _repair(self) -> str:
        return (f"rebuild it from the finished run folders with `kdlab registry rebuild --out "
                f"{self.path.parent}` (the old file is kept beside it)")

    def _translate(self, e: sqlite3.Error) -> RegistryError:
        """One clear line for a SQLite failure, saying what to do about it."""
        text = str(e)
        if "readonly" in text or "read-only" in text:
            return RegistryError(
                f"{self.path}: the registry is read-only ({text}); make the file and its folder writable "
                f"(chmod u+w) to run or change the study (`kdlab status {self.path.parent}` still reads it)"
            )
        if "locked" in text or "busy" in text:
            return RegistryError(f"{self.path}: the registry stayed locked for {self.timeout:.0f}s ({text}); "
                                 "another process holds it, try again")
        if "unable to open" in text:
            return RegistryError(f"{self.path}: cannot open the registry ({text}); check that the folder "
                                 "exists and is readable and writable")
        return RegistryError(f"{self.path} is not a usable run registry ({text}); {self._repair()}")

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly and not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)):
                # A read-only file: SQLite's read-only mode. Otherwise a normal connection that only reads,
                # so the WAL side files are removed at close and the folder is left as it was.
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
            else:
                # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
                conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        except sqlite3.Error as e:
            raise self._translate(e) from None
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken at BEGIN so read-then-write is atomic."""
        if self.readonly:
            raise RegistryError(f"{self.path}: opened read-only; this command cannot change runs")
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._translate(e) from None
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        except sqlite3.Error as e:
            raise self._translate(e) from None
        finally:
            conn.close()

    @staticmethod
    def _fetch(conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return _record(row) if row is not None else None

    def _fetch_required(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        rec = self._fetch(conn, run_id)
        if rec is None:
            raise RegistryError(f"unknown run {run_id!r} in {self.path}")
        return rec

    def is_stale(self, rec: RunRecord, now: float | None = None) -> bool:
        """Whether a 'running' row's owner is gone, so the run may be claimed again.

        Same host: the pid decides (exact and immediate). Other hosts: we cannot see their
        processes, so a heartbeat older than ``stale_after`` seconds means the owner is gone.
        """
        if rec.status != "running":
            return False
        return self.owner_gone(rec.owner, rec.heartbeat if rec.heartbeat is not None else rec.started_at, now)

    def owner_gone(self, owner: str | None, beat: float | None, now: float | None = None) -> bool:
        """Whether the process `owner` (host:pid), last seen alive at `beat`, is gone: by its pid on this
        host, by a heartbeat older than ``stale_after`` on another."""
        if owner:
            host, pid = _split_owner(owner)
            if host == self.hostname and pid is not None:
                return not pid_alive(pid)
        if beat is None:
            return True
        now = time.time() if now is None else now
        return now - beat > self.stale_after

    def _claimable(self, rec: RunRecord, now: float) -> bool:
        return rec.status in ("todo", "failed") or (rec.status == "running" and self.is_stale(rec, now))

    @staticmethod
    def _take(conn: sqlite3.Connection, run_id: str, owner: str, now: float) -> None:
        conn.execute(
            "UPDATE runs SET status = 'running', owner = ?, heartbeat = ?, started_at = ?, "
            "finished_at = NULL, metrics = NULL, wall_time = NULL, attempts = attempts + 1 WHERE id = ?",
            (owner, now, now, run_id),
        )

    # ------------------------------------------------------------------ adding runs

    def _add(self, conn: sqlite3.Connection, spec: RunSpec, force: bool) -> RunRecord:
        now = time.time()
        old = self._fetch(conn, spec.id)
        fields = (
            spec.kind,
            spec.task,
            spec.method,
            spec.student,
            spec.stage,
            _dumps(spec.params),
            spec.seed,
            spec.config_hash,
            spec.output_dir,
        )
        if old is None:
            conn.execute(
                "INSERT INTO runs (kind, task, method, student, stage, params, seed, config_hash, "
                "output_dir, id, status, attempts, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'todo', 0, ?)",
                (*fields, spec.id, now),
            )
        elif old.config_hash == spec.config_hash:
            return old
        elif old.status == "done" and not force:
            raise RegistryError(
                f"run {spec.id!r} is already done with config_hash {old.config_hash!r} but the study now "
                f"gives config_hash {spec.config_hash!r}: the study changed under a finished run. "
                "Use a new output folder, or --force to redo it."
            )
        else:
            # Changed definition of an unfinished (or forced) run: the old progress is meaningless.
            conn.execute(
                "UPDATE runs SET kind = ?, task = ?, method = ?, student = ?, stage = ?, params = ?, "
                "seed = ?, config_hash = ?, output_dir = ?, status = 'todo', metrics = NULL, "
                "wall_time = NULL, owner = NULL, heartbeat = NULL, attempts = 0, error = NULL, "
                "started_at = NULL, finished_at = NULL WHERE id = ?",
                (*fields, spec.id),
            )
        rec = self._fetch(conn, spec.id)
        assert rec is not None
        return rec

    def add(self, spec: RunSpec, *, force: bool = False) -> RunRecord:
        """Register a run as 'todo' if absent.

        Same config_hash: returned unchanged. Different hash and not done: spec updated, reset to todo.
        Different hash and done: RegistryError, unless ``force`` (then reset to todo like the others).
        """
        with self._tx() as conn:
            return self._add(conn, spec, force)

    # ------------------------------------------------------------------ claiming and finishing

    def claim(self, run_id: str, owner: str | None = None) -> bool:
        """Atomically move a todo / failed / stale-running run to running for ``owner``.

        False when the run is done or running under a live owner (including ``owner`` itself).
        """
        owner = owner or default_owner()
        with self._tx() as conn:
            now = time.time()
            rec = self._fetch_required(conn, run_id)
            if not self._claimable(rec, now):
                return False
            self._take(conn, run_id, owner, now)
            return True

    def _held(self, rec: RunRecord, owner: str) -> bool:
        return rec.status == "running" and rec.owner == owner

    def heartbeat(self, run_id: str, owner: str | None = None) -> bool:
        """Refresh the heartbeat; False if ``owner`` no longer holds the run (it was taken over)."""
        owner = owner or default_owner()
        with self._tx() as conn:
            rec = self._fetch_required(conn, run_id)
            if not self._held(rec, owner):
                return False
            conn.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (time.time(), run_id))
            return True

    def finish(
        self, run_id: str, metrics: dict[str, Any], wall_time: float, owner: str | None = None
    ) -> None:
        """Mark done with its metrics. Raises RegistryError if ``owner`` no longer holds the run
        (declared stale and re-claimed, reset, or redefined): its result must not overwrite another's."""
        owner = owner or default_owner()
        metrics_text = _dumps(metrics)  # serialise before locking so a bad metric fails without side effect
        with self._tx() as conn:
            rec = self._fetch_required(conn, run_id)
            if not self._held(rec, owner):
                raise RegistryError(
                    f"run {run_id!r}: {owner} no longer holds it (status {rec.status!r}, "
                    f"owner {rec.owner!r}); result not recorded"
                )
            now = time.time()
            conn.execute(
                "UPDATE runs SET status = 'done', metrics = ?, wall_time = ?, finished_at = ?, "
                "heartbeat = ?, error = NULL WHERE id = ?",
                (metrics_text, float(wall_time), now, now, run_id),
            )

    def fail(self, run_id: str, error: str, owner: str | None = None) -> bool:
        """Mark failed, keeping the tail of ``error``. Returns False (no change) if ``owner`` no longer
        holds the run: called from error paths, so it does not raise over the original exception."""
        owner = owner or default_owner()
        if len(error) > MAX_ERROR_CHARS:
            error = "..." + error[-(MAX_ERROR_CHARS - 3) :]  # the tail holds the exception itself
        with self._tx() as conn:
            rec = self._fetch_required(conn, run_id)
            if not self._held(rec, owner):
                return False
            now = time.time()
            elapsed = now - rec.started_at if rec.started_at is not None else None
            conn.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = ?, wall_time = ? WHERE id = ?",
                (error, now, elapsed, run_id),
            )
            return True

    def release(self, run_id: str, owner: str | None = None) -> bool:
        """Give a held run back as 'todo' (e.g. on KeyboardInterrupt). False if not held by ``owner``."""
        owner = owner or default_owner()
        with self._tx() as conn:
            rec = self._fetch_required(conn, run_id)
            if not self._held(rec, owner):
                return False
            conn.execute(
                "UPDATE runs SET status = 'todo', owner = NULL, heartbeat = NULL, started_at = NULL "
                "WHERE id = ?",
                (run_id,),
            )
            return True

    def reset(self, run_id: str) -> None:
        """Force a run back to 'todo' whatever its state (the user asked to redo it).

        A live owner of a reset run will have its ``finish`` refused.
        """
        with self._tx() as conn:
            self._fetch_required(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = 'todo', metrics = NULL, wall_time = NULL, owner = NULL, "
                "heartbeat = NULL, attempts = 0, error = NULL, started_at = NULL, finished_at = NULL "
                "WHERE id = ?",
                (run_id,),
            )

    def rekey(self, run_id: str, old_hash: str, new_hash: str) -> bool:
        """Give a finished run recorded under `old_hash` the config hash `new_hash` (the same settings,
        hashed the way this kdlab does: `identity.rekey_finished_runs`). False if its hash is not
        `old_hash` (any more)."""
        with self._tx() as conn:
            changed = conn.execute(
                "UPDATE runs SET config_hash = ? WHERE id = ? AND config_hash = ? AND status = 'done'",
                (new_hash, run_id, old_hash),
            ).rowcount
        return changed == 1

    def restore(self, records: Iterable[RunRecord]) -> list[str]:
        """Insert finished runs exactly as recorded (``rebuild_registry``), in one transaction; ids already
        present are left alone. Returns the ids inserted."""
        inserted = []
        with self._tx() as conn:
            for r in records:
                if self._fetch(conn, r.id) is not None:
                    continue
                conn.execute(
                    f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})",
                    (r.id, r.kind, r.task, r.method, r.student, r.stage, _dumps(r.params), r.seed,
                     r.config_hash, r.status, None if r.metrics is None else _dumps(r.metrics), r.wall_time,
                     None, None, r.attempts, r.error, r.output_dir, r.created_at, r.started_at,
                     r.finished_at),
                )
                inserted.append(r.id)
        return inserted

    # ------------------------------------------------------------------ queries

    def get(self, run_id: str) -> RunRecord | None:
        with self._read() as conn:
            return self._fetch(conn, run_id)

    def runs(
        self,
        *,
        task: str | None = None,
        method: str | None = None,
        stage: str | None = None,
        status: str | None = None,
        kind: str | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, in insertion order."""
        where: list[str] = []
        args: list[Any] = []
        for col, val in (
            ("task", task),
            ("method", method),
            ("stage", stage),
            ("status", status),
            ("kind", kind),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid"
        with self._read() as conn:
            return [_record(row) for row in conn.execute(sql, args).fetchall()]

    def counts(self) -> dict[str, int]:
        """Number of runs per status (every status present, zero included)."""
        out = dict.fromkeys(STATUSES, 0)
        with self._read() as conn:
            for status, n in conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
                out[status] = n
        return out

    # ------------------------------------------------------------------ study-level notes

    def note(self, key: str) -> Any:
        """A study-level value kept in the meta table (JSON), or None."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"note:{key}",)).fetchone()
        return json.loads(row[0]) if row is not None else None

    def set_note(self, key: str, value: Any) -> None:
        text = _dumps(value)
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"note:{key}", text))

    def claim_driver(self, info: dict[str, Any], owner: str | None = None) -> dict[str, Any] | None:
        """Make ``owner`` the study's one driver (a process that alone schedules its runs, e.g. the Ray
        executor). None when it is now the driver (or already was); else the live driver's note, unchanged.
        A driver whose process is gone (pid on this host, heartbeat elsewhere) is replaced."""
        owner = owner or default_owner()
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'note:driver'").fetchone()
            held = json.loads(row[0]) if row is not None else None
            now = time.time()
            if held and held.get("owner") != owner and not self.owner_gone(held.get("owner"),
                                                                           held.get("heartbeat"), now):
                return held
            mine = held if held and held.get("owner") == owner else {"started": now}
            note = dict(mine, **info, owner=owner, heartbeat=now)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('note:driver', ?)",
                         (_dumps(note),))
            return None

    def beat_driver(self, owner: str | None = None) -> bool:
        """Refresh the driver's heartbeat; False if ``owner`` is no longer the driver."""
        return self._update_driver(owner, release=False)

    def release_driver(self, owner: str | None = None) -> bool:
        """Give the study up (the driver ends); False if ``owner`` was not its driver."""
        return self._update_driver(owner, release=True)

    def _update_driver(self, owner: str | None, *, release: bool) -> bool:
        owner = owner or default_owner()
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'note:driver'").fetchone()
            held = json.loads(row[0]) if row is not None else None
            if not held or held.get("owner") != owner:
                return False
            if release:
                conn.execute("DELETE FROM meta WHERE key = 'note:driver'")
            else:
                held["heartbeat"] = time.time()
                conn.execute("UPDATE meta SET value = ? WHERE key = 'note:driver'", (_dumps(held),))
            return True

    def live_driver(self) -> dict[str, Any] | None:
        """The note of the study's driver while its process lives, else None."""
        held = self.note("driver")
        if held and not self.owner_gone(held.get("owner"), held.get("heartbeat")):
            return held
        return None

    def other_live_hosts(self) -> dict[str, str]:
        """Hosts other than this one whose processes hold running runs of the study now (host: a run id):
        the study folder is then shared across hosts."""
        hosts: dict[str, str] = {}
        for rec in self.runs(status="running"):
            host = _split_owner(rec.owner or "")[0]
            if rec.owner and host != self.hostname and not self.is_stale(rec):
                hosts.setdefault(host, rec.id)
        return hosts

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r}, stale_after={self.stale_after})"


# ---------------------------------------------------------------------- where the registry may live

# File systems that span hosts, where SQLite's file locking (and WAL's shared memory) cannot be trusted.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs", "beegfs", "panfs",
    "wekafs", "ceph", "glusterfs", "ocfs2", "gfs2", "fuse.sshfs", "fuse.ceph", "fuse.glusterfs",
    "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.rclone", "fuse.cephfs", "fuse.lustre",
})
SHARED_REGISTRY_ENV = "KDLAB_ALLOW_SHARED_REGISTRY"  # "1": the user vouches for the file system's locking


def filesystem_type(path: str | Path, mounts: str | Path = "/proc/mounts") -> str | None:
    """The type of the file system `path` lies on, from a mounts table (Linux `/proc/mounts` format: the
    longest mount point above the path); None when the table cannot be read."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None  # not Linux, or no /proc: nothing to say
    target = Path(os.path.abspath(Path(path).expanduser()))
    with suppress(OSError):
        target = target.resolve()
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Mount points escape spaces and tabs as octal (\040, \011).
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]))
        if target == point or point in target.parents:
            depth = len(point.parts)
            if best is None or depth >= best[0]:
                best = (depth, fields[2])
    return best[1] if best else None


def network_filesystem(path: str | Path, mounts: str | Path = "/proc/mounts") -> str | None:
    """The network file system type `path` lies on (nfs4, lustre, ...), or None for a local one."""
    kind = filesystem_type(path, mounts)
    return kind if kind is not None and kind.lower() in NETWORK_FILESYSTEMS else None


def check_local_sharing(registry: Registry, mounts: str | Path = "/proc/mounts") -> str | None:
    """Refuse a local-executor process on a registry that processes on another host are using now: SQLite's
    locks are not reliable across hosts (its documentation warns against NFS), so several hosts must go
    through one driver (`--executor ray`). Returns a note for the log when the registry lies on a network
    file system but only this host uses it (allowed); ``KDLAB_ALLOW_SHARED_REGISTRY=1`` skips the check."""
    if os.environ.get(SHARED_REGISTRY_ENV) == "1":
        return None
    kind = network_filesystem(registry.path.parent, mounts)
    others = registry.other_live_hosts()
    if others:
        where = f" (it lies on {kind})" if kind else ""
        shown = ", ".join(f"{host} (running {run})" for host, run in sorted(others.items()))
        raise RegistryError(
            f"{registry.path}{where} is in use by another host now: {shown}. Several hosts cannot share a "
            "SQLite registry safely (broken file locking on network file systems); run the study across "
            "hosts with `kdlab sweep --executor ray` (one driver writes the registry), or run every "
            f"process on one host. {SHARED_REGISTRY_ENV}=1 skips this check"
        )
    if kind:
        return (f"{registry.path} lies on {kind}: fine for processes on this host; to spread a study over "
                "several hosts use `--executor ray`")
    return None


# ---------------------------------------------------------------------- run records and rebuilding


def write_run_record(folder: str | Path, record: RunRecord) -> None:
    """Keep a finished run's row in its folder as ``run.json``, so the registry can be rebuilt from it."""
    data = {k: v for k, v in dataclasses.asdict(record).items() if k not in ("owner", "heartbeat")}
    atomic_write_text(Path(folder) / RUN_RECORD, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_run_record(path: str | Path) -> RunRecord:
    """The finished run a ``run.json`` describes; RegistryError (naming the file) if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(RunRecord)} - {"owner", "heartbeat"}
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"missing {missing}")
        record = RunRecord(**{k: data[k] for k in names}, owner=None, heartbeat=None)
        if record.status != "done" or not isinstance(record.params, dict):
            raise ValueError(f"status {record.status!r} (only finished runs are recorded)")
        if not _RUN_ID.match(record.id) or ".." in record.id:
            raise ValueError(f"run id {record.id!r} is not a plain folder name")
        record.spec()  # validates kind and stage
    except (OSError, ValueError, TypeError) as e:
        raise RegistryError(f"{path}: not a finished-run record ({e})") from None
    return record


def find_run_records(study_dir: str | Path) -> tuple[list[RunRecord], list[str]]:
    """The finished runs recorded under a study folder (``*/*/run.json``: runs/<id>/, teacher/<task>/, ...),
    each with ``output_dir`` set to the folder it was found in; and the files skipped, with why. A record
    outside the study folder (through a link) or a second record of the same run is skipped."""
    study = Path(study_dir)
    root = study.resolve()
    records: dict[str, RunRecord] = {}
    skipped: list[str] = []
    for path in sorted(study.glob(f"*/*/{RUN_RECORD}")):
        if not path.resolve().is_relative_to(root):
            skipped.append(f"{path}: outside the study folder")
            continue
        try:
            record = read_run_record(path)
        except RegistryError as e:
            skipped.append(str(e))
            continue
        if record.id in records:
            kept = records[record.id].output_dir
            skipped.append(f"{path}: a second record of run {record.id!r} (kept {kept})")
            continue
        records[record.id] = dataclasses.replace(record, output_dir=str(path.parent))
    return list(records.values()), skipped


@dataclass
class RebuildResult:
    restored: list[str]  # run ids put back as done
    skipped: list[str]  # run.json files not used, with why
    backup: Path | None  # where the old registry file was moved (None: there was none)


@contextmanager
def _study_lock(study_dir: Path) -> Iterator[None]:
    """One process at a time rebuilds a study's registry (two workers may find it missing together)."""
    with open(study_dir / ".registry.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sidecars(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def local_run_folder(study: Path, output_dir: str) -> Path | None:
    """A row's folder inside this study folder: its output_dir, or (a study folder that was moved) the same
    last two parts (runs/<id>, teacher/<task>, ...) under the study folder; None if neither exists."""
    root = study.resolve()
    if not output_dir:
        return None
    folder = Path(output_dir)
    if not folder.resolve().is_relative_to(root):
        folder = study.joinpath(*folder.parts[-2:])
    return folder if folder.is_dir() and folder.resolve().is_relative_to(root) else None


def _backfill(registry: Registry, study: Path) -> None:
    """Write ``run.json`` for finished runs of a readable registry that have none (runs finished before
    kdlab kept them), so rebuilding from the folders keeps them."""
    for record in registry.runs(status="done"):
        folder = local_run_folder(study, record.output_dir)
        if folder is not None and not (folder / RUN_RECORD).is_file() and _RUN_ID.match(record.id):
            write_run_record(folder, record)


def _move_aside(path: Path) -> Path:
    """Move a registry file (and its WAL files) to ``registry.sqlite.bak-<time>``; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak-{stamp}-{n}")
    for src, dst in zip(_sidecars(path), _sidecars(backup), strict=True):
        if src.exists():
            os.replace(src, dst)
    return backup


def rebuild_registry(study_dir: str | Path, *, only_if_missing: bool = False) -> RebuildResult | None:
    """Rebuild ``registry.sqlite`` from the ``run.json`` of every finished run folder of a study.

    A readable old registry first writes the records its finished runs lack, then it is moved aside (as
    ``registry.sqlite.bak-<time>``) like an unreadable one; the new registry is built beside and renamed into
    place. Runs that were not finished are simply added again by the next command. ``only_if_missing``: do
    nothing (None) when a registry file exists, e.g. another worker rebuilt it first.
    """
    study = Path(study_dir)
    if not study.is_dir():
        raise RegistryError(f"{study}: no such study folder")
    path = Layout(study).registry
    with _study_lock(study):
        if only_if_missing and path.exists():
            return None
        backup = None
        if path.exists():
            try:
                old = Registry(path, readonly=True)
                _backfill(old, study)
                conn = sqlite3.connect(str(path), timeout=old.timeout)
                try:  # fold the WAL into the file, so the backup is one self-contained file
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    conn.close()
            except (RegistryError, sqlite3.Error):
                pass  # unreadable: nothing to keep but the file itself, moved aside below
            backup = _move_aside(path)
        records, skipped = find_run_records(study)
        tmp = study / f".{REGISTRY_NAME}.rebuild-{os.getpid()}"
        for p in _sidecars(tmp):
            p.unlink(missing_ok=True)
        restored = Registry(tmp).restore(records)
        # Every connection is closed, so SQLite has folded its WAL into the file and removed it.
        for p in _sidecars(tmp)[1:]:
            p.unlink(missing_ok=True)
        os.replace(tmp, path)
    return RebuildResult(restored=restored, skipped=skipped, backup=backup)
