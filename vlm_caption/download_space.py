"""Whether a download stopped short for want of disk space (README: "Exit codes": a full disk is fatal, exit 1).

img2dataset catches a failed write in its workers: it prints the traceback, leaves the row out of the shard, or
leaves the whole shard without its stats file, and returns normally. It records nothing of it (no status, no
error_message: a sample's write error is only printed), so once it returns with shards unfinished the data dir
itself is asked for evidence that writes fail for lack of space: a small write fails with ENOSPC / EDQUOT (a
quota shows in no free-space count), or less is free than one row of images takes. Then the run says so in one
line instead of "rerun" (a rerun would fail the same way). Free space under what a whole shard takes is no such
evidence: shards also stop short for other reasons (a worker killed for memory, the network), and those are
retryable (exit 3); that case only gets a warning (low_space), since a rerun may fill the disk.
"""
from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

from .data_layout import IMAGES_DIR, shard_name

MIN_FREE = 1 << 20  # below this nothing is worth trying, whatever the estimate
PROBE_BYTES = 1 << 16  # a write of this size must succeed (a quota, a file system whose free count lies)
SAMPLED_FILES = 200  # files of the saved images looked at for the estimate (a walk of millions costs minutes)
FILES_PER_ROW = 3  # img2dataset's files format: NNN.jpg, NNN.txt, NNN.json
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def row_bytes(images: Path, shard_ids: list[int], block: int) -> int | None:
    """About what one row takes on disk: the mean file of the given shards' folders (in whole blocks) times the
    files a row makes; None when nothing was saved yet."""
    sizes = []
    for shard_id in shard_ids:
        folder = images / shard_name(shard_id)
        try:
            entries = list(itertools.islice(os.scandir(folder), SAMPLED_FILES - len(sizes)))
        except OSError:
            continue
        for entry in entries:
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            sizes.append(-(-max(size, 1) // block) * block)
        if len(sizes) >= SAMPLED_FILES:
            break
    return sum(sizes) // len(sizes) * FILES_PER_ROW if sizes else None


def shard_bytes(images: Path, shard_ids: list[int], shard_size: int, block: int) -> int:
    """About what one shard takes on disk: a row (row_bytes) times the rows of a shard; MIN_FREE when nothing
    was saved yet."""
    row = row_bytes(images, shard_ids, block)
    return MIN_FREE if row is None else max(MIN_FREE, row * shard_size)


def _free(out: Path) -> tuple[Path, int, int] | None:
    """(the folder img2dataset writes to, its free bytes, its block size), or None when it cannot be asked."""
    images = out / IMAGES_DIR
    where = images if images.is_dir() else out
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    return where, st.f_bavail * st.f_frsize, st.f_frsize or 4096


def out_of_space(out: Path, shard_ids: list[int]) -> str | None:
    """Why writes to the data dir fail for lack of space ('N bytes free, a row of images takes about M', or the
    error of a small write), or None when nothing shows they do (module doc)."""
    free = _free(out)
    if free is None:
        return None
    where, free, block = free
    row = row_bytes(out / IMAGES_DIR, shard_ids, block) or 0
    if free < max(MIN_FREE, row):
        return (f"{_size(free)} free, a row of images of this download takes about {_size(row)}" if row > MIN_FREE
                else f"{_size(free)} free")
    probe = where / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            return f"a write of {_size(PROBE_BYTES)} fails: {e.strerror}"
        return None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def low_space(out: Path, shard_ids: list[int], shard_size: int) -> str | None:
    """'N bytes free, a shard of this download takes about M' when the data dir has no room for one more shard
    (a warning: no evidence that writes failed, out_of_space), else None."""
    free = _free(out)
    if free is None:
        return None
    _, free, block = free
    need = shard_bytes(out / IMAGES_DIR, shard_ids, shard_size, block)
    return f"{_size(free)} free, a shard of this download takes about {_size(need)}" if free < need else None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
