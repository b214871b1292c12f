"""Keys (and flag counts) of published Hub files, kept in the checkpoint dir by the file's content id.

Reading which keys the repo holds means reading the key column of every file of the run (hub_index.py). Read
once per process, 64 workers starting together against a run of ~200 files made ~25K requests, while the Hub
allows 5,000 per 5 minutes. A file's content id names its bytes, so what one process read, or pushed,
serves every worker of the dir and every relaunch: each file is read from the Hub once per dir.

    hub_keys/{content_id}.parquet   the file's `key` and `sha256` columns; its flag counts and id in the schema
                                    metadata
    hub_keys/{content_id}.lock      held (flock) by the process of the dir reading that file from the Hub

The id is the sha256 of an LFS file (parquet on huggingface.co) and the git blob id of a regular one (the test
stub), as huggingface_hub itself compares files. A cache: deleting the folder costs reads, never rows; an
unreadable or foreign entry (not written under its name by this cache) is quarantined with a
warning and the file is read again.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write_table
from .errors import brief
from .locks import try_flock
from .rows import FLAGS_COLUMN, count_flags_column
from .store import aside_folder, quarantine

log = logging.getLogger(__name__)

KEY_CACHE_DIR = "hub_keys"
_META_FLAGS = b"vlm_caption.flag_counts"
_META_SCHEMA = b"vlm_caption.schema"  # the file's schema (Arrow IPC) and its all-null columns
_META_NULLS = b"vlm_caption.null_columns"
IMAGE_COLUMN = "sha256"  # of the image a row's caption was made from (schema.py)
_META_ID = b"vlm_caption.content_id"  # the id it was stored under: a renamed or foreign parquet is not an entry


@dataclass(frozen=True)
class FileEntry:
    keys: list[str]
    flags: dict[str, dict[str, int]]  # flags column (plain, or a prompt's) -> captions per flag
    # The file's columns and types, and the columns all null in it (from the footer's statistics): which type
    # the run's files give a column (hub_types.py). None: an entry of an older version, read again.
    schema: pa.Schema | None = None
    null_columns: frozenset[str] = frozenset()
    # The sha256 of each key's image (None: the file has no sha256 column): a run of another data set under the
    # same keys is told from the run that published them (image_match.py).
    images: list[str | None] | None = None


def content_id(blob_id: str, lfs_sha256: str | None) -> str:
    """The id a listed file is cached under."""
    return f"sha256-{lfs_sha256}" if lfs_sha256 else f"git-{blob_id}"


def upload_ids(data: bytes) -> tuple[str, str]:
    """Both ids a file we upload may be listed under: the Hub decides whether it is stored in LFS."""
    from huggingface_hub.utils.sha import git_hash

    return content_id(git_hash(data), None), content_id("", hashlib.sha256(data).hexdigest())


def is_flags_column(f: pa.Field) -> bool:
    """The plain flags column or a prompt's (caption_flags_NAME): which prompts a file holds is the run's
    business (rows.run_flag_columns); a --format json field is a string, never a list."""
    return f.name.startswith(FLAGS_COLUMN) and pa.types.is_list(f.type)


def read_entry(pf: pq.ParquetFile) -> FileEntry:
    """Keys, images and flag counts of a captions file (only those columns are read). KeyError: it has no key
    column; ArrowTypeError: its keys are not text."""
    flagged = [c for c in pf.schema_arrow if is_flags_column(c)]
    images = [IMAGE_COLUMN] if _is_text(pf.schema_arrow, IMAGE_COLUMN) else []
    table = pf.read(columns=["key", *images, *(c.name for c in flagged)])
    kind = table.schema.field("key").type
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):  # ints or lists: none of our keys
        # (a file added by hand; caching its keys as text failed with a traceback on every push and check)
        raise pa.ArrowTypeError(f"its key column is {kind}, not text")
    return FileEntry(table.column("key").to_pylist(),
                     {c.name: count_flags_column(table.column(c.name)) for c in flagged},
                     pf.schema_arrow.remove_metadata(), frozenset(_null_columns(pf)),
                     table.column(IMAGE_COLUMN).to_pylist() if images else None)


def _is_text(schema: pa.Schema, name: str) -> bool:
    return name in schema.names and (pa.types.is_string(kind := schema.field(name).type)
                                     or pa.types.is_large_string(kind))


def _null_columns(pf: pq.ParquetFile) -> list[str]:
    """Top-level columns whose values are all null, as the footer's statistics say (none known: not null)."""
    meta = pf.metadata
    nulls = []
    for name in pf.schema_arrow.names:
        chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups)
                  for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema == name]
        if (chunks or not meta.num_row_groups) and all(  # (a nested column has no chunk of its name: not null)
                ch.statistics is not None and ch.statistics.has_null_count and ch.statistics.null_count == ch.num_values
                for ch in chunks):
            nulls.append(name)
    return nulls


class KeyCache:
    """Entries by content id: in memory, then in the dir (None: memory only), then read from the Hub."""

    # How long a process waits for another reading the same file; then it reads the file too. A holder that is
    # stopped (Ctrl-Z, a suspended job) keeps its lock, and must not stop every other worker of the dir.
    lock_wait_s = 60.0

    def __init__(self, checkpoint_dir: Path | str | None = None, read_only: bool = False):
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        # read_only (--dry-run: nothing written): the dir's entries serve, nothing is stored, locked or set aside
        self.read_only = read_only
        self._memory: dict[str, FileEntry] = {}
        self._folder: Path | None = None  # found at first use (aside_folder)

    def get(self, cid: str) -> FileEntry | None:
        """An entry this process has already seen (a snapshot read it)."""
        return self._memory.get(cid)

    def get_or_read(self, cid: str, read: Callable[[], FileEntry | None]) -> FileEntry | None:
        """The entry of `cid`, calling read() (a Hub read; None: unreadable, not cached) only when neither this
        process nor another of the dir has it. One process of the dir reads a file while the others wait
        (lock_wait_s at most)."""
        if cid in self._memory:
            return self._memory[cid]
        # The usual case at a relaunch: no lock needed to read a finished entry. A bad one is set aside under the
        # lock only: another worker may set it aside, read the file and store it again between this read and a
        # move of it here, which then set the good entry aside (a false warning, and the Hub file read again).
        entry = self._load(cid, set_aside=False)
        if entry is None:
            with self._locked(cid):
                entry = self._load(cid)  # stored by the holder we waited for
                if entry is None:
                    entry = read()
                    if entry is None:
                        return None
                    self._store(cid, entry)
        self._memory[cid] = entry
        return entry

    def put_upload(self, data: bytes) -> None:
        """Remember a file this process is uploading, under both ids it may be listed by: never read it back."""
        entry = read_entry(pq.ParquetFile(pa.BufferReader(data)))
        for cid in upload_ids(data):
            self._memory[cid] = entry
            self._store(cid, entry)

    def _path(self, cid: str, suffix: str) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        if self._folder is None:  # a file of that name (by hand) was a traceback after the push had landed
            self._folder = aside_folder(self.checkpoint_dir, KEY_CACHE_DIR, "the keys of published Hub files")
        return self._folder / f"{cid}{suffix}"

    @contextlib.contextmanager
    def _locked(self, cid: str) -> Iterator[None]:
        path = self._path(cid, ".lock")
        if path is None or self.read_only:  # (a lock file is a write)
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_wait_s
            while not try_flock(fd, fcntl.LOCK_EX):  # the OS drops it if its holder dies, kill -9 included
                if time.monotonic() > deadline:
                    log.warning("%s stayed locked for %.0f s (a stopped worker of the dir?); reading that Hub "
                                "file without it", path, self.lock_wait_s)
                    break
                time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _load(self, cid: str, set_aside: bool = True) -> FileEntry | None:
        path = self._path(cid, ".parquet")
        if path is None or not path.exists():
            return None
        try:
            if not path.is_file():  # a directory in its place: storing the entry would fail
                raise ValueError("not a file")
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            if meta.get(_META_ID) != cid.encode() or not pa.types.is_string(table.schema.field("key").type):
                raise ValueError("not an entry of this id")  # trusted by name: wrong keys would be pushed again
            flags = json.loads(meta[_META_FLAGS])
            if not (isinstance(flags, dict) and all(isinstance(c, dict) and all(
                    isinstance(n, int) for n in c.values()) for c in flags.values())):
                raise ValueError("flag counts are not a mapping of mappings")  # the card would fail on them
            if _META_SCHEMA not in meta:  # written by an older version: its types were not kept, read it again
                return None
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta[_META_SCHEMA])))
            kept = _is_text(table.schema, IMAGE_COLUMN)
            if _is_text(schema, IMAGE_COLUMN) and not kept:  # an older version kept no images: read it again
                return None
            return FileEntry(table.column("key").to_pylist(), flags, schema, frozenset(json.loads(meta[_META_NULLS])),
                             table.column(IMAGE_COLUMN).to_pylist() if kept else None)
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            if not set_aside:  # (the read under the lock sets it aside, or warns in a read-only cache)
                return None
            if self.read_only:
                log.warning("%s is an unreadable Hub key cache entry (%s: %s); that Hub file is read instead (a "
                            "real run sets the entry aside)", path, type(e).__name__, brief(str(e), 120))
                return None
            quarantine(self.checkpoint_dir, path, f"an unreadable Hub key cache entry ({type(e).__name__}: "
                       f"{brief(str(e), 120)})",
                       "that Hub file's keys are read from the Hub again")
            return None

    def _store(self, cid: str, entry: FileEntry) -> None:
        path = self._path(cid, ".parquet")
        if path is None or self.read_only:
            return
        table = pa.table({"key": pa.array(entry.keys, pa.string()),
                          **({IMAGE_COLUMN: pa.array(entry.images, pa.string())} if entry.images is not None else {})})
        schema = base64.b64encode(entry.schema.serialize().to_pybytes()) if entry.schema is not None else b""
        atomic_write_table(path, table.replace_schema_metadata({
            _META_FLAGS: json.dumps(entry.flags, sort_keys=True), _META_ID: cid, _META_SCHEMA: schema,
            _META_NULLS: json.dumps(sorted(entry.null_columns))}))
