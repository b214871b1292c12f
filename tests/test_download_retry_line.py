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


def test_past_ten_shards_the_line_says_how_many_more_and_where_they_are_listed(tmp_path):
    """With more than 10 such shards (an outage over part of a 40-shard download) the line named 10 and "...":
    the operator deleted those, reran, and the rest were never fetched again (exit 3 until they dug in the json)."""
    from vlm_caption.download_summary import stats_files

    line = stats_files(tmp_path, list(range(12)))
    assert line.count("_stats.json") == 10 and line.startswith(str(tmp_path / "images" / "00000_stats.json"))
    assert line.endswith(f" and 2 more (shards_with_retryable in {tmp_path / 'download_summary.json'})"), line
    assert " more" not in stats_files(tmp_path, list(range(10)))
