"""What a Hub dataset repo already publishes for a run: its data files and the keys in them.

The Hub is the source of truth: before a push, the keys of the run's files are read from the repo itself
(only the `key` and `sha256` columns, by parquet range reads through HfFileSystem, never whole files), so a
row already published by any dir, machine or worker count is never pushed again, and a key published for
another image is told apart (image_match.py). Files are cached by their content id in
the checkpoint dir (hub_key_cache.py), so each file is read once per dir, not once per process start.

Layout of a repo:
    data/{run_id}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{digest}.parquet   rows of one run
    data/{run_id}-w{worker:03d}-{first:06d}-{last:06d}.parquet                     the same, written by 0.1
    runs/{run_id}.json                                                             settings and counts of a run
"""
from __future__ import annotations

import hashlib
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
from .schema import ADDED_COLUMNS, OUTPUT_SCHEMA

log = logging.getLogger(__name__)

REPO_TYPE = "dataset"
DATA_DIR = "data"
RUNS_DIR = "runs"
KEY_READ_BLOCK = 256 * 1024  # range-read size: a footer plus a key column chunk, not the whole file; a file this
# small is read whole, in one request (a run's periodic pushes make hundreds of files of a few hundred rows)
BASE_COLUMNS = [n for n in OUTPUT_SCHEMA.names if n not in ADDED_COLUMNS]  # in every file any version pushed
_LEGACY_FILE_RE = re.compile(r"^data/(?P<run>[0-9a-f]{12})-w\d{3,}-\d{6,}-\d{6,}\.parquet$")
_RUN_ID_RE = re.compile(r"^[0-9a-f]{12}$")
HUB_FILE_RE = re.compile(r"^data/(?P<run>[0-9a-f]{12})/(?P<dir>[^/]+)-w(?P<worker>\d{3,})-(?P<first>\d{6,})-"
                         r"(?P<last>\d{6,})-(?P<digest>[0-9a-f]{8})\.parquet$")  # what hub_files.hub_path makes
_MOVED_LEGACY_RE = re.compile(r"^data/(?P<run>[0-9a-f]{12})/v0\.1-(?P=run)-w\d{3,}-\d{6,}-\d{6,}\.parquet$")


def keys_digest(keys) -> str:
    """What a file's name says of its keys (hub_files.hub_path)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:8]


def not_ours(path: str, run_id: str, keys: list[str]) -> str | None:
    """Why a readable file of the run's folder is not one this tool wrote for the run (None: it is). Its name says
    which keys it holds (their digest): a file renamed, copied under another name, uploaded by hand or rewritten
    with other rows (fewer than its name says, none) is named in a warning and by --check-hub."""
    named = HUB_FILE_RE.match(path)
    if named is None or named["run"] != run_id:
        moved = _MOVED_LEGACY_RE.match(path)  # a 0.1 file moved into the folder (hub.py): no digest in its name
        return None if moved and moved["run"] == run_id else "its name is not one this tool gives"
    if named["digest"] != keys_digest(keys):
        return f"its {len(keys)} keys are not those its name says"
    return None


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
    # files in the run's folder not written for it -> why (counted)
    foreign: dict[str, str] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)  # .parquet files of the folder `datasets` skips: not counted
    entries: dict[str, FileEntry] = field(default_factory=dict)  # each of `files`' keys, types and flags

    def images(self, but_dir: str | None = None) -> dict[str, str | None]:
        """key -> the sha256 of the image its published caption was made from (files without images left out;
        `but_dir`: the files of that dir_id too)."""
        return {k: sha for path, e in self.entries.items() if e.images is not None and not (
                but_dir and (named := HUB_FILE_RE.match(path)) and named["dir"] == but_dir)
                for k, sha in zip(e.keys, e.images)}


class HubIndex:
    """Reads a run's published keys from one repo; each file through the cache of its content id."""

    def __init__(self, api: HfApi, repo_id: str, run_id: str, token: str | None, cache: KeyCache | None = None):
        self.api, self.repo_id, self.run_id, self._token = api, repo_id, run_id, token
        self.cache = cache or KeyCache()
        self._fs: HfFileSystem | None = None
        self._warned_foreign: list[str] = []  # said once per set of such files, not at every push
        self._checked: dict[tuple[str, str], str | None] = {}  # (path, content id) -> not_ours
        self._listed: tuple[str, dict[str, HubFileInfo], list[str], list[str]] | None = None  # the last listing
        self._warned_hidden: list[str] = []

    def snapshot(self) -> Snapshot:
        head = self.api.repo_info(self.repo_id, repo_type=REPO_TYPE).sha
        files, others, hidden = self._list(head)
        snap = Snapshot(head=head, files=files, keys=set(), other_runs=others, hidden=hidden)
        # Workers of a dir starting together take files in their own order: while one reads a file the others
        # read other files, not wait in line behind it (hub_key_cache: one process of a dir reads each file).
        for info in random.sample(list(files.values()), len(files)):
            entry = self.cache.get_or_read(info.content_id, lambda: self._read_entry(info, head))
            why = None if entry is None or is_legacy_file(info.path) else self._not_ours(info, entry)
            if entry is None:
                snap.unreadable.append(info.path)
                continue
            # What the run's folder holds is what its dataset config loads: published, whoever wrote it. Counting
            # it keeps each key once (pushing its keys again would publish them twice); the file is only named.
            snap.keys.update(entry.keys)
            snap.entries[info.path] = entry
            if why:
                snap.foreign[info.path] = why
        if snap.foreign and sorted(snap.foreign) != self._warned_foreign:
            self._warned_foreign = sorted(snap.foreign)
            log.warning("Hub: %d file(s) in %s/ of %s were not written by this tool for this run; their rows count "
                        "as published, since the run's dataset config loads them (check them; to caption their "
                        "keys again, delete them and push again): %s", len(snap.foreign), run_data_dir(self.run_id),
                        self.repo_id, "; ".join(f"{p} ({why})" for p, why in sorted(snap.foreign.items())[:3]))
        if hidden and hidden != self._warned_hidden:
            self._warned_hidden = hidden
            log.warning("Hub: %d file(s) in %s/ of %s have hidden names (a leading '.'), which the run's dataset "
                        "config does not load: their rows count as not published and are pushed again; delete "
                        "them: %s", len(hidden), run_data_dir(self.run_id), self.repo_id, "; ".join(hidden[:3]))
        snap.unreadable.sort()
        return snap

    def _not_ours(self, info: HubFileInfo, entry: FileEntry) -> str | None:
        if (info.path, info.content_id) not in self._checked:  # a file's keys are hashed once per process
            self._checked[info.path, info.content_id] = not_ours(info.path, self.run_id, entry.keys)
        return self._checked[info.path, info.content_id]

    def _list(self, head: str) -> tuple[dict[str, HubFileInfo], list[str], list[str]]:
        """This run's files, the other runs and the run's hidden files at commit `head`. A commit's tree never
        changes: listed once for the snapshots of a head (a push reads the repo three times; on the Hub a listing
        is a page a 1,000)."""
        if self._listed is None or self._listed[0] != head:
            self._listed = (head, *self._list_tree(head))
        _, files, others, hidden = self._listed
        return dict(files), list(others), list(hidden)

    def _list_tree(self, head: str) -> tuple[dict[str, HubFileInfo], list[str], list[str]]:
        files: dict[str, HubFileInfo] = {}
        others: set[str] = set()
        hidden: list[str] = []
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
                # `datasets` skips a hidden file for the config's pattern: counted, its keys would be loaded nowhere
                if entry.path.rsplit("/", 1)[1].startswith("."):
                    hidden.append(entry.path)
                else:
                    files[entry.path] = HubFileInfo.of(entry)
        return files, sorted(others), sorted(hidden)

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
                lacking = [n for n in BASE_COLUMNS if n not in pf.schema_arrow.names]
                if lacking:  # keys alone (by hand) publish no caption; other columns break the config's one schema
                    raise KeyError(", ".join(lacking[:3]))
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
