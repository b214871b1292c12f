"""A hostile file system under the checkpoint dir: symlinks where lock files belong, a disk full before any work.
Each is one line (never a traceback, never a write outside the dir), and a rerun finishes every key once."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vlm_caption import locks, store
from vlm_caption.errors import EXIT_FATAL, EXIT_OK, EXIT_USAGE, UsageError


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


@pytest.mark.parametrize("site", ["locks/worker-000.lock", "run.json", "machines.json"])
def test_a_full_disk_at_a_write_before_any_work_is_one_line_exit_1_and_the_rerun_finishes(site, tmp_path, capsys,
                                                                                          monkeypatch):
    """The disk full at the first writes of a run (the worker lock's holder line, run.json, machines.json): an
    OSError traceback. Now one line naming the file, exit 1, nothing half written; the rerun captions each key once."""
    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.cli import run_main
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=6, broken=False, seed=5)
    ckpt = tmp_path / "ckpt"
    target = ckpt / site
    real_write, real_write_bytes = os.write, Path.write_bytes

    def full_write(fd, data_):
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data_)

    def full_write_bytes(self, data_):
        if self.name.startswith(f".{target.name}.tmp-"):
            self.write_text("")  # what reached the disk before it was full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data_)

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_write)
        m.setattr(Path, "write_bytes", full_write_bytes)
        with pytest.raises(SystemExit) as exc:
            run_main(main, dummy_args(data, ckpt))
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_FATAL and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: could not write {target}: No space left on device; finished parts are kept (every file is written "
        "whole or not at all): free space and rerun to resume"), err
    assert not list(ckpt.rglob(".*.tmp-*")) and not store.list_parts(ckpt)

    assert main(dummy_args(data, ckpt)) == EXIT_OK
    keys = pq.read_table(ckpt / store.MERGED, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6


def test_a_shard_parquet_that_is_a_symlink_is_set_aside_before_img2dataset_writes_through_it(tmp_path):
    """A finished shard's parquet a dangling link: its stats were set aside but the link stayed; an unfinished
    shard's parquet a link: img2dataset wrote the shard through either, outside the data dir."""
    from vlm_caption import download as dl
    from vlm_caption.data_layout import IMAGES_DIR

    images = tmp_path / IMAGES_DIR
    images.mkdir()
    (images / "00000_stats.json").write_text('{"end_time": 1.5}')
    (images / "00000.parquet").symlink_to(tmp_path / "nowhere-0")
    (images / "00001.parquet").symlink_to(tmp_path / "nowhere-1")
    dl.set_aside_unreadable_shards(tmp_path, n_rows=8, shard_size=4)
    assert not [p for p in images.iterdir() if p.is_symlink()] and not (images / "00000_stats.json").exists()
    assert sorted(p.name[:16] for p in (tmp_path / store.QUARANTINE_DIR).iterdir()) == [
        "00000.parquet.20", "00000_stats.json", "00001.parquet.20"]


def test_a_symlink_in_place_of_the_hub_ledger_is_set_aside_never_appended_through(tmp_path, caplog):
    """Each push appended its record through the link: to the file it named, outside the dir (a dangling one
    made that file)."""
    from vlm_caption import hub_ledger

    entry = {"repo": "r", "run_id": "x", "hub_path": "data/x/a.parquet", "worker": 0}
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    for n, target in enumerate((precious, tmp_path / "nowhere")):
        ckpt = tmp_path / f"ckpt-{n}"
        ckpt.mkdir()
        (ckpt / store.LEDGER).symlink_to(target)
        with caplog.at_level(logging.WARNING):
            hub_ledger.append_ledger(ckpt, [entry])
        assert "hub_ledger.jsonl is a symlink: moved to" in caplog.text
        assert not (ckpt / store.LEDGER).is_symlink() and hub_ledger.read_ledger(ckpt) == [entry]
    assert precious.read_text() == "keep me\n" and not (tmp_path / "nowhere").exists()


def test_a_file_system_without_flock_is_one_line(tmp_path, monkeypatch):
    """NFS mounted without locking answers flock with ENOLCK: an OSError traceback at the first lock taken."""
    import fcntl

    def no_locks(fd, mode):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(UsageError, match=r"the file system of .*worker-000.lock does not support flock locks \(No "
                                         r"locks available\): mount it with flock support"):
        locks.DirLock(tmp_path, 0).take_worker()
    with pytest.raises(UsageError, match="machines.lock does not support flock locks"):
        with locks.waiting_for(tmp_path / locks.LOCKS_DIR / "machines.lock"):
            pass


def _bad_part(tmp_path: Path) -> Path:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "captions-w000-000000.parquet").write_bytes(b"garbage")
    return parts / "captions-w000-000000.parquet"


def test_a_file_that_cannot_be_renamed_aside_is_never_copied(tmp_path, monkeypatch):
    """Any failed rename fell back to copy + delete: in a read-only parts/ the delete failed too, a copy stayed in
    quarantine/ beside the original, and the line said "could not write" the file it could not remove."""
    from vlm_caption import set_aside

    bad = _bad_part(tmp_path)
    monkeypatch.setattr(set_aside.os, "rename", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EACCES, os.strerror(errno.EACCES))))
    with pytest.raises(set_aside.FatalError, match=r"^cannot set .*captions-w000-000000.parquet aside \(bad\): "
                                                   r"renaming it to .* failed: Permission denied; make its folder"):
        set_aside.quarantine(tmp_path, bad, "bad")
    assert bad.read_bytes() == b"garbage" and not list((tmp_path / store.QUARANTINE_DIR).iterdir())


def test_across_file_systems_a_failed_delete_leaves_no_copy_and_says_so(tmp_path, monkeypatch):
    """parts/ a read-only mount (rename: EXDEV): copied, then the delete fails; the copy is removed again."""
    from vlm_caption import set_aside

    bad = _bad_part(tmp_path)
    real_unlink = os.unlink

    def read_only(path, *a, **kw):
        if Path(path) == bad:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(set_aside.os, "rename", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EXDEV, os.strerror(errno.EXDEV))))
    monkeypatch.setattr(set_aside.os, "unlink", read_only)
    with pytest.raises(set_aside.FatalError, match=r"removing it after copying it to .*quarantine \(another file "
                                                   r"system\) failed: Read-only file system; the copy was removed"):
        set_aside.quarantine(tmp_path, bad, "bad")
    assert bad.read_bytes() == b"garbage" and not list((tmp_path / store.QUARANTINE_DIR).iterdir())

    monkeypatch.setattr(set_aside.os, "unlink", real_unlink)  # writable again: copied across, the original gone
    set_aside.quarantine(tmp_path, bad, "bad")
    assert not bad.exists() and [p.read_bytes() for p in (tmp_path / store.QUARANTINE_DIR).iterdir()] == [b"garbage"]


def test_a_refused_read_is_not_called_a_write_and_a_full_disk_asks_for_space():
    """run_main's one line for an OSError of a full or refused file system said 'could not write PATH' for any
    PermissionError, a read of an unreadable metadata file too, and always asked to free space."""
    from vlm_caption.cli import disk_error_line

    read = disk_error_line(PermissionError(errno.EACCES, "Permission denied", "data/images/00000.parquet"))
    assert read.startswith("no permission for data/images/00000.parquet: Permission denied;"), read
    assert "write" not in read.split(";")[0] and "free space" not in read, read
    full = disk_error_line(OSError(errno.ENOSPC, "No space left on device", "ckpt/run.json"))
    assert full.startswith("could not write ckpt/run.json: No space left on device;") and "free space" in full, full
    assert "permissions" not in full, full
    readonly = disk_error_line(OSError("[errno 30] Read-only file system"))  # pyarrow: the errno in its text
    assert readonly.startswith("could not write: Read-only file system;") and "writable" in readonly, readonly


def test_a_checkpoint_dir_this_user_cannot_write_is_refused_but_a_dry_run_only_reads_it(sample_data_dir, tmp_path,
                                                                                        capsys, monkeypatch):
    """A run's dir must take writes (one line at once, not after an hour); --dry-run's plan writes nothing and
    was refused as well."""
    import vlm_caption.flag_checks as flag_checks
    from batched_image_inference import main
    from dummy_runs import dummy_args
    from test_bad_inputs import one_line_exit

    ckpt = tmp_path / "c"
    ckpt.mkdir()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(flag_checks.tempfile, "TemporaryFile", refused)  # (root writes anywhere: the refusal)
    code, err = one_line_exit(capsys, dummy_args(sample_data_dir, ckpt))
    assert code == EXIT_USAGE and f"--checkpoint-dir {ckpt} is not writable (Permission denied)" in err
    assert main(dummy_args(sample_data_dir, ckpt, "--dry-run")) == 0
    assert "to do 45, already done 0" in capsys.readouterr().out
