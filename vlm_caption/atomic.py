"""Atomic files: write to a tmp name, fsync, rename. Readers (and a rerun after a crash) see the old file or the
whole new one, never a half; tmp files of crashed writers are recognised by host and pid and removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UsageError


WRITTEN_PATH = "vlm_caption_written_path"  # set on an OSError raised while writing a file atomically


def _tmp_name(path: Path) -> Path:
    # Host and pid in the name tell a crashed writer's leftovers from a live writer's file; the thread, two
    # threads of one process writing one file (a --push-only's pushers storing one key-cache entry).
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}.{threading.get_native_id()}")


@contextlib.contextmanager
def atomic_path(path: Path | str):
    """Yield a tmp path to write; on success fsync it and rename it over `path`, on any error delete it.

    Readers see the old file or the whole new one, never a half, whatever kills the writer.
    """
    path = Path(path)
    if path.is_dir():  # put there by hand: renaming over it fails, and it is not ours to remove
        # a user's mistake in a dir of ours, as a directory in place of a lock file is (locks.open_lock): exit 2
        raise UsageError(f"{path} is a directory, not a file: move it aside and rerun")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a write's error names no file: cli's one line names it
            setattr(e, WRITTEN_PATH, str(path))  # (not in filename: str(e) would change for callers' messages)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(directory: Path, other_host_age_s: float = 3600.0, recursive: bool = True) -> int:
    """Delete tmp files left by crashed writers (they never hold finished data).

    A tmp file of this host is stale when its process is gone; one of another host (a shared file
    system) only when it is old, since we cannot see that host's processes.
    """
    removed = 0
    host = socket.gethostname()
    for tmp in (Path(directory).rglob if recursive else Path(directory).glob)(".*.tmp-*"):
        writer_host, _, pid = tmp.name.rsplit(".tmp-", 1)[1].rpartition("-")
        pid = pid.split(".", 1)[0]  # PID.THREAD (PID alone from earlier versions)
        if writer_host == host:
            stale = not (pid.isdigit() and _pid_alive(int(pid)))
        else:
            try:
                stale = time.time() - tmp.stat().st_mtime > other_host_age_s
            except FileNotFoundError:  # renamed into place (or removed) by its writer meanwhile
                continue
        if stale:
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
