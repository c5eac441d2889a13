"""Tests for kdlab.registry: idempotent add, atomic claims, staleness, multi-process sharing, crash safety."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.registry import STATUSES, Registry, RegistryError, RunSpec, default_owner

HOST = socket.gethostname()


def spec(i: int | str = 0, *, config_hash: str = "h1", lam: float = 0.5, stage: str = "grid") -> RunSpec:
    return RunSpec(
        id=f"kd-sst2-s1-lam{lam}-seed{i}",
        kind="student",
        task="sst2",
        method="kd",
        student="s1",
        stage=stage,
        params={"lam": lam, "lr": 1e-4},
        seed=int(i) if str(i).isdigit() else None,
        config_hash=config_hash,
        output_dir=f"runs/{i}",
    )


def dead_pid() -> int:
    # A pid that surely belonged to a process which has exited and been reaped.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_for(pred, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.sqlite")


# ---------------------------------------------------------------- creation


def test_creates_file_schema_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "registry.sqlite"
    Registry(path)
    assert path.exists()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    finally:
        conn.close()
    Registry(path)  # reopening an existing file is fine


def test_schema_version_mismatch_raises(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    Registry(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.close()
    with pytest.raises(RegistryError, match="999"):
        Registry(path)


def test_runspec_validates_kind_and_stage() -> None:
    with pytest.raises(ValueError, match="kind"):
        RunSpec("x", "studnet", "t", "m", "s", "grid", {}, 1, "h")
    with pytest.raises(ValueError, match="stage"):
        RunSpec("x", "student", "t", "m", "s", "grdi", {}, 1, "h")


# ---------------------------------------------------------------- add


def test_add_is_idempotent(reg: Registry) -> None:
    first = reg.add(spec(1))
    assert first.status == "todo" and first.attempts == 0
    assert first.params == {"lam": 0.5, "lr": 1e-4} and first.seed == 1 and first.output_dir == "runs/1"
    again = reg.add(spec(1))
    assert again == first
    assert reg.counts() == {"todo": 1, "running": 0, "done": 0, "failed": 0}
    # Progress is kept too: re-adding a claimed/done run does not disturb it.
    assert reg.claim(first.id)
    reg.finish(first.id, {"acc": 0.9}, 1.0)
    assert reg.add(spec(1)).status == "done"
    assert reg.get(first.id).metrics == {"acc": 0.9}


def test_add_changed_hash_on_done_run_raises(reg: Registry) -> None:
    rid = reg.add(spec(1, config_hash="aaa")).id
    assert reg.claim(rid)
    reg.finish(rid, {"acc": 0.9}, 1.0)
    with pytest.raises(RegistryError) as exc:
        reg.add(spec(1, config_hash="bbb"))
    msg = str(exc.value)
    assert rid in msg and "aaa" in msg and "bbb" in msg
    rec = reg.get(rid)
    assert rec.status == "done" and rec.config_hash == "aaa" and rec.metrics == {"acc": 0.9}
    # --force: redo under the new definition.
    forced = reg.add(spec(1, config_hash="bbb"), force=True)
    assert forced.status == "todo" and forced.config_hash == "bbb" and forced.metrics is None


def test_add_changed_hash_on_unfinished_run_updates(reg: Registry) -> None:
    reg.add(spec(1, config_hash="aaa", lam=0.5))
    reg.add(RunSpec("other", "teacher", "sst2", "adapt", "", "teacher", {}, None, "t"))
    changed = RunSpec(
        id=spec(1).id,
        kind="student",
        task="sst2",
        method="kd",
        student="s1",
        stage="final",
        params={"lam": 0.7},
        seed=1,
        config_hash="bbb",
        output_dir="runs/new",
    )
    rec = reg.add(changed)
    assert rec.status == "todo" and rec.config_hash == "bbb"
    assert rec.params == {"lam": 0.7} and rec.stage == "final" and rec.output_dir == "runs/new"
    assert reg.get(rec.id) == rec
    # A failed run with a new definition starts over: todo, attempt count cleared, error gone.
    assert reg.claim(rec.id)
    assert reg.fail(rec.id, "boom")
    rec2 = reg.add(spec(1, config_hash="ccc"))
    assert rec2.status == "todo" and rec2.attempts == 0 and rec2.error is None and rec2.config_hash == "ccc"
    # A running run redefined under its owner: reset, and the old owner's result is refused.
    assert reg.claim(rec.id, owner="a:1")
    assert reg.add(spec(1, config_hash="ddd")).status == "todo"
    with pytest.raises(RegistryError):
        reg.finish(rec.id, {"acc": 1.0}, 1.0, owner="a:1")
    # Insertion order is unchanged by the update.
    assert [r.id for r in reg.runs()] == [rec.id, "other"]


# ---------------------------------------------------------------- claim


def test_claim_live_owner_blocks_second_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    r1, r2 = Registry(path), Registry(path)
    rid = r1.add(spec(1)).id
    assert r1.claim(rid)  # default owner: this (live) process
    rec = r2.get(rid)
    assert rec.status == "running" and rec.owner == default_owner() and rec.attempts == 1
    assert rec.heartbeat is not None and rec.started_at is not None
    assert not r2.claim(rid, owner="worker:2")
    assert not r2.claim(rid)  # not even the same owner twice
    assert r2.get(rid).attempts == 1


def test_done_run_is_never_claimed(reg: Registry) -> None:
    rid = reg.add(spec(1)).id
    assert reg.claim(rid)
    reg.finish(rid, {"acc": 0.5}, 2.5)
    assert not reg.claim(rid)
    assert not reg.claim(rid, owner="someone:else")
    rec = reg.get(rid)
    assert rec.status == "done" and rec.attempts == 1 and rec.wall_time == 2.5 and rec.finished_at is not None


def test_failed_run_is_claimed_again(reg: Registry) -> None:
    rid = reg.add(spec(1)).id
    assert reg.claim(rid)
    assert reg.fail(rid, "Traceback ...\nValueError: nan loss")
    rec = reg.get(rid)
    assert rec.status == "failed" and "nan loss" in rec.error
    assert reg.claim(rid)
    rec = reg.get(rid)
    assert rec.status == "running" and rec.attempts == 2


def test_claim_unknown_run_raises(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="nope"):
        reg.claim("nope")


# ---------------------------------------------------------------- staleness


def test_dead_owner_on_this_host_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    r1, r2 = Registry(path), Registry(path)
    dead, live = r1.add(spec(1)).id, r1.add(spec(2)).id
    assert r1.claim(dead, owner=f"{HOST}:{dead_pid()}")
    assert r1.claim(live, owner=f"{HOST}:{os.getpid()}")
    # Default stale_after is 10 minutes, so only the pid check can make it stale.
    assert r2.claim(dead)
    rec = r2.get(dead)
    assert rec.owner == default_owner() and rec.attempts == 2
    assert not r2.claim(live, owner="x:1")
    # A worker walking the runs also picks dead-owner runs, and skips live ones.
    assert r1.claim(live, owner=f"{HOST}:{os.getpid()}") is False
    assert r1.fail(dead, "x")
    assert r1.claim(dead, owner=f"{HOST}:{dead_pid()}")
    assert _claim_any(r2, "y:1").id == dead


def test_old_heartbeat_is_stale_after_timeout(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    stale_after = 1.0
    r1 = Registry(path, stale_after=stale_after)
    rid = r1.add(spec(1)).id
    other = "some-other-host.example:4242"  # cannot check its pid: only the heartbeat counts
    t0 = time.time()
    assert r1.claim(rid, owner=other)
    assert not r1.claim(rid)
    time.sleep(0.6)
    assert r1.heartbeat(rid, other)  # the owner is alive and says so
    time.sleep(0.6)
    assert time.time() - t0 > stale_after  # older than stale_after since the claim, but not the heartbeat
    assert not r1.claim(rid)
    assert _claim_any(r1) is None
    time.sleep(0.6)
    assert r1.claim(rid)
    rec = r1.get(rid)
    assert rec.owner == default_owner() and rec.attempts == 2
    # The previous owner has lost the run: its heartbeat and finish are refused.
    assert not r1.heartbeat(rid, other)
    with pytest.raises(RegistryError):
        r1.finish(rid, {"acc": 0.1}, 1.0, owner=other)


# ---------------------------------------------------------------- finish / fail / release / reset


def test_finish_by_non_owner_is_refused(reg: Registry) -> None:
    rid = reg.add(spec(1)).id
    with pytest.raises(RegistryError):
        reg.finish(rid, {"acc": 1.0}, 1.0)  # never claimed
    assert reg.claim(rid, owner="a:1")
    with pytest.raises(RegistryError, match="b:2"):
        reg.finish(rid, {"acc": 1.0}, 1.0, owner="b:2")
    assert not reg.fail(rid, "x", owner="b:2")
    assert not reg.release(rid, owner="b:2")
    rec = reg.get(rid)
    assert rec.status == "running" and rec.owner == "a:1" and rec.metrics is None
    reg.finish(rid, {"acc": 0.8}, 3.0, owner="a:1")
    rec = reg.get(rid)
    assert rec.status == "done" and rec.metrics == {"acc": 0.8} and rec.owner == "a:1"
    with pytest.raises(RegistryError):
        reg.finish(rid, {"acc": 0.0}, 1.0, owner="a:1")  # done already: no overwrite
    assert reg.get(rid).metrics == {"acc": 0.8}


def test_fail_truncates_error_to_tail(reg: Registry) -> None:
    rid = reg.add(spec(1)).id
    assert reg.claim(rid)
    assert reg.fail(rid, "x" * 10_000 + "FinalError: the end")
    err = reg.get(rid).error
    assert len(err) <= 4000 and err.endswith("FinalError: the end")


def test_release_and_reset(reg: Registry) -> None:
    rid = reg.add(spec(1)).id
    assert reg.claim(rid)
    assert reg.release(rid)
    rec = reg.get(rid)
    assert rec.status == "todo" and rec.owner is None
    assert not reg.release(rid)
    assert reg.claim(rid)
    reg.finish(rid, {"acc": 0.3}, 1.0)
    reg.reset(rid)
    rec = reg.get(rid)
    assert rec.status == "todo" and rec.metrics is None and rec.attempts == 0 and rec.owner is None
    assert reg.claim(rid)
    with pytest.raises(RegistryError):
        reg.reset("unknown")


def test_runs_filters_and_counts(reg: Registry) -> None:
    reg.add(spec(1, stage="grid"))
    reg.add(spec(2, stage="final"))
    reg.add(RunSpec("teacher-sst2", "teacher", "sst2", "adapt", "", "teacher", {"lr": 1e-5}, None, "t"))
    reg.add(RunSpec("kd-qnli", "student", "qnli", "kd", "s1", "grid", {}, 1, "q"))
    assert reg.claim(spec(1).id)
    reg.finish(spec(1).id, {}, 1.0)
    assert reg.claim(spec(2).id)
    assert [r.id for r in reg.runs(task="sst2", kind="student")] == [spec(1).id, spec(2).id]
    assert [r.id for r in reg.runs(stage="teacher")] == ["teacher-sst2"]
    assert [r.id for r in reg.runs(status="done")] == [spec(1).id]
    assert [r.id for r in reg.runs(method="kd", stage="grid", status="todo")] == ["kd-qnli"]
    assert reg.get("teacher-sst2").seed is None
    assert reg.get("missing") is None
    assert reg.counts() == {"todo": 2, "running": 1, "done": 1, "failed": 0}
    assert reg.get(spec(1).id).spec() == spec(1)


# ---------------------------------------------------------------- multi-process

# Worker functions live at module level so the spawn context can import them in the children.


def _claim_any(reg: Registry, owner: str | None = None):
    """Claim the first run that can be claimed, as a worker walking the study's runs does; None: no more."""
    return next((r for r in reg.runs() if r.status != "done" and reg.claim(r.id, owner)), None)


def _drain_worker(path: str, name: str, out: str, start, pause: float) -> None:
    reg = Registry(path)
    start.wait()
    ran = []
    while (rec := _claim_any(reg)) is not None:
        time.sleep(pause)
        reg.finish(rec.id, {"worker": name, "pid": os.getpid()}, wall_time=pause)
        ran.append(rec.id)
    Path(out).write_text(json.dumps(ran))


def _init_worker(path: str, start) -> None:
    start.wait()
    reg = Registry(path)
    for i in range(10):
        reg.add(spec(i))
        reg.add(spec(i))


def _join_all(procs, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_concurrent_workers_run_each_run_exactly_once(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.sqlite")
    reg = Registry(path)
    ids = [reg.add(spec(i)).id for i in range(40)]
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    names = [f"w{k}" for k in range(4)]
    outs = [str(tmp_path / f"{n}.json") for n in names]
    procs = [
        ctx.Process(target=_drain_worker, args=(path, n, o, start, 0.005))
        for n, o in zip(names, outs, strict=True)
    ]
    for p in procs:
        p.start()
    start.set()
    _join_all(procs)

    ran = {n: json.loads(Path(o).read_text()) for n, o in zip(names, outs, strict=True)}
    all_ran = [rid for lst in ran.values() for rid in lst]
    assert len(all_ran) == 40 and set(all_ran) == set(ids)  # each once, all covered
    assert sum(1 for lst in ran.values() if lst) >= 2  # the work really was shared
    recs = reg.runs()
    assert all(r.status == "done" for r in recs)
    assert all(r.attempts == 1 for r in recs)
    by_pid = {p.pid: n for p, n in zip(procs, names, strict=True)}
    for r in recs:
        worker = r.metrics["worker"]
        assert r.id in ran[worker]
        assert by_pid[r.metrics["pid"]] == worker
        assert r.owner == f"{HOST}:{r.metrics['pid']}"
    assert reg.counts() == {"todo": 0, "running": 0, "done": 40, "failed": 0}


def test_concurrent_creation_and_add(tmp_path: Path) -> None:
    path = str(tmp_path / "fresh" / "registry.sqlite")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_init_worker, args=(path, start)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    _join_all(procs)
    assert Registry(path).counts()["todo"] == 10


def _check_consistent(path: str) -> list:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    recs = Registry(path).runs()
    for r in recs:
        assert r.status in STATUSES
        if r.status == "done":
            assert r.metrics is not None and r.wall_time is not None and r.finished_at is not None
        if r.status == "running":
            assert r.owner and r.heartbeat is not None and r.attempts >= 1
    return recs


def test_sigkill_mid_loop_leaves_consistent_db(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.sqlite")
    reg = Registry(path)
    ids = [reg.add(spec(i)).id for i in range(200)]
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    proc = ctx.Process(target=_drain_worker, args=(path, "victim", str(tmp_path / "v.json"), start, 0.002))
    proc.start()
    start.set()
    try:
        # Kill it while it is busy claiming/finishing (tight loop: likely inside a transaction).
        wait_for(lambda: reg.counts()["done"] >= 10, what="victim progress")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert reg.counts()["done"] < 200  # it really died mid-loop

    recs = _check_consistent(path)
    running = [r for r in recs if r.status == "running"]
    assert len(running) <= 1
    assert all(r.owner == f"{HOST}:{proc.pid}" for r in running)
    # Everything left (including the victim's half-done run, if any) can be finished by a survivor.
    survivor = Registry(path)
    while (rec := _claim_any(survivor, "survivor:1")) is not None:
        survivor.finish(rec.id, {"worker": "survivor"}, 0.0, owner="survivor:1")
    recs = survivor.runs()
    assert [r.id for r in recs] == ids and all(r.status == "done" for r in recs)
    for r in running:
        assert survivor.get(r.id).attempts == 2


def _claim_and_hang(path: str) -> None:
    reg = Registry(path)
    rec = _claim_any(reg)
    assert rec is not None
    time.sleep(600)  # "training": killed before it can finish


def test_sigkilled_owner_run_is_reclaimable(tmp_path: Path) -> None:
    path = str(tmp_path / "registry.sqlite")
    reg = Registry(path)  # default stale_after (10 min): only the dead pid makes it stale
    rid = reg.add(spec(1)).id
    reg.add(spec(2))
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_claim_and_hang, args=(path,))
    proc.start()
    try:
        wait_for(lambda: reg.get(rid).status == "running", what="victim claim")
        assert not reg.claim(rid)  # owner alive: not claimable
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL

    _check_consistent(path)
    rec = reg.get(rid)
    assert rec.status == "running" and rec.owner == f"{HOST}:{proc.pid}"
    assert _claim_any(reg).id == rid
    rec = reg.get(rid)
    assert rec.owner == default_owner() and rec.attempts == 2
