"""A disk that fills up while img2dataset downloads: img2dataset prints its workers' ENOSPC tracebacks and returns
with shards unfinished; the run said "N shards did not finish; rerun" (exit 3), a rerun failing the same way. Now
one line saying the disk is full (exit 1), and the rerun with space finishes every row once."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route
from tests.test_download_exit_codes import _download, _source
from vlm_caption import download_space
from vlm_caption.errors import EXIT_FATAL, EXIT_ITEMS_FAILED, EXIT_OK, FatalError

StatVfs = namedtuple("StatVfs", "f_bavail f_frsize")


def test_free_space_under_a_shard_is_a_warning_and_under_a_row_the_disk_full_verdict(tmp_path, monkeypatch):
    images = tmp_path / "images" / "00000"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(bytes(10_000))
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=1000, f_frsize=4096))
    low = download_space.low_space(tmp_path, [0], shard_size=1000)  # ~12 KiB a file, 3 files a row
    assert low is not None and low.startswith("3.9 MiB free, a shard of this download takes about 35.2 MiB")
    assert download_space.out_of_space(tmp_path, [0]) is None  # writes still succeed: no evidence of a full disk
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=5, f_frsize=4096))
    assert download_space.out_of_space(tmp_path, [0]) == "20.0 KiB free"  # under MIN_FREE
    monkeypatch.setattr(download_space, "MIN_FREE", 4096)
    assert download_space.out_of_space(tmp_path, [0]) == (
        "20.0 KiB free, a row of images of this download takes about 36.0 KiB")
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=10 ** 9, f_frsize=4096))
    assert download_space.low_space(tmp_path, [0], shard_size=1000) is None
    assert download_space.out_of_space(tmp_path, [0]) is None
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]  # the probe is gone


def _stopped_short(tmp_path, monkeypatch, free_blocks: int):
    """A download whose img2dataset returns with its shard unfinished (a worker killed for memory, the network
    gone) after saving a few ~12 KiB files, on a disk with free_blocks of 4 KiB free: run_download's code."""
    from vlm_caption import download as dl
    from vlm_caption.config import DownloadConfig

    source = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"key": f"{i:04d}", "url": f"http://127.0.0.1:9/{i}.jpg", "caption": f"picture {i}", "md5": f"{i:032x}",
         "tags": "t", "merged_tags": "t, m"} for i in range(4)]), source)

    def stopped_short(out, urls, cfg):
        folder = out / "images" / "00000"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            (folder / f"00000000{i}.jpg").write_bytes(bytes(10_000))

    monkeypatch.setattr(dl, "run_img2dataset", stopped_short)
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=free_blocks, f_frsize=4096))
    cfg = DownloadConfig(output=str(tmp_path / "out"), source=str(source), processes=1, threads=2,
                         shard_size=10_000, validate_workers=1)
    return dl.run_download(cfg)


def test_a_shard_unfinished_for_another_reason_on_a_nearly_full_disk_is_retryable_with_a_warning(
        tmp_path, monkeypatch, caplog):
    """Free space under a shard's estimate (~350 MiB here, 9 GB for 10,000 rows of art) said "the disk is full",
    exit 1, though the shard stopped for another reason and writes succeed: exit 3, its line and a warning."""
    with caplog.at_level("WARNING"):
        code = _stopped_short(tmp_path, monkeypatch, free_blocks=10_000)  # 39 MiB free
    assert code == EXIT_ITEMS_FAILED
    assert "1 shard did not finish; rerun the same command to retry it" in caplog.text
    assert "is nearly full (39.1 MiB free, a shard of this download takes about 351.6 MiB)" in caplog.text


def test_a_disk_with_less_free_than_a_row_is_full(tmp_path, monkeypatch):
    with pytest.raises(FatalError, match=r"the disk is full \(400.0 KiB free\); 1 shard did not finish"):
        _stopped_short(tmp_path, monkeypatch, free_blocks=100)


def test_a_quota_that_no_free_count_shows_is_found_by_a_write(tmp_path, monkeypatch):
    real_open = open

    def over_quota(path, mode="r", *a, **kw):
        if ".space-probe-" in str(path):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(download_space, "open", over_quota, raising=False)
    assert "Disk quota exceeded" in download_space.out_of_space(tmp_path, [0])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root and mount; skipped elsewhere), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_disk_full_mid_download_is_one_line_exit_1_and_the_rerun_with_space_finishes(small_tmpfs, tmp_path):
    from PIL import Image

    def big_jpeg(i: int) -> bytes:
        import io

        buf = io.BytesIO()
        Image.effect_noise((160, 120), 40 + i).convert("RGB").save(buf, "JPEG", quality=95)
        return buf.getvalue()

    routes = {f"/img/{i}.jpg": Route(big_jpeg(i)) for i in range(10)}
    with ImageServer(routes) as server:
        source = _source(tmp_path, server, list(routes))
        out = small_tmpfs / "out"
        result = _download(source, out, "--shard-size", "4")
        assert result.returncode == EXIT_FATAL, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"download_data.py: error: --output {out}: the disk is full (") and (
            "did not finish: free space and rerun the same command (finished shards are kept); the tracebacks of "
            "img2dataset's ") in last, result.stderr
        # img2dataset's ENOSPC tracebacks: not on the terminal, in a log the last line names (the data dir's disk
        # being full, in the system temp dir); its one line per failed sample stays on stdout
        assert "Traceback" not in result.stderr and "No space left on device" in result.stdout
        logs = [Path(p) for p in last.rsplit(" are in ", 1)[1].split(" and ")]  # the data dir's, or the fallback
        assert "OSError: [Errno 28] No space left on device" in "".join(p.read_text() for p in logs)
        for log in logs:
            if log.parent != out:
                log.unlink()

        subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
        result = _download(source, out, "--shard-size", "4")
        assert result.returncode == EXIT_OK, result.stderr
    rows = pq.read_table(out / "full_metadata.parquet").to_pylist()
    assert sorted(r["original_key"] for r in rows) == [f"{i:04d}" for i in range(10)]
    assert all(r["caption"] == f"picture {int(r['original_key'])}" and r["merged_tags"] == "t, m" for r in rows)
