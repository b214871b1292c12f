"""download_data.py's last line for retryable failures: what to delete so that a rerun fetches them again."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_ARGS = ["--processes", "1", "--threads", "4", "--timeout", "5", "--retries", "0", "--validate-workers", "1"]


def _jpeg(shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (shade, 100, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    routes = {"/img/0.jpg": Route(_jpeg(40)), "/busy.jpg": Route(status=503)}
    with ImageServer(routes) as srv:
        yield srv


def _source(tmp_path: Path, server: ImageServer, paths: list[str]) -> Path:
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"key": f"{i:04d}", "url": server.url(p), "caption": f"picture {i}", "md5": f"{i:032x}", "tags": "t",
         "merged_tags": "t, m"} for i, p in enumerate(paths)]), path)
    return path


def _named_files(stderr: str) -> list[str]:
    m = re.search(r"to retry, delete (.+?) and rerun the same command", stderr)
    assert m, stderr
    return [p.strip() for p in m.group(1).split(",")]


def test_the_stats_files_to_delete_are_named_by_a_path_that_works_from_where_the_user_is(server, tmp_path):
    """User impact: after timeouts or 5xx answers, download_data.py (exit 3) says "to retry, delete
    images/00000_stats.json and rerun the same command". That path is relative to the --output dir, not to the
    directory the user ran the command from (README: `python download_data.py --output ./data/contrastyles_full`
    from the checkout): `rm images/00000_stats.json` there fails or, worse, deletes another data dir's file.
    Expected: the files are named by a path that works from the user's working directory (the --output dir
    joined in, as the summary's other lines do: "images: /.../out/images")."""
    source = _source(tmp_path, server, ["/img/0.jpg", "/busy.jpg"])
    out = tmp_path / "data" / "out"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "download_data.py"), "--source", str(source),
                             "--output", str(out), *CLI_ARGS], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    named = _named_files(result.stderr)
    assert named and all((cwd / p).is_file() for p in named), (named, result.stderr)


def test_every_shard_with_retryable_failures_is_named(server, tmp_path):
    """User impact: README: "To retry a finished shard's retryable failures, delete its images/NNNNN_stats.json
    and rerun (the line printed at the end names them)". With more than 10 such shards (an outage over part of a
    40-shard download) the line names 10 and "...": the operator deletes those, reruns, and the rest of the
    retryable failures are silently never fetched again (exit 3 forever until they dig in the json).
    Expected: every shard is named, or the line says how many more there are and where the whole list is
    (download_summary.json's shards_with_retryable)."""
    paths = ["/busy.jpg"] * 12 + ["/img/0.jpg"]
    source = _source(tmp_path, server, paths)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "download_data.py", "--source", str(source), "--output", str(out),
                             "--shard-size", "1", *CLI_ARGS], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr
    line = result.stderr.split("to retry, delete", 1)[1].splitlines()[0]
    assert len(_named_files(result.stderr)) == 10 and f"and 2 more (shards_with_retryable in {out}" in line, line
