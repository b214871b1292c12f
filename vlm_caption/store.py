"""The checkpoint directory: run.json, atomic part files, failures, the done-key index, merge, summary.

Layout (see DESIGN.md):
    run.json                                   settings of the run; a run with other settings is refused
    parts/captions-w{worker:03d}-{seq:06d}.parquet   finished rows, written tmp + rename, never rewritten
    failures/failures-w{worker:03d}-{seq:06d}.parquet
    hub_ledger.jsonl                           written by hub.py
    all_captions.parquet, run_summary.json     written at the end
A part is the unit of progress: a crash loses at most the rows not yet in a part, and those are
captioned again on resume because their keys are not in any part.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, atomic_write_json, atomic_write_table
from .config import FatalError, UsageError

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("original_key", pa.string()),
    ("url", pa.string()),
    ("original_caption", pa.string()),
    ("vlm_caption", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
    ("sha256", pa.string()),
    ("md5", pa.string()),
    ("tags", pa.string()),
    ("merged_tags", pa.string()),
    ("caption_model", pa.string()),
    ("caption_finish", pa.string()),
    ("caption_tokens", pa.int32()),
])
FAILURE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("original_key", pa.string()),
    ("url", pa.string()),
    ("stage", pa.string()),  # load | decode | generate
    ("error", pa.string()),
])

RUN_JSON = "run.json"
PARTS_DIR = "parts"
FAILURES_DIR = "failures"
LEDGER = "hub_ledger.jsonl"
MERGED = "all_captions.parquet"
SUMMARY = "run_summary.json"
_PART_RE = re.compile(r"^(captions|failures)-w(\d{3,})-(\d{6,})\.parquet$")
# Settings that change what a caption is; a checkpoint dir holds captions of one setting only.
RUN_SETTINGS = ("model", "prompt", "prompt_version", "max_tokens", "min_tokens", "temperature", "top_p", "seed")


class Part(NamedTuple):
    worker: int
    seq: int
    path: Path


@contextlib.contextmanager
def dir_lock(directory: Path | str, name: str = ".merge.lock"):
    """Serialise end-of-run work (merge, summary, card) between workers sharing a checkpoint dir.

    Each worker merges after its own last part, so the last merge to take the lock sees every part.
    """
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- listing

def _list(directory: Path, kind: str) -> list[Part]:
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _PART_RE.match(p.name)
            if m and m.group(1) == kind:
                found.append(Part(int(m.group(2)), int(m.group(3)), p))
    return sorted(found)


def list_parts(checkpoint_dir: Path | str) -> list[Part]:
    return _list(Path(checkpoint_dir) / PARTS_DIR, "captions")


def list_failure_files(checkpoint_dir: Path | str) -> list[Part]:
    return _list(Path(checkpoint_dir) / FAILURES_DIR, "failures")


def read_keys(files: Iterable[Part]) -> Iterable[tuple[Part, list[str]]]:
    for part in files:
        yield part, pq.read_table(part.path, columns=["key"]).column("key").to_pylist()


def read_run_json(checkpoint_dir: Path | str) -> dict | None:
    path = Path(checkpoint_dir) / RUN_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({e}); move it away or pass --overwrite") from None


def run_id_for(settings: dict) -> str:
    blob = json.dumps({k: settings[k] for k in RUN_SETTINGS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------- the store

class CheckpointStore:
    """One worker's view of a checkpoint dir: it reads everybody's parts, writes only its own."""

    def __init__(self, checkpoint_dir: Path | str, worker: int):
        self.dir = Path(checkpoint_dir)
        self.worker = worker
        self.parts_dir = self.dir / PARTS_DIR
        self.failures_dir = self.dir / FAILURES_DIR
        self._next_part = self._next_seq(list_parts(self.dir))
        self._next_failure = self._next_seq(list_failure_files(self.dir))

    def _next_seq(self, files: list[Part]) -> int:
        mine = [p.seq for p in files if p.worker == self.worker]
        return max(mine, default=-1) + 1

    # -- run.json

    def open_run(self, settings: dict, overwrite: bool, wait_for_leader: bool = False) -> str:
        """Check or write run.json; returns the run_id. Refuses a dir holding another run's captions.

        A run.json under which nothing was captioned yet (a model id with a typo, say) is simply replaced.
        """
        run_id = run_id_for(settings)
        deadline = time.monotonic() + 600
        while True:
            existing = read_run_json(self.dir)
            if existing is not None and existing.get("run_id") == run_id:
                return run_id
            holds_work = bool(list_parts(self.dir) or list_failure_files(self.dir))
            if existing is not None and holds_work and not overwrite:
                diff = [k for k in RUN_SETTINGS if existing.get(k) != settings.get(k)]
                raise UsageError(
                    f"{self.dir} holds run {existing.get('run_id')} with other settings ({', '.join(diff) or 'run_id'}); "
                    "use another --checkpoint-dir, or --overwrite to set that run aside and start over"
                )
            if not wait_for_leader:
                break
            # Other ranks let worker 0 archive the old run and write run.json.
            if time.monotonic() > deadline:
                raise FatalError(f"waited 10 min for worker 0 to write {self.dir / RUN_JSON}")
            time.sleep(0.5)
        if existing is not None and holds_work:
            self._set_aside(existing.get("run_id", "unknown"))
        elif existing is not None:
            log.info("%s: replacing the settings of run %s, which captioned nothing", self.dir, existing.get("run_id"))
        self.dir.mkdir(parents=True, exist_ok=True)
        from . import __version__

        atomic_write_json(self.dir / RUN_JSON, {"run_id": run_id, "code_version": __version__,
                                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                **{k: settings[k] for k in RUN_SETTINGS}})
        return run_id

    def _set_aside(self, old_run_id: str) -> None:
        """--overwrite moves the old run into superseded/ instead of deleting finished work."""
        dest = self.dir / "superseded" / f"{old_run_id}-{time.strftime('%Y%m%dT%H%M%S')}"
        dest.mkdir(parents=True)
        for name in (RUN_JSON, PARTS_DIR, FAILURES_DIR, LEDGER, MERGED, SUMMARY):
            if (self.dir / name).exists():
                shutil.move(str(self.dir / name), str(dest / name))
        self._next_part = self._next_failure = 0
        log.warning("--overwrite: the previous run %s was moved to %s", old_run_id, dest)

    # -- keys already handled

    def done_keys(self) -> set[str]:
        """Keys captioned by any worker of this run (all parts in the dir)."""
        keys: set[str] = set()
        for _, ks in read_keys(list_parts(self.dir)):
            keys.update(ks)
        return keys

    def failed_keys(self) -> set[str]:
        keys: set[str] = set()
        for _, ks in read_keys(list_failure_files(self.dir)):
            keys.update(ks)
        return keys

    # -- writing

    def write_part(self, rows: list[dict]) -> Path:
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["key"]), schema=OUTPUT_SCHEMA)
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
        try:
            atomic_write_table(path, table)
        except OSError as e:
            raise FatalError(f"could not write {path}: {e.strerror or e}; nothing partial was left behind, "
                             "free space / fix permissions and rerun to resume") from None


# ---------------------------------------------------------------- merge and coverage

@dataclass
class MergeReport:
    rows: int
    parts: int
    duplicate_keys: list[str]
    keys: set[str]  # every captioned key (callers count failures against it without reading the parts again)
    output: Path


def _part_ranges(dirs: list[Path]) -> tuple[list[tuple[Path, str, str]], Counter]:
    ranges, counts = [], Counter()
    for d in dirs:
        for part, keys in read_keys(list_parts(d)):
            if keys:
                ranges.append((part.path, min(keys), max(keys)))
                counts.update(keys)
    return ranges, counts


def merge_parts(dirs: list[Path | str], output: Path | str, bucket_rows: int = 50_000) -> MergeReport:
    """Merge every part of `dirs` into one parquet sorted by key, one row per key.

    Streams: only the key column of all parts is held at once; rows are read a key range at a time
    (parts hold nearly contiguous key ranges, so each part is read about once).
    """
    dirs = [Path(d) for d in dirs]
    output = Path(output)
    ranges, counts = _part_ranges(dirs)
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    keys = sorted(counts)
    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, OUTPUT_SCHEMA, compression="zstd") as writer:
        for start in range(0, len(keys), bucket_rows):
            lo, hi = keys[start], keys[min(start + bucket_rows, len(keys)) - 1]
            tables = [pq.read_table(path, schema=OUTPUT_SCHEMA, filters=[("key", ">=", lo), ("key", "<=", hi)])
                      for path, pmin, pmax in ranges if pmin <= hi and pmax >= lo]
            bucket = pa.concat_tables(tables).sort_by("key")
            writer.write_table(_first_per_key(bucket))
    if duplicates:
        log.warning("%d keys were captioned more than once; kept the first of each (e.g. %s)",
                    len(duplicates), duplicates[:5])
    return MergeReport(rows=len(keys), parts=len(ranges), duplicate_keys=duplicates, keys=set(counts), output=output)


def _first_per_key(table: pa.Table) -> pa.Table:
    keys = table.column("key").to_pylist()
    keep = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return table if len(keep) == len(keys) else table.take(keep)
