"""Runs each run of a study once, whoever asks: claimed in the registry (so several processes share a study),
kept alive by a heartbeat (so a dead owner's run is reclaimed), decided by the leading rank (so a
multi-process launch trains one run on every rank), recorded as done or failed with its metrics.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab.distributed import Ranks
from kdlab.errors import StudyError
from kdlab.registry import RUN_RECORD, Registry, RunRecord, RunSpec, default_owner, write_run_record

log = logging.getLogger("kdlab")

Body = Callable[[], dict[str, Any]]  # does the run's work, returns its metrics


class Heartbeat:
    """Refreshes a claimed run's heartbeat while it runs, so workers on other hosts see it is alive."""

    def __init__(self, registry: Registry, run: str, every: float = 60.0):
        self._stop = threading.Event()
        owner = default_owner()  # the claiming thread's owner id, not this thread's
        self._thread = threading.Thread(target=self._beat, args=(registry, run, owner, every), daemon=True)
        self._thread.start()

    def _beat(self, registry: Registry, run: str, owner: str, every: float) -> None:
        while not self._stop.wait(every):
            registry.heartbeat(run, owner)

    def stop(self) -> None:
        self._stop.set()


class Runner:
    def __init__(
        self,
        registry: Registry,
        ranks: Ranks,
        out: Path,
        *,
        force: bool = False,
        describe: Callable[[RunSpec, dict[str, Any]], str] = lambda spec, metrics: "",
    ):
        """`force`: redo finished runs whose settings changed (the registry refuses otherwise); `describe`:
        the metrics of a finished run as one short text for the status line."""
        self.registry = registry
        self.ranks = ranks
        self.out = out
        self.force = force
        self.describe = describe
        self._tried: set[str] = set()  # runs this process attempted: a failure is not retried in a loop

    def execute(
        self, spec: RunSpec, body: Body, *, force: bool = False, collective: bool = False
    ) -> RunRecord | None:
        """Run `body` once for `spec` unless it is done, held by another live process, or already failed
        in this process. Returns the run's record, or None while another process holds it. `force` redoes
        a finished run whose settings changed. Under a multi-process launch the leader decides and records;
        a `collective` body (training) runs on every rank, any other body on the leader alone."""
        decision = self.begin(spec, force=force) if self.ranks.leader else None
        decision = self.ranks.share(decision)
        if decision == "busy":
            return None
        if decision == "skip":
            return self.registry.get(spec.id)
        self._tried.add(spec.id)
        start = time.perf_counter()
        beating = Heartbeat(self.registry, spec.id) if self.ranks.leader else None
        metrics: dict[str, Any] = {}
        error = None
        try:
            if collective or self.ranks.leader:
                metrics = body()
        except KeyboardInterrupt:
            if self.ranks.leader:
                self.registry.release(spec.id)
            raise
        except Exception as e:
            # One broken run must not stop the study: record it, go on, and report it at the end.
            error = (f"{type(e).__name__}: {e}", traceback.format_exc())
            log.debug("run %s failed", spec.id, exc_info=True)
        finally:
            if beating is not None:
                beating.stop()
            gc.collect()
        errors = [e for e in self.ranks.gather(error) if e is not None]
        if self.ranks.leader:
            joined = (errors[0][0], "\n".join(tb for _, tb in errors)) if errors else None
            self.end(spec, metrics, joined, time.perf_counter() - start)
        self.ranks.barrier()
        return self.registry.get(spec.id)

    def begin(self, spec: RunSpec, *, force: bool = False) -> str:
        """The leader's decision on a run: "skip" (done, or failed already in this process), "busy" (another
        live process holds it) or "run" (claimed now for this process, its old record removed)."""
        record = self.registry.add(spec, force=force or self.force)
        if record.status == "done" or (record.status == "failed" and spec.id in self._tried):
            return "skip"
        if not self.registry.claim(spec.id):
            return "busy"
        self._tried.add(spec.id)
        folder = self.record_folder(spec)
        if folder is not None:
            # The run is being redone: its old record must not restore an old result after a rebuild.
            (folder / RUN_RECORD).unlink(missing_ok=True)
        return "run"

    def end(
        self,
        spec: RunSpec,
        metrics: dict[str, Any],
        error: tuple[str, str] | None,
        wall: float,
        *,
        note: str = "",
    ) -> RunRecord:
        """Record a claimed run as done with its metrics, or failed with `error` (one line, traceback), and
        say so in one status line (`note` appended: e.g. the cluster's totals)."""
        suffix = f" | {note}" if note else ""
        if error is not None:
            self.registry.fail(spec.id, error[1] or error[0])
            log.info(f"[failed] {spec.id}: {error[0].strip().splitlines()[0]}{suffix}")
        else:
            self.registry.finish(spec.id, metrics, wall)
            folder = self.record_folder(spec)
            if folder is not None and folder.is_dir():
                # The registry row, kept with the run: `kdlab registry rebuild` restores it from here.
                write_run_record(folder, self.registry.get(spec.id))
            log.info(f"[done] {spec.id}: {self.describe(spec, metrics)} ({wall:.0f}s){suffix}")
        record = self.registry.get(spec.id)
        assert record is not None
        return record

    def execute_required(
        self,
        spec: RunSpec,
        body: Body,
        *,
        poll_seconds: float = 5.0,
        force: bool = False,
        collective: bool = False,
    ) -> RunRecord:
        """`execute` for runs later stages depend on: waits for another process, raises on failure."""
        while (record := self.execute(spec, body, force=force, collective=collective)) is None:
            force = False  # another process took the forced run: wait for it, do not reset it again
            time.sleep(poll_seconds)
        if record.status != "done":
            last = ((record.error or "").strip().splitlines() or ["no error recorded"])[-1]
            raise StudyError(
                f"{spec.id} failed ({last}); later stages need it. Traceback: `kdlab status {self.out} "
                f"--run {spec.id}`; re-run the command to retry it"
            )
        return record

    def redo_if_lost(self, spec: RunSpec, artifact_present: bool) -> None:
        """A run the registry calls done whose artifact (a model, a cache) is gone is run again."""
        record = self.registry.get(spec.id)
        if self.ranks.leader and record is not None and record.status == "done" and not artifact_present:
            self.registry.reset(spec.id)

    def record_folder(self, spec: RunSpec) -> Path | None:
        """Where a run keeps its `run.json`: its own folder, when that lies inside the study folder (a
        shared cache folder elsewhere keeps none)."""
        if not spec.output_dir:
            return None
        folder = Path(spec.output_dir)
        return folder if folder.resolve().is_relative_to(self.out.resolve()) else None
