"""The part and failure files of a checkpoint dir (store.py), listed and read without trusting them.

A part is the unit of progress, named captions-w{worker:03d}-{seq:06d}.parquet in parts/ (failures-w... in
failures/), its parquet metadata naming the run and the dir that wrote it. Any of them may be truncated by a
kill, copied in from another dir or run, or written by hand: each is checked before its keys count (check_file),
and one that cannot be used is set aside in quarantine/ with a warning (usable_file), never fatal.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import brief
from .schema import ADDED_COLUMNS, FAILURE_SCHEMA, OUTPUT_SCHEMA
from .set_aside import quarantine

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
FAILURES_DIR = "failures"
# Parquet key-value metadata of parts and failure files: which run and which dir wrote them.
META_RUN_ID, META_DIR_ID = b"vlm_caption.run_id", b"vlm_caption.dir_id"
_PART_RE = re.compile(r"^(captions|failures)-w(\d{3,})-(\d{6,})\.parquet$")


class Part(NamedTuple):
    worker: int
    seq: int
    path: Path


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


class FileCheck(NamedTuple):
    keys: list[str] | None  # None: the file cannot be used (see problem)
    run_id: str | None  # from the file's metadata; None for files written before run ids were recorded
    dir_id: str | None
    problem: str | None
    sha256: list[str | None] | None = None  # a part's images, key by key (a failure file has none)


def check_file(path: Path, schema: pa.Schema) -> FileCheck:
    """Read a part's or failure file's keys and provenance without trusting it: a truncated file or one
    with another schema comes back with a problem instead of an exception."""
    try:
        pf = pq.ParquetFile(path)
        arrow_schema = pf.schema_arrow  # (a property that converts the footer's schema at each call)
        names = arrow_schema.names
        if not set(schema.names) - set(ADDED_COLUMNS) <= set(names):  # --keep-columns parts hold more, never fewer
            return FileCheck(None, None, None, f"of a foreign schema (columns {', '.join(names[:8])})")
        # a registry column of another type (a key of numbers) breaks the merge (--keep-columns follow the data)
        other = [f"{f.name} {arrow_schema.field(f.name).type}" for f in (*OUTPUT_SCHEMA, *FAILURE_SCHEMA)
                 if f.name in schema.names and f.name in names and arrow_schema.field(f.name).type != f.type]
        if other:
            return FileCheck(None, None, None, f"of a foreign schema ({', '.join(other[:3])})")
        meta = arrow_schema.metadata or {}
        read = pf.read(columns=["key", *(["sha256"] if "sha256" in names else [])])
        keys = read.column("key").to_pylist()
        images = read.column("sha256").to_pylist() if "sha256" in read.column_names else None
    except (OSError, pa.ArrowException) as e:
        return FileCheck(None, None, None, f"unreadable ({type(e).__name__}: {brief(str(e))})")
    if None in keys:  # never written by a run (a null key is a failure): not a part of it
        return FileCheck(None, None, None, "of a foreign schema (null keys)")
    run_id, dir_id = (meta.get(k, b"").decode() or None for k in (META_RUN_ID, META_DIR_ID))
    return FileCheck(keys, run_id, dir_id, None, images)


def usable_file(checkpoint_dir: Path, part: Part, schema: pa.Schema, run_id: str | None = None,
                quarantine_bad: bool = True) -> FileCheck | None:
    """`part` checked (check_file), or None when it cannot be used: unreadable, foreign, or of another run than
    `run_id`. Such a file is set aside, or with quarantine_bad=False (a look that changes nothing) warned about."""
    check = check_file(part.path, schema)
    problem = check.problem or (f"from another run ({check.run_id})"
                                if run_id and check.run_id not in (None, run_id) else None)
    if problem and quarantine_bad:
        quarantine(checkpoint_dir, part.path, problem)
    elif problem:
        log.warning("%s is %s: a real run sets it aside and captions its keys again", part.path, problem)
    return None if problem else check


def failure_records(checkpoint_dir: Path | str, columns: Sequence[str] = ("key", "stage", "error"), *,
                    run_id: str | None = None, quarantine_bad: bool = True) -> dict[str, dict]:
    """key -> its latest failure record (`columns` of FAILURE_SCHEMA, key always) in the dir's failure files: the
    one reader of failures/. A file that cannot be used is left out (see `usable_file`), never fatal."""
    checkpoint_dir = Path(checkpoint_dir)
    columns = list(dict.fromkeys(("key", *columns)))
    records: dict[str, dict] = {}
    for part in list_failure_files(checkpoint_dir):  # by worker, then sequence: a worker's later record wins
        if usable_file(checkpoint_dir, part, FAILURE_SCHEMA, run_id, quarantine_bad) is None:
            continue
        try:
            rows = pq.read_table(part.path, columns=columns).to_pylist()
        except (OSError, pa.ArrowException) as e:  # set aside by another worker since the check
            log.warning("%s could not be read (%s): its failures are left out", part.path, type(e).__name__)
            continue
        records.update((row["key"], row) for row in rows if row["key"] is not None)
    return records
