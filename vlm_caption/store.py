"""The checkpoint directory: run.json, atomic part files, failures, the done-key index (merge.py merges it).

Layout (README: "Checkpoint layout and guarantees"):
    run.json                                   the run's settings + dir_id; a run with other settings is refused
    parts/captions-w{worker:03d}-{seq:06d}.parquet   finished rows, written tmp + rename, never rewritten;
                                               their parquet metadata names the run_id and dir_id
    failures/failures-w{worker:03d}-{seq:06d}.parquet
    quarantine/                                unreadable or foreign files, set aside with a warning (set_aside.py)
    locks/                                     who uses the dir (locks.py)
    hub_ledger.jsonl                           written by hub.py (a local record; the Hub is the truth)
    hub_keys/                                  keys of published Hub files by content id (hub_key_cache.py)
    all_captions.parquet, run_summary.json     written at the end, by the last worker to finish
    coverage.json                              written by --merge-only
    superseded/                                runs set aside by --overwrite
    compile_cache/                             torch.compile's kernels for the next launch (compile_cache.py)
A part is the unit of progress: a crash loses at most the rows not yet in a part (captioned again on resume).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write_json, atomic_write_table
from .errors import FatalError, UsageError
from .flag_checks import check_utf8_names
from .locks import DirLock
from .part_files import (FAILURES_DIR, META_DIR_ID, META_RUN_ID, PARTS_DIR, FileCheck, Part,  # noqa: F401 (store.*)
                         check_file, failure_records, list_failure_files, list_parts, read_keys, usable_file)
from .run_identity import (MODEL_IDENTITY, OPTIONAL_SETTINGS, RUN_SETTINGS, is_run_of,  # noqa: F401 (store.*)
                           SETTING_NAMES, described_differences, path_named_run_id, recorded_settings, run_id_for,
                           well_formed)
from .schema import ADDED_COLUMNS, FAILURE_SCHEMA, OUTPUT_SCHEMA  # noqa: F401  (store.* names)
from .set_aside import QUARANTINE_DIR, aside_folder, free_name, quarantine  # noqa: F401 (store.* names)

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
LEDGER = "hub_ledger.jsonl"
MERGED, SUMMARY = "all_captions.parquet", "run_summary.json"
RATE = "last_rate.json"  # the img/s a run of the dir last measured, stopped runs too: --dry-run's estimate
COVERAGE, HUB_COVERAGE = "coverage.json", "hub_coverage.json"  # --merge-only's and --check-hub's counts


def read_run_json(checkpoint_dir: Path | str) -> dict | None:
    """run.json, or None when there is none; a UsageError naming the ways out when it cannot be read."""
    info, problem = read_run_json_safe(checkpoint_dir)
    if problem is not None and problem != "missing":
        raise UsageError(f"{Path(checkpoint_dir) / RUN_JSON} is {problem}; restore the file, or set the dir's "
                         "work aside with a captioning run's --overwrite")
    return info


def open_merged(checkpoint_dir: Path) -> pq.ParquetFile:
    """A checkpoint dir's all_captions.parquet, for reading; one line when the dir or the file is not a run's."""
    check_utf8_names([("checkpoint dir", str(checkpoint_dir))])  # (pyarrow's UnicodeEncodeError: a traceback)
    if not checkpoint_dir.is_dir():  # a typo'd path: "has no all_captions.parquet" would send them to rerun
        what = "is a file, not a directory" if checkpoint_dir.exists() else "does not exist"
        raise UsageError(f"{checkpoint_dir} {what}; give the --checkpoint-dir of a captioning run")
    merged = checkpoint_dir / MERGED
    if not merged.is_file():
        raise UsageError(f"{checkpoint_dir} has no {MERGED}; run batched_image_inference.py "
                         "(or its --merge-only) on it first")
    try:
        merged_file = pq.ParquetFile(merged)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {merged}: {e}") from None
    if "key" not in merged_file.schema_arrow.names:  # another tool's file of that name: a KeyError traceback
        raise UsageError(f"{merged} is no captioning run's (it has no key column: "
                         f"{', '.join(merged_file.schema_arrow.names[:6]) or 'no columns'})")
    return merged_file


def read_run_json_safe(checkpoint_dir: Path | str) -> tuple[dict | None, str | None]:
    """(run.json, None), or (None, why not: "missing" or "unreadable (...)")."""
    path = Path(checkpoint_dir) / RUN_JSON
    if not path.exists():
        return None, "missing"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if not well_formed(info):
        return None, "unreadable (not a run description)"
    return info, None


# ---------------------------------------------------------------- the store

class CheckpointStore:
    """One worker's view of a checkpoint dir: it reads everybody's parts, writes only its own."""

    def __init__(self, checkpoint_dir: Path | str, worker: int, quarantine_bad: bool = True,
                 schema: pa.Schema = OUTPUT_SCHEMA, num_workers: int = 1):
        self.dir = Path(checkpoint_dir)
        self.worker = worker
        self.schema = schema  # of the parts: the registry's columns plus --keep-columns
        self.quarantine_bad = quarantine_bad  # False: only report bad files (--dry-run changes nothing)
        self.parts_dir = self.dir / PARTS_DIR
        self.failures_dir = self.dir / FAILURES_DIR
        self.run_id: str | None = None
        self.dir_id: str | None = None
        if bad := [d for d in (self.parts_dir, self.failures_dir, self.dir / "locks") if d.exists() and not d.is_dir()]:
            raise UsageError(f"{bad[0]} is a file, not a directory: move it aside and rerun")  # before any work
        self.lock = DirLock(self.dir, worker, num_workers)
        self._next_part = self._next_seq(list_parts(self.dir))
        self._next_failure = self._next_seq(list_failure_files(self.dir))

    def _next_seq(self, files: list[Part]) -> int:
        mine = [p.seq for p in files if p.worker == self.worker]
        return max(mine, default=-1) + 1

    # -- run.json and who holds the dir

    def open_run(self, settings: dict, overwrite: bool, wait_for_leader: bool = False,
                 leader_timeout: float = 600.0, find_run_id: Callable[[], str | None] | None = None) -> str:
        """Take this worker's lock, then check or write run.json; returns the run_id.

        Refuses a second process with this worker id, a process whose worker count differs from a live one's
        (the two would split the keys differently and caption some twice), and any process whose settings
        differ from those of a live process of the dir. run.json is only (re)written while no other process
        holds the dir. A dir holding another run's captions is refused unless --overwrite; a dir whose
        run.json is gone re-adopts its parts only when their recorded run id is this run's. `find_run_id`: asked,
        by the one process that writes run.json, for the id a new run.json takes (the Hub's run of these settings in
        another spelling, pipeline.published_as); None there, or no callable: these settings' own id.
        """
        run_id = run_id_for(settings)
        holder = self.lock.take_worker()
        if holder is not None:
            raise UsageError(f"{self.dir} is in use by {holder}; wait for it to end, or use another "
                             "--checkpoint-dir / --worker-index")
        # Numbered again now that the worker id is ours: a process of this id that ended since __init__ may
        # have written one more part.
        self._next_part = self._next_seq(list_parts(self.dir))
        self._next_failure = self._next_seq(list_failure_files(self.dir))
        others = self.lock.other_worker_counts()
        if others:
            self.lock.release()
            raise UsageError(f"{self.dir} is in use by {'; '.join(others)}: live workers must split the keys "
                             f"the same way (this one is worker {self.worker} of {self.lock.num_workers}); wait "
                             "for them to end, or use the same --num-workers / world size")
        try:
            return self._open_run(settings, run_id, overwrite, wait_for_leader, leader_timeout, find_run_id)
        except TimeoutError:  # run.lock held exclusively all along: the last worker's merge and card, usually
            holders = "; ".join(self.lock.holders()) or self.lock.run_holder() or "another process"
            self.lock.release()
            raise UsageError(f"{self.dir} stayed locked by {holders} (the last worker of a run merges the dir and "
                             "writes the card under this lock); wait for it to end, then rerun") from None
        except BaseException:
            self.lock.release()
            raise

    def _open_run(self, settings: dict, run_id: str, overwrite: bool, wait_for_leader: bool,
                  leader_timeout: float, find_run_id: Callable[[], str | None] | None) -> str:
        deadline = time.monotonic() + leader_timeout
        while True:
            existing, _ = read_run_json_safe(self.dir)
            if existing is not None and is_run_of(existing, settings):
                self.lock.share_run()
                return self._adopt(existing)
            if wait_for_leader:  # other ranks let their machine's LOCAL_RANK 0 set the dir up
                if time.monotonic() > deadline:
                    raise FatalError(f"waited {leader_timeout:.0f} s for LOCAL_RANK 0 of this machine (the rank that "
                                     f"sets the dir up) to write {self.dir / RUN_JSON}: did it start?")
                time.sleep(0.5)
                continue
            if self.lock.take_run(exclusive=True):
                break
            # Held by others: maybe a worker of this very run that wrote run.json since the read above, or that
            # is writing it now (workers of a Slurm array start together on a new dir): none yet, so wait.
            existing, _ = read_run_json_safe(self.dir)
            if existing is not None and is_run_of(existing, settings):
                continue
            if existing is None and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            holders = "; ".join(self.lock.holders()) or "another process"
            raise UsageError(f"{self.dir} is in use by {holders} with other settings (run "
                             f"{(existing or {}).get('run_id', 'unknown')}); wait for it to end, or use another "
                             "--checkpoint-dir")
        try:  # the dir is ours alone now
            # Asked here only: one Hub lookup per dir, where each worker starting on a new dir made one (1 + a
            # download per other run of the repo each: 64 workers, 20 runs, ~1,300 requests at once).
            run_id = (find_run_id() if find_run_id is not None else None) or run_id
            return self._write_run_json(settings, run_id, overwrite)
        finally:
            self.lock.share_run()

    def _write_run_json(self, settings: dict, run_id: str, overwrite: bool) -> str:
        existing, problem = read_run_json_safe(self.dir)
        if existing is not None and is_run_of(existing, settings):  # written while we waited for the lock
            return self._adopt(existing)
        provenance = self._provenance()
        holds_work, dir_id = bool(provenance), None
        if holds_work and overwrite and (existing is not None or {r for r, _ in provenance} not in
                                         ({run_id}, {path_named_run_id(settings) or run_id})):  # its own: re-adopted
            self._set_aside((existing or {}).get("run_id", "unknown"))
        elif holds_work and existing is not None:
            diff = [k for k in (*RUN_SETTINGS, *OPTIONAL_SETTINGS) if existing.get(k) != settings.get(k)]
            if not diff and existing.get(MODEL_IDENTITY) != settings.get(MODEL_IDENTITY):
                diff = ["the files of --model (same path, other weights)"]
            # A run made before values were cut (its settings lack the limit) is continued with the limit it had.
            same = f"--template-value-chars {existing.get('template_value_chars') or 0} continues it, or " \
                if diff == ["template_value_chars"] else ""
            differences = described_differences(diff, existing, settings) or "run_id"
            raise UsageError(
                f"{self.dir} holds run {existing.get('run_id')} with other settings ({differences}); "
                f"{same}use another --checkpoint-dir, or --overwrite to set that run aside and start over")
        elif holds_work:  # run.json missing or unreadable: adopt the parts only if they say they are ours
            runs = {r for r, _ in provenance}
            path_named = path_named_run_id(settings)  # None for a Hub model: parts naming no run are not its
            if path_named is not None and runs == {path_named}:  # parts of an earlier version's run of this path
                run_id, settings = next(iter(runs)), {k: v for k, v in settings.items() if k != MODEL_IDENTITY}
            if runs != {run_id}:
                named = ", ".join(sorted(r or "unrecorded" for r in runs))
                raise UsageError(
                    f"{self.dir}: run.json is {problem} and the dir holds parts of run(s) {named}, not of this "
                    f"run {run_id}; rerun with the settings that made them to re-adopt them, or pass --overwrite "
                    "to set them aside and start over")
            dir_id = next((d for _, d in provenance if d), None)
            log.warning("%s: run.json was %s; re-adopted the parts of run %s", self.dir, problem, run_id)
        elif existing is not None:
            log.info("%s: replacing the settings of run %s, which captioned nothing", self.dir, existing["run_id"])
        if problem not in (None, "missing") and (self.dir / RUN_JSON).exists():  # kept, never overwritten
            quarantine(self.dir, self.dir / RUN_JSON, problem, then="it is written anew for this run")
        from . import __version__

        info = {"run_id": run_id, "dir_id": dir_id or uuid.uuid4().hex[:12], "code_version": __version__,
                # Milliseconds: the card orders runs by it (newest = default config), and runs can start in one second.
                "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                # Which keys are settings: a later version's setting this one does not know makes its run another
                # run, even where the settings this version knows read alike (run_identity.same_settings).
                SETTING_NAMES: sorted(recorded_settings(settings)), **recorded_settings(settings)}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / RUN_JSON, info)
        return self._adopt(info)

    def _adopt(self, info: dict) -> str:
        self.run_id = info["run_id"]
        self.dir_id = info.get("dir_id") or "legacy"  # dirs made before dir ids existed
        return self.run_id

    def recorded_runs(self) -> set[str | None]:
        """The run ids the dir's readable parts and failure files record (None: a part that names none)."""
        return {run_id for run_id, _ in self._provenance()}

    def _provenance(self) -> set[tuple[str | None, str | None]]:
        """(run_id, dir_id) recorded in each readable part and failure file of the dir."""
        found = set()
        for files, schema in ((list_parts(self.dir), OUTPUT_SCHEMA), (list_failure_files(self.dir), FAILURE_SCHEMA)):
            for part in files:
                check = check_file(part.path, schema)
                if check.keys is not None:
                    found.add((check.run_id, check.dir_id))
        return found

    def _set_aside(self, old_run_id: str) -> None:
        """--overwrite moves the old run into superseded/ instead of deleting finished work."""
        folder = aside_folder(self.dir, "superseded", "old runs")  # a file named so by hand was a traceback
        dest = free_name(folder / f"{old_run_id}-{time.strftime('%Y%m%dT%H%M%S')}")
        dest.mkdir(parents=True)
        for name in (RUN_JSON, PARTS_DIR, FAILURES_DIR, LEDGER, MERGED, SUMMARY, RATE, COVERAGE, HUB_COVERAGE):
            if (self.dir / name).exists():
                shutil.move(str(self.dir / name), str(dest / name))
        self._next_part = self._next_failure = 0
        log.warning("--overwrite: the previous run %s was moved to %s (to publish what it captioned and had not "
                    "pushed: --push-only --checkpoint-dir %s)", old_run_id, dest, dest)

    # -- keys already handled

    def done_keys(self) -> set[str]:
        """Keys captioned by any worker of this run (all usable parts in the dir)."""
        return set(self.done_images())

    def done_images(self) -> dict[str, str | None]:
        """key -> the sha256 of the image it was captioned from, over the keys `done_keys` gives."""
        images: dict[str, str | None] = {}
        for part in list_parts(self.dir):
            check = usable_file(self.dir, part, self.schema, self.run_id, self.quarantine_bad)
            if check is not None:
                images.update(zip(check.keys, check.sha256 or [None] * len(check.keys)))
        return images

    def failed_keys(self) -> set[str]:
        return set(self.failed_stages())

    def failed_stages(self) -> dict[str, str]:
        """key -> stage of its last recorded failure (load, decode, generate), usable files only."""
        records = failure_records(self.dir, ("key", "stage"), run_id=self.run_id, quarantine_bad=self.quarantine_bad)
        return {k: r["stage"] for k, r in records.items()}

    # -- writing

    def write_part(self, rows: list[dict]) -> Path:
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=self.schema)
        path = self.parts_dir / f"captions-w{self.worker:03d}-{self._next_part:06d}.parquet"
        self._write_new(path, table)
        self._next_part += 1
        return path

    def write_failures(self, rows: list[dict]) -> Path:
        table = pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)
        path = self.failures_dir / f"failures-w{self.worker:03d}-{self._next_failure:06d}.parquet"
        self._write_new(path, table)
        self._next_failure += 1
        return path

    def _write_new(self, path: Path, table: pa.Table) -> None:
        if path.exists():  # names never repeat within a run: another process is using our worker id
            raise FatalError(f"{path} already exists: two processes share worker id {self.worker}")
        if self.run_id is not None:
            table = table.replace_schema_metadata({META_RUN_ID: self.run_id.encode(),
                                                   META_DIR_ID: (self.dir_id or "").encode()})
        try:
            atomic_write_table(path, table)
        except OSError as e:
            raise FatalError(f"could not write {path}: {e.strerror or e}; nothing partial was left behind, "
                             "free space / fix permissions and rerun to resume") from None
