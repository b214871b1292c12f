"""A hostile file system under the checkpoint dir: symlinks where lock files belong, a disk full before any work.
Each is one line (never a traceback, never a write outside the dir), and a rerun finishes every key once."""
from __future__ import annotations

import logging

import pytest

from vlm_caption import locks
from vlm_caption.errors import UsageError


def test_a_symlink_in_place_of_a_lock_file_is_one_line_and_the_file_it_names_is_left_alone(tmp_path):
    """The holder line was written through the link: a lock file linked to any file (or a dangling link) truncated
    and overwrote that file, outside the dir (a dangling one made it)."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    for name in (locks.RUN_LOCK, "worker-000.lock", "machines.lock"):
        ckpt = tmp_path / name
        (ckpt / locks.LOCKS_DIR).mkdir(parents=True)
        (ckpt / locks.LOCKS_DIR / name).symlink_to(precious)
        with pytest.raises(UsageError, match=f"{name} is a symlink, not a lock file: remove it and rerun"):
            lock = locks.DirLock(ckpt, 0)
            assert lock.take_worker() is None
            lock.take_run(exclusive=True)
            with locks.waiting_for(ckpt / locks.LOCKS_DIR / "machines.lock"):
                pass
        lock.release()
    gone = tmp_path / "download" / "nowhere.txt"
    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "download.lock").symlink_to(gone)
    with pytest.raises(UsageError, match="download.lock is a symlink"):
        locks.hold_exclusive(tmp_path / "download" / "download.lock", "the data dir")
    assert precious.read_text() == "keep me\n" and not gone.exists()


def test_a_dangling_symlink_among_the_worker_locks_is_warned_about_not_a_traceback(tmp_path, caplog):
    """Another worker's lock a dangling link: reading who holds the dir raised a FileNotFoundError traceback."""
    (tmp_path / locks.LOCKS_DIR).mkdir()
    (tmp_path / locks.LOCKS_DIR / "worker-005.lock").symlink_to(tmp_path / "nowhere")
    lock = locks.DirLock(tmp_path, 0)
    with caplog.at_level(logging.WARNING):
        assert lock.take_worker() is None and lock.holders() == [] and lock.other_worker_counts() == []
    lock.release()
    assert "worker-005.lock cannot be opened as a lock file" in caplog.text and not (tmp_path / "nowhere").exists()
