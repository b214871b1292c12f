"""Races between processes sharing one checkpoint dir (Slurm arrays, torchrun, --num-workers N): found by
starting many workers at once; each test pins one interleaving down."""
from __future__ import annotations

import fcntl
import os
import threading

from vlm_caption.locks import LOCKS_DIR, DirLock


def test_a_worker_id_only_looked_at_by_another_process_is_free(tmp_path):
    """holders() (every starting worker's check of the others' counts) takes each worker lock shared for an
    instant; a worker taking its own lock at that instant was refused as "in use by" a process long gone (a
    thread looking in a loop got up to 610 of 3,906 takes of a free worker id refused)."""
    lock_dir = tmp_path / LOCKS_DIR
    lock_dir.mkdir()
    path = lock_dir / "worker-000.lock"
    path.write_text("pid 1 on host gone, worker 0 of 2, since yesterday\n")  # an earlier run's holder
    look = os.open(path, os.O_RDONLY)
    fcntl.flock(look, fcntl.LOCK_SH)  # the other process's look, caught in the middle
    threading.Timer(0.1, lambda: os.close(look)).start()
    worker = DirLock(tmp_path, 0, 2)
    try:
        assert worker.take_worker() is None
    finally:
        worker.release()


def test_a_live_holder_of_the_worker_id_is_still_named(tmp_path):
    first, second = DirLock(tmp_path, 0, 2), DirLock(tmp_path, 0, 2)
    second.probe_grace_s = 0.05
    try:
        assert first.take_worker() is None
        assert f"pid {os.getpid()}" in second.take_worker()
    finally:
        first.release()


def test_a_process_holding_only_its_worker_id_is_not_gone(tmp_path):
    """A torchrun rank waiting for rank 0's run.json holds its worker id but not yet the dir: a worker ending
    then was "last out" and merged (and wrote the card) while that rank was about to caption."""
    from vlm_caption.locks import DirLock

    a, b = DirLock(tmp_path, 0, 2), DirLock(tmp_path, 1, 2)
    try:
        assert a.take_worker() is None and a.take_run(exclusive=False)
        assert b.take_worker() is None  # waiting for run.json
        assert a.last_one_out() is False
        assert b.take_run(exclusive=False)
        assert b.last_one_out() is True
    finally:
        a.release()
        b.release()


def test_a_directory_in_place_of_a_lock_file_is_a_one_line_usage_error(tmp_path):
    import pytest

    from vlm_caption import locks
    from vlm_caption.errors import UsageError

    for name in ("worker-000.lock", locks.RUN_LOCK, "machines.lock"):
        (tmp_path / name / LOCKS_DIR / name).mkdir(parents=True)
    with pytest.raises(UsageError, match=r"worker-000.lock is a directory, not a lock file: move it aside"):
        DirLock(tmp_path / "worker-000.lock", 0).take_worker()
    lock = DirLock(tmp_path / locks.RUN_LOCK, 0)
    assert lock.take_worker() is None
    with pytest.raises(UsageError, match=r"run.lock is a directory"):
        lock.take_run(exclusive=True)
    lock.release()
    with pytest.raises(UsageError, match=r"machines.lock is a directory"):
        with locks.waiting_for(tmp_path / "machines.lock" / LOCKS_DIR / "machines.lock"):
            pass


def test_merge_only_of_a_dir_a_worker_still_holds_names_it(tmp_path, caplog, capsys):
    """Its keys not yet written count as missing (exit 4): without a word that the dir is live, lost work. Its
    merge is left to the dir's last worker (one written now could replace that worker's, older)."""
    import logging

    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=8)
    ckpt = tmp_path / "c"
    assert main(dummy_args(data, ckpt, "--max-images", "4")) == EXIT_OK
    merged = (ckpt / "all_captions.parquet").stat()
    capsys.readouterr()
    worker = DirLock(ckpt, 0)
    try:
        assert worker.take_worker() is None  # a relaunch captioning the rest, say
        with caplog.at_level(logging.WARNING):
            # keys missing while a worker still captions: work left (3), not a defect of the set (4)
            assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(ckpt)]) == EXIT_ITEMS_FAILED
    finally:
        worker.release()
    assert f"{ckpt} is still in use by pid {os.getpid()}" in caplog.text
    assert f"{ckpt / 'all_captions.parquet'} not written: {ckpt} is in use" in capsys.readouterr().out
    assert (ckpt / "all_captions.parquet").stat().st_ino == merged.st_ino


def test_merge_only_and_a_worker_ending_meanwhile_leave_a_merge_of_every_part(tmp_path, monkeypatch, capsys):
    """--merge-only read the parts, a relaunched worker then captioned the rest and merged the dir as its last
    worker out, and --merge-only's older merge replaced that file: the worker's rows gone from it (in the parts
    still). The merge is now written holding the dir: the worker waits for it, or --merge-only leaves the file to
    a live dir's last worker."""
    from dummy_runs import clear_launch_env, dummy_args, merged_rows

    from batched_image_inference import main
    from vlm_caption import merge, store
    from vlm_caption.errors import EXIT_OK, UsageError
    from vlm_caption.sample_data import write_sample

    clear_launch_env(monkeypatch)
    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=8)
    ckpt = tmp_path / "c"
    assert main(dummy_args(data, ckpt, "--max-images", "4")) == EXIT_OK
    monkeypatch.setattr(DirLock, "share_wait_s", 1.0)  # the worker's wait for a merge holding the dir
    real_ranges, relaunched = merge._part_ranges, []

    def a_worker_ends_in_between(dirs):
        found = real_ranges(dirs)
        if not relaunched:  # --merge-only's listing: the relaunch runs to its end now
            try:
                relaunched.append(main(dummy_args(data, ckpt)))
            except UsageError as e:  # it waited for the merge holding the dir (share_wait_s), in vain here
                relaunched.append(str(e))
        return found

    monkeypatch.setattr(merge, "_part_ranges", a_worker_ends_in_between)
    main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(ckpt)])
    monkeypatch.setattr(merge, "_part_ranges", real_ranges)
    parts = {k for _, keys in store.read_keys(store.list_parts(ckpt)) for k in keys}
    assert relaunched and sorted(r["key"] for r in merged_rows(ckpt)) == sorted(parts), capsys.readouterr().out
    assert relaunched == [EXIT_OK] or "--merge-only merging since" in relaunched[0], relaunched
