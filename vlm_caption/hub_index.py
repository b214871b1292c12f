"""What a Hub dataset repo already publishes for a run: its data files and the keys in them.

The Hub is the source of truth: before a push, the keys of the run's files are read from the repo itself
(only the `key` column, by parquet range reads through HfFileSystem, never whole files), so a row already
published by any dir, machine or worker count is never pushed again. Files are cached by their git blob id,
which changes whenever the content does, so each file is read once per process.

Layout of a repo:
    data/{run_id}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{digest}.parquet   rows of one run
    data/{run_id}-w{worker:03d}-{first:06d}-{last:06d}.parquet                     the same, written by 0.1
    runs/{run_id}.json                                                             settings and counts of a run
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import HfApi, HfFileSystem
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import RepoFile

from .rows import FLAGS_COLUMN, count_flags_column

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
DATA_DIR = "data"
RUNS_DIR = "runs"
KEY_READ_BLOCK = 256 * 1024  # range-read size: a footer plus a key column chunk, not the whole file
_LEGACY_FILE_RE = re.compile(r"^data/(?P<run>[0-9a-f]{12})-w\d{3,}-\d{6,}-\d{6,}\.parquet$")
_RUN_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def _is_flags_column(f: pa.Field) -> bool:
    """The plain flags column or a prompt's (caption_flags_NAME): which prompts a file holds is the run's
    business (rows.run_flag_columns); a --format json field is a string, never a list."""
    return f.name.startswith(FLAGS_COLUMN) and pa.types.is_list(f.type)


def run_data_dir(run_id: str) -> str:
    return f"{DATA_DIR}/{run_id}"


def run_info_path(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}.json"


class HubFileInfo(NamedTuple):
    path: str
    blob_id: str
    size: int


@dataclass
class Snapshot:
    """The repo at one commit, as far as one run is concerned."""

    head: str  # the commit the listing was read at (pushes name it as their parent)
    files: dict[str, HubFileInfo]  # this run's data files
    keys: set[str]  # keys those files publish
    other_runs: list[str] = field(default_factory=list)  # other runs with data in the repo
    unreadable: list[str] = field(default_factory=list)  # this run's files whose keys could not be read


class HubIndex:
    """Reads a run's published keys from one repo; remembers every file it has read (by blob id)."""

    def __init__(self, api: HfApi, repo_id: str, run_id: str, token: str | None):
        self.api, self.repo_id, self.run_id, self._token = api, repo_id, run_id, token
        self._keys_by_blob: dict[str, list[str]] = {}
        # flags column (the plain one, and each --prompts-file prompt's) -> captions per flag, read with the keys
        self._flags_by_blob: dict[str, dict[str, dict[str, int]]] = {}
        self._fs: HfFileSystem | None = None

    def snapshot(self) -> Snapshot:
        head = self.api.repo_info(self.repo_id, repo_type=REPO_TYPE).sha
        files, others = self._list(head)
        snap = Snapshot(head=head, files=files, keys=set(), other_runs=others)
        for info in files.values():
            keys = self._read_keys(info, head)
            if keys is None:
                snap.unreadable.append(info.path)
            else:
                snap.keys.update(keys)
        return snap

    def _list(self, head: str) -> tuple[dict[str, HubFileInfo], list[str]]:
        files: dict[str, HubFileInfo] = {}
        others: set[str] = set()
        for entry in self._tree(DATA_DIR, head, recursive=False):
            name = entry.path.split("/", 1)[1]
            legacy = _LEGACY_FILE_RE.match(entry.path)
            if legacy and legacy["run"] == self.run_id:
                files[entry.path] = HubFileInfo(entry.path, entry.blob_id, entry.size)
            elif legacy or (not isinstance(entry, RepoFile) and _RUN_ID_RE.match(name)):
                others.add(legacy["run"] if legacy else name)
        others.discard(self.run_id)
        for entry in self._tree(run_data_dir(self.run_id), head, recursive=True):
            if isinstance(entry, RepoFile) and entry.path.endswith(".parquet"):
                files[entry.path] = HubFileInfo(entry.path, entry.blob_id, entry.size)
        return files, sorted(others)

    def _tree(self, folder: str, head: str, recursive: bool) -> list:
        try:
            return list(self.api.list_repo_tree(self.repo_id, path_in_repo=folder, recursive=recursive,
                                                revision=head, repo_type=REPO_TYPE))
        except EntryNotFoundError:  # no such folder yet
            return []

    def keys_of_file(self, info: HubFileInfo) -> list[str]:
        """Keys of a file read by an earlier snapshot."""
        return self._keys_by_blob.get(info.blob_id) or []

    def _read_keys(self, info: HubFileInfo, head: str) -> list[str] | None:
        if info.blob_id not in self._keys_by_blob:
            fs = self._filesystem()
            url = f"datasets/{self.repo_id}@{head}/{info.path}"
            try:
                with fs.open(url, "rb", block_size=KEY_READ_BLOCK, size=info.size) as f:
                    pf = pq.ParquetFile(f)
                    flagged = [c for c in pf.schema_arrow if _is_flags_column(c)]
                    table = pf.read(columns=["key", *(c.name for c in flagged)])
                keys = table.column("key").to_pylist()
                self._flags_by_blob[info.blob_id] = {c.name: count_flags_column(table.column(c.name)) for c in flagged}
            except (pa.ArrowException, KeyError) as e:  # not our parquet: it publishes no row we know
                log.warning("Hub: %s in %s is not a readable captions file (%s); its rows, if any, are not "
                            "counted", info.path, self.repo_id, type(e).__name__)
                return None
            self._keys_by_blob[info.blob_id] = keys
        return self._keys_by_blob[info.blob_id]

    def flag_counts(self, snap: Snapshot, column: str = FLAGS_COLUMN) -> dict[str, int]:
        """Published captions per quality flag of one flags column, over the snapshot's files (read with their
        keys)."""
        total: dict[str, int] = {}
        for info in snap.files.values():
            for flag, n in self._flags_by_blob.get(info.blob_id, {}).get(column, {}).items():
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
