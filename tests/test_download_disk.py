"""A disk that fills up while img2dataset downloads: img2dataset prints its workers' ENOSPC tracebacks and returns
with shards unfinished; the run said "N shards did not finish; rerun" (exit 3), a rerun failing the same way. Now
one line saying the disk is full (exit 1), and the rerun with space finishes every row once."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple

import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route
from tests.test_download_exit_codes import _download, _source
from vlm_caption import download_space
from vlm_caption.errors import EXIT_FATAL, EXIT_OK

StatVfs = namedtuple("StatVfs", "f_bavail f_frsize")


def test_free_space_under_a_shard_is_named(tmp_path, monkeypatch):
    images = tmp_path / "images" / "00000"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i}.jpg").write_bytes(bytes(10_000))
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=100, f_frsize=4096))
    why = download_space.out_of_space(tmp_path, [0], shard_size=1000)  # ~12 KiB a file, 3 files a row
    assert why is not None and why.startswith("400.0 KiB free, a shard of this download takes about 35.2 MiB")
    monkeypatch.setattr(download_space.os, "statvfs", lambda _: StatVfs(f_bavail=10 ** 9, f_frsize=4096))
    assert download_space.out_of_space(tmp_path, [0], shard_size=1000) is None
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]  # the probe is gone


def test_a_quota_that_no_free_count_shows_is_found_by_a_write(tmp_path, monkeypatch):
    real_open = open

    def over_quota(path, mode="r", *a, **kw):
        if ".space-probe-" in str(path):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(download_space, "open", over_quota, raising=False)
    assert "Disk quota exceeded" in download_space.out_of_space(tmp_path, [0], shard_size=10)


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
        assert last.startswith(f"download_data.py: error: --output {out}: the disk is full (") and last.endswith(
            "did not finish: free space and rerun the same command (finished shards are kept)"), result.stderr

        subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
        result = _download(source, out, "--shard-size", "4")
        assert result.returncode == EXIT_OK, result.stderr
    rows = pq.read_table(out / "full_metadata.parquet").to_pylist()
    assert sorted(r["original_key"] for r in rows) == [f"{i:04d}" for i in range(10)]
    assert all(r["caption"] == f"picture {int(r['original_key'])}" and r["merged_tags"] == "t, m" for r in rows)
