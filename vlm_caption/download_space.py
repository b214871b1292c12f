"""Whether a download stopped short for want of disk space (README: "Exit codes": a full disk is fatal, exit 1).

img2dataset catches a failed write in its workers: it prints the traceback, leaves the row out of the shard, or
leaves the whole shard without its stats file, and returns normally. Its workers report nothing else, so once it
returns with shards unfinished the data dir itself is asked: is there room for one more shard (the free space
against what a shard of this download takes), and does a small write succeed (a quota shows in no free-space
count)? If not, the run says so in one line instead of "rerun" (a rerun would fail the same way).
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


def shard_bytes(images: Path, shard_ids: list[int], shard_size: int, block: int) -> int:
    """About what one shard takes on disk: the mean file of the given shards' folders (in whole blocks) times
    the files a row makes, times the rows of a shard; MIN_FREE when nothing was saved yet."""
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
    if not sizes:
        return MIN_FREE
    return max(MIN_FREE, sum(sizes) // len(sizes) * FILES_PER_ROW * shard_size)


def out_of_space(out: Path, shard_ids: list[int], shard_size: int) -> str | None:
    """Why the data dir has no room for a shard ('N bytes free, a shard takes about M', or the error of a small
    write), or None when it has."""
    images = out / IMAGES_DIR
    where = images if images.is_dir() else out
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    need = shard_bytes(images, shard_ids, shard_size, st.f_frsize or 4096)
    if free < need:
        return f"{_size(free)} free, a shard of this download takes about {_size(need)}"
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


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
