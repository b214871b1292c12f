"""What a Hub dataset repo already publishes for a run: its data files and the keys in them.

The Hub is the source of truth: before a push, the keys of the run's files are read from the repo itself
(only the `key` column, by parquet range reads through HfFileSystem, never whole files), so a row already
published by any dir, machine or worker count is never pushed again. Files are cached by their content id in
the checkpoint dir (hub_key_cache.py), so each file is read once per dir, not once per process start.

Layout of a repo:
    data/{run_id}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{digest}.parquet   rows of one run
    data/{run_id}-w{worker:03d}-{first:06d}-{last:06d}.parquet                     the same, written by 0.1
    runs/{run_id}.json                                                             settings and counts of a run
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import HfApi, HfFileSystem
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import RepoFile

from .hub_key_cache import FileEntry, KeyCache, content_id, read_entry
from .rows import FLAGS_COLUMN

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
DATA_DIR = "data"
RUNS_DIR = "runs"
KEY_READ_BLOCK = 256 * 1024  # range-read size: a footer plus a key column chunk, not the whole file; a file this
# small is read whole, in one request (a run's periodic pushes make hundreds of files of a few hundred rows)
_LEGACY_FILE_RE = re.compile(r"^data/(?P<run>[0-9a-f]{12})-w\d{3,}-\d{6,}-\d{6,}\.parquet$")
_RUN_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def run_data_dir(run_id: str) -> str:
    return f"{DATA_DIR}/{run_id}"


def is_legacy_file(path: str) -> bool:
    """A file of 0.1's flat layout (data/{run_id}-w...parquet), moved into its run's folder at the next push."""
    return _LEGACY_FILE_RE.match(path) is not None


def run_data_globs(run_id: str, legacy: bool) -> list[str]:
    """The data_files of a run's card config: its folder, and 0.1's flat files while the repo holds any."""
    return [f"{run_data_dir(run_id)}/*.parquet", *([f"{DATA_DIR}/{run_id}-w*.parquet"] if legacy else [])]


def run_info_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}.json"


class HubFileInfo(NamedTuple):
    path: str
    content_id: str  # names the bytes (hub_key_cache.content_id)
    size: int

    @classmethod
    def of(cls, entry: RepoFile) -> HubFileInfo:
        return cls(entry.path, content_id(entry.blob_id, entry.lfs.sha256 if entry.lfs else None), entry.size)


@dataclass
class Snapshot:
    """The repo at one commit, as far as one run is concerned."""

    head: str  # the commit the listing was read at (pushes name it as their parent)
    files: dict[str, HubFileInfo]  # this run's data files
    keys: set[str]  # keys those files publish
    other_runs: list[str] = field(default_factory=list)  # other runs with data in the repo
    unreadable: list[str] = field(default_factory=list)  # this run's files whose keys could not be read


class HubIndex:
    """Reads a run's published keys from one repo; each file through the cache of its content id."""

    def __init__(self, api: HfApi, repo_id: str, run_id: str, token: str | None, cache: KeyCache | None = None):
        self.api, self.repo_id, self.run_id, self._token = api, repo_id, run_id, token
        self.cache = cache or KeyCache()
        self._fs: HfFileSystem | None = None

    def snapshot(self) -> Snapshot:
        head = self.api.repo_info(self.repo_id, repo_type=REPO_TYPE).sha
        files, others = self._list(head)
        snap = Snapshot(head=head, files=files, keys=set(), other_runs=others)
        # Workers of a dir starting together take files in their own order: while one reads a file the others
        # read other files, not wait in line behind it (hub_key_cache: one process of a dir reads each file).
        for info in random.sample(list(files.values()), len(files)):
            entry = self.cache.get_or_read(info.content_id, lambda: self._read_entry(info, head))
            if entry is None:
                snap.unreadable.append(info.path)
            else:
                snap.keys.update(entry.keys)
        snap.unreadable.sort()
        return snap

    def _list(self, head: str) -> tuple[dict[str, HubFileInfo], list[str]]:
        files: dict[str, HubFileInfo] = {}
        others: set[str] = set()
        for entry in self._tree(DATA_DIR, head, recursive=False):
            name = entry.path.split("/", 1)[1]
            legacy = _LEGACY_FILE_RE.match(entry.path)
            if legacy and legacy["run"] == self.run_id:
                files[entry.path] = HubFileInfo.of(entry)
            elif legacy or (not isinstance(entry, RepoFile) and _RUN_ID_RE.match(name)):
                others.add(legacy["run"] if legacy else name)
        others.discard(self.run_id)
        # Not recursive: the run's card config loads data/{run_id}/*.parquet, so a file in a subfolder publishes
        # nothing (counted, its rows were never pushed again and --check-hub said they were published)
        for entry in self._tree(run_data_dir(self.run_id), head, recursive=False):
            if isinstance(entry, RepoFile) and entry.path.endswith(".parquet"):
                files[entry.path] = HubFileInfo.of(entry)
        return files, sorted(others)

    def _tree(self, folder: str, head: str, recursive: bool) -> list:
        try:
            return list(self.api.list_repo_tree(self.repo_id, path_in_repo=folder, recursive=recursive,
                                                revision=head, repo_type=REPO_TYPE))
        except EntryNotFoundError:  # no such folder yet
            return []

    def keys_of_file(self, info: HubFileInfo) -> list[str]:
        """Keys of a file read by an earlier snapshot."""
        entry = self.cache.get(info.content_id)
        return entry.keys if entry else []

    def _read_entry(self, info: HubFileInfo, head: str) -> FileEntry | None:
        url = f"datasets/{self.repo_id}@{head}/{info.path}"
        try:
            with self._filesystem().open(url, "rb", block_size=KEY_READ_BLOCK, size=info.size) as f:
                # one request for a small file: the footer first, then the key column, took two
                pf = pq.ParquetFile(pa.BufferReader(f.read(info.size)) if info.size <= KEY_READ_BLOCK else f)
                if "vlm_caption" not in pf.schema_arrow.names:  # keys alone (by hand) publish no caption
                    raise KeyError("vlm_caption")
                return read_entry(pf)
        except (pa.ArrowException, KeyError) as e:  # not our parquet: it publishes no row we know
            log.warning("Hub: %s in %s is not a readable captions file (%s); its rows, if any, are not "
                        "counted", info.path, self.repo_id, type(e).__name__)
            return None

    def flag_counts(self, snap: Snapshot, column: str = FLAGS_COLUMN) -> dict[str, int]:
        """Published captions per quality flag of one flags column, over the snapshot's files (read with their
        keys)."""
        total: dict[str, int] = {}
        for info in snap.files.values():
            entry = self.cache.get(info.content_id)
            for flag, n in (entry.flags if entry else {}).get(column, {}).items():
                total[flag] = total.get(flag, 0) + n
        return total

    def _filesystem(self) -> HfFileSystem:
        if self._fs is None:  # our own instance: fsspec's shared instance cache would outlive a token change
            self._fs = HfFileSystem(endpoint=self.api.endpoint, token=self._token, skip_instance_cache=True)
        return self._fs

    def read_file(self, path: str, head: str) -> bytes:
        """A whole file of the repo at `head` (small JSON files, or a one-time migration)."""
        return self._filesystem().cat_file(f"datasets/{self.repo_id}@{head}/{path}")

    def read_run_infos(self, head: str) -> dict[str, dict]:
        """runs/{run_id}.json of every run in the repo at `head` (settings and counts they last published)."""
        infos = {}
        for entry in self._tree(RUNS_DIR, head, recursive=False):
            if not entry.path.endswith(".json"):
                continue
            try:
                info = json.loads(self.read_file(entry.path, head))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                log.warning("Hub: %s is unreadable (%s); that run is left off the card", entry.path, e)
                continue
            if isinstance(info, dict) and info.get("run_id"):
                infos[info["run_id"]] = info
        return infos
