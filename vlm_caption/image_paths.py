"""Where a metadata row's image is: its file_name, else img2dataset's naming (images/<shard>/<key>.jpg), the shard
being the shard parquet's name or, in a full_metadata.parquet without file_name, the key's first digits (img2dataset
numbers keys <shard><index>). A shard's images folder that is missing as a whole (moved, deleted, a disk not
mounted) is told apart from a missing image: its rows are left for a later run, not failed for good."""
from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path

from .data_layout import ENCODE_FORMAT, IMAGES_DIR, OOM_SHARD_COUNT
from .images import IMAGE_SUFFIXES

_KEY_RE = re.compile(r"^[0-9]{1,20}$")
_SHARD_DIR_RE = re.compile(r"^images/([0-9]+)/")


def row_shard(row_file: str | None, shard: str | None, key: str) -> str | None:
    """The shard folder name of a row: its parquet's, its file_name's, else its key's first digits."""
    if shard is not None:
        return shard
    if row_file:
        m = _SHARD_DIR_RE.match(row_file)
        return m.group(1) if m else None
    return key[:OOM_SHARD_COUNT] if _KEY_RE.match(key) and len(key) > OOM_SHARD_COUNT else None


def shard_of(row_file: str | None, shard: str | None, key: str = "") -> int | None:
    name = row_shard(row_file, shard, key)
    return None if name is None else int(name)


class ShardFolders:
    """Which shards' images folders exist, each looked up once per pass."""

    def __init__(self, data_dir: Path):
        self.images = data_dir / IMAGES_DIR
        self.seen: dict[str, bool] = {}

    def missing(self, shard: str | None) -> bool:
        if shard is None or not _KEY_RE.match(shard):
            return False
        if shard not in self.seen:
            self.seen[shard] = not (self.images / shard).is_dir()
        return self.seen[shard]


def resolve_image_path(data_dir: Path, key: str, file_name: str | None, shard: str | None) -> Path | None:
    """The image file of a row, or None when the row cannot name one safely inside data_dir.

    The check is on the path as written (no '..', not absolute), so an images/ dir that is a symlink
    to another disk still works, while a row can never point the tool at a file outside the data dir.
    """
    shard = None if file_name else row_shard(None, shard, key)
    if file_name:
        relative = Path(os.path.normpath(file_name))
    elif _KEY_RE.match(key) and shard is not None and _KEY_RE.match(shard):
        # img2dataset names every file {key}.jpg: one stat finds it. The folder is listed (once per pass) only for
        # a key without that file: listing each shard's 10K-30K entries cost a relaunch with a few keys left
        # ~6.7 s per worker at 400K rows, for any number of keys.
        name = f"{key}.{ENCODE_FORMAT}"
        if not os.path.isfile(os.path.join(data_dir, IMAGES_DIR, shard, name)):
            name = images_by_key(str(data_dir / IMAGES_DIR / shard)).get(key) or name
        relative = Path(IMAGES_DIR, shard, name)
    else:
        return None
    if relative.is_absolute() or relative.parts[:1] == ("..",):
        return None
    return data_dir / relative


@functools.lru_cache(maxsize=8)
def images_by_key(folder: str) -> dict[str, str]:
    """key -> image file name in one shard folder, for keys whose file is not {key}.jpg; listed once (a glob
    per key over a 10K-file folder took ~50 ms: 20 img/s at most for a data dir without full_metadata.parquet)."""
    found: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in sorted(os.listdir(folder)):
            key, dot, _ = name.partition(".")
            if dot and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.setdefault(key, name)
    return found
