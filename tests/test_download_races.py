"""download_data.py against another process of the same --output, and against its own kills: deterministic
interleavings (one OS call or one step monkeypatched so that "the other process" acts in between), no sleeps."""
from __future__ import annotations

import fcntl
import os
import signal
import socket

import pyarrow as pa
import pytest

from vlm_caption import download as dl
from vlm_caption import download_client, locks
from vlm_caption.config import DownloadConfig
from vlm_caption.data_layout import WORKERS_LOCK
from vlm_caption.download_source import SOURCE_COLUMNS
from vlm_caption.errors import UsageError
from vlm_caption.interrupts import Interrupted


def _source(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "src.parquet"
    pq.write_table(pa.table({c: ["http://127.0.0.1:9/a.jpg" if c == "url" else "x"] for c in SOURCE_COLUMNS}), path)
    return str(path)


def test_a_rerun_while_a_killed_runs_worker_still_writes_a_shard_is_refused(tmp_path, monkeypatch):
    """kill -9 of download_data.py alone (the OOM killer, `kill PID`) leaves img2dataset's pool workers running:
    each finishes its shard, writing parquet, images and stats in place. A rerun took the free download.lock and
    downloaded the same shard into the same files at once (an interleaved parquet, a stats file of either)."""
    out = tmp_path / "out"
    cfg = DownloadConfig(output=str(out), source=_source(tmp_path), processes=1)
    out.mkdir()
    dl.write_urls(out, dl.url_table(dl.load_source(cfg.source, cfg.split, None)), cfg.shard_size)  # the killed run's
    orphan = locks.open_lock(out / WORKERS_LOCK)  # the killed run's worker, on its shard
    fcntl.flock(orphan, fcntl.LOCK_SH)
    started = []
    monkeypatch.setattr(dl, "run_img2dataset", lambda *a, **k: started.append(1))
    try:
        with pytest.raises(UsageError, match="still writing") as e:
            dl.download_dataset(cfg)
    finally:
        os.close(orphan)
    assert "\n" not in str(e.value) and not started


def test_a_worker_holds_the_workers_lock_while_on_a_shard_and_an_orphan_starts_none(tmp_path, monkeypatch):
    from img2dataset import downloader as i2d

    lock = tmp_path / WORKERS_LOCK
    seen = []

    def download_shard(self, row):  # img2dataset's own Downloader.__call__, in a pool worker
        fd = locks.open_lock(lock)
        seen.append(locks.try_flock(fd, fcntl.LOCK_EX))  # a rerun's check, while the shard is written
        os.close(fd)
        return True, row

    monkeypatch.setattr(i2d.Downloader, "__call__", download_shard)
    worker = download_client.BoundedDownloader.__new__(download_client.BoundedDownloader)
    worker.max_bytes, worker.errors, worker.shard_lock, worker.parent = 1, None, str(lock), os.getppid()
    assert worker((0, "shard")) == (True, (0, "shard")) and seen == [False]
    fd = locks.open_lock(lock)
    assert locks.try_flock(fd, fcntl.LOCK_EX)  # let go after the shard
    os.close(fd)

    worker.parent = os.getppid() + 1  # the run that started it was killed: this process was reparented
    assert worker((1, "shard")) == (False, (1, "shard")) and seen == [False]  # the rerun does it


def test_a_relaunch_after_a_kill_mid_urls_parquet_is_not_refused_as_someone_elses_dir(tmp_path, monkeypatch):
    """kill -9 while the first run of a new --output wrote urls.parquet leaves its tmp file there: every relaunch
    was refused as 'not a download_data.py output' until the user found and deleted a dot file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "download.lock").write_text("")
    (out / WORKERS_LOCK).write_text("")
    (out / f".urls.parquet.tmp-{socket.gethostname()}-999999999.1").write_bytes(b"PAR1 half")

    def killed(*args, **kwargs):  # stops the run where img2dataset would start
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(dl, "run_img2dataset", killed)
    with pytest.raises(Interrupted):
        dl.download_dataset(DownloadConfig(output=str(out), source=_source(tmp_path), processes=1))
    assert (out / "urls.parquet").is_file() and not list(out.glob(".urls.parquet.tmp-*"))
