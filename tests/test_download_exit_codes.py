"""download_data.py's exit codes, run as a user runs it (a subprocess) against a 127.0.0.1 HTTP server.

0: every row is a valid image or a permanent failure (404); 3: nothing usable, retryable failures left
(5xx), or --strict and any failure. The counts are printed whatever the code.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route
from vlm_caption.download_summary import is_retryable

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_ARGS = ["--processes", "1", "--threads", "4", "--timeout", "5", "--retries", "0", "--validate-workers", "1"]


def _jpeg(shade: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (shade, 100, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    routes = {f"/img/{i}.jpg": Route(_jpeg(40 * i)) for i in range(3)}
    routes["/busy.jpg"] = Route(status=503)
    routes["/truncated.jpg"] = Route(_jpeg(7)[:300])  # served whole, cut short: saved, then fails to decode
    with ImageServer(routes) as srv:  # any other path answers 404
        yield srv


def _source(tmp_path: Path, server: ImageServer, paths: list[str]) -> Path:
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"key": f"{i:04d}", "url": server.url(p), "caption": f"picture {i}", "md5": f"{i:032x}", "tags": "t",
         "merged_tags": "t, m"} for i, p in enumerate(paths)]), path)
    return path


def _download(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "download_data.py", "--source", str(source), "--output", str(out),
                           *CLI_ARGS, *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _download_bounded(source: Path, out: Path, *extra: str, limit: float = 90) -> subprocess.CompletedProcess:
    """_download in a process group of its own, killed whole (img2dataset's pool included) if it hangs."""
    proc = subprocess.Popen([sys.executable, "download_data.py", "--source", str(source), "--output", str(out),
                             *CLI_ARGS, *extra], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"download_data.py still ran after {limit} s: a response held it") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_all_404_exits_3_saying_nothing_usable(server, tmp_path):
    source = _source(tmp_path, server, ["/gone/0.jpg", "/gone/1.jpg"])
    result = _download(source, tmp_path / "out")
    assert result.returncode == 3, result.stderr
    assert "Download summary" in result.stdout and "failed to download:  2" in result.stdout  # counts printed
    assert "nothing usable was downloaded" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((tmp_path / "out" / "download_summary.json").read_text())["valid"] == 0


def test_good_images_and_a_404_exit_0_and_strict_exits_3(server, tmp_path):
    source = _source(tmp_path, server, ["/img/0.jpg", "/gone.jpg", "/img/1.jpg", "/img/2.jpg"])
    out = tmp_path / "out"
    result = _download(source, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid images:        3" in result.stdout
    assert "failed to download:  1  (0 retryable" in result.stdout
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["failed"] == 1 and summary["failed_retryable"] == 0 and summary["shards_with_retryable"] == []

    # The same data with --strict (a rerun: nothing is downloaded again): the 404 now counts.
    strict = _download(source, out, "--strict")
    assert strict.returncode == 3, strict.stderr
    assert "--strict: 1 row failed for good" in strict.stderr
    assert "valid images:        3" in strict.stdout


def test_an_undecodable_image_alone_exits_0_and_3_with_strict(server, tmp_path):
    """A saved file PIL cannot decode is a permanent data failure: recorded, exit 0; --strict counts it."""
    source = _source(tmp_path, server, ["/img/0.jpg", "/truncated.jpg"])
    out = tmp_path / "out"
    result = _download(source, out)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["failed"] == 0 and summary["invalid"] == 1 and summary["valid"] == 1
    strict = _download(source, out, "--strict")
    assert strict.returncode == 3 and "--strict: 1 row failed for good" in strict.stderr, strict.stderr


@pytest.mark.parametrize("paths, says", [
    (["/img/0.jpg", "/busy.jpg"], "1 download failed in a way worth retrying"),
    # A whole first run lost to an outage: nothing usable, and still the line that says what to delete.
    (["/busy.jpg", "/busy.jpg"], "2 downloads failed in a way worth retrying"),
])
def test_a_5xx_is_retryable_work_left(server, tmp_path, paths, says):
    source = _source(tmp_path, server, paths)
    result = _download(source, tmp_path / "out")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"failed to download:  {paths.count('/busy.jpg')}  ({paths.count('/busy.jpg')} retryable" in result.stdout
    assert ("nothing usable was downloaded" in result.stderr) == ("/img/0.jpg" not in paths)
    # A rerun skips finished shards, so the message says how to retry this one: by a path that works from where
    # the user is (it said images/00000_stats.json, under --output: an rm from the checkout missed it)
    stats = tmp_path / "out" / "images" / "00000_stats.json"
    assert says in result.stderr and f"to retry, delete {stats} and rerun" in result.stderr and stats.is_file()


@pytest.mark.parametrize("message, retryable", [
    ("timed out", True),
    ("The read operation timed out", True),
    ("<urlopen error timed out>", True),
    ("HTTP Error 503: Service Unavailable", True),
    ("HTTP Error 429: Too Many Requests", True),
    ("<urlopen error [Errno 111] Connection refused>", True),
    ("Remote end closed connection without response", True),
    ("<urlopen error [Errno -3] Temporary failure in name resolution>", True),
    ("HTTP Error 404: File not found", False),
    ("HTTP Error 403: Forbidden", False),
    ("HTTP Error 410: Gone", False),
    ("<urlopen error [Errno -2] Name or service not known>", False),
    ("hash mismatch", False),
    ("unknown url type: 'ftp'", False),
    (None, False),
])
def test_retryable_rule(message, retryable):
    assert is_retryable(message) is retryable


def test_a_sample_img2dataset_cannot_write_leaves_its_shard_unfinished_not_a_row_short(tmp_path):
    """Disk full or a file size limit while img2dataset writes one image: it prints the error, leaves the row
    out of the shard parquet and marks the shard done. That shard is set aside (exit 3), and a rerun with room
    downloads it again, every row back with its metadata."""
    import resource

    from PIL import Image

    noise = io.BytesIO()  # ~110 KB: over the limit below, which the small files and parquets stay under
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(noise, "JPEG", quality=95)
    limit = 60_000
    assert len(noise.getvalue()) > limit
    routes = {"/img/0.jpg": Route(_jpeg(10)), "/big.jpg": Route(noise.getvalue()), "/img/1.jpg": Route(_jpeg(90))}
    with ImageServer(routes) as srv:
        source = _source(tmp_path, srv, list(routes))
        out = tmp_path / "out"
        full = subprocess.run(
            [sys.executable, "download_data.py", "--source", str(source), "--output", str(out), *CLI_ARGS],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        assert full.returncode == 3, full.stdout + full.stderr
        assert "missing 1 of its 3 rows" in full.stderr and "1 shard did not finish" in full.stderr
        # img2dataset's traceback of the failed write is in the log the run names, not on the terminal
        assert "Traceback" not in full.stderr and f"worker error are in {out / 'download_errors.log'}" in full.stderr
        assert "OSError: [Errno 27] File too large" in (out / "download_errors.log").read_text()
        assert "UNFINISHED shards:   1 (00000)" in full.stdout
        assert not (out / "images" / "00000_stats.json").exists()
        # Not there while a shard is unfinished: the captioner would take it for the whole set and exit 0.
        assert not (out / "full_metadata.parquet").exists() and not (out / "metadata.csv").exists()
        assert "full_metadata.parquet and metadata.csv are written once every shard is done" in full.stdout

        rerun = _download(source, out)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["valid"] == 3 and summary["failed"] == 0 and summary["shards"]["unfinished"] == []
    assert sorted(pq.read_table(out / "full_metadata.parquet").column("original_key").to_pylist()) == \
        ["0000", "0001", "0002"]


def test_a_failure_reason_of_several_lines_is_printed_on_one(capsys):
    """urllib's redirect-loop error spans three lines; printed as is, its tail reads like lines of their own."""
    from vlm_caption.download_summary import print_summary

    loop = ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
            "The last 30x error message was:\nFound")
    print_summary(Path("out"), {"rows_in": 2, "shards": {"total": 1, "unfinished": []}, "shard_size": 10,
                                "downloaded": 1, "failed": 1, "failed_retryable": 0, "failure_reasons": {loop: 1},
                                "invalid": 0, "valid": 1})
    reasons = [line for line in capsys.readouterr().out.splitlines() if line.startswith("      ")]
    assert reasons == ["             1  HTTP Error 302: The HTTP server returned a redirect error that would lead to "
                       "an infinite loop. The last 30x error message was: Found"]


def test_a_disk_that_fills_up_is_one_fatal_line_not_a_traceback(server, tmp_path):
    """Our own writes (urls.parquet first) hitting a full disk or a size limit: exit 1, one line, as the README says."""
    import resource

    source = _source(tmp_path, server, ["/img/0.jpg", "/img/1.jpg"])
    result = subprocess.run(
        [sys.executable, "download_data.py", "--source", str(source), "--output", str(tmp_path / "out"), *CLI_ARGS],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))  # urls.parquet is larger
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "download_data.py: error: cannot write to --output" in result.stderr and "File too large" in result.stderr


def test_an_output_it_may_not_write_is_one_line(server, tmp_path, monkeypatch):
    import errno

    from vlm_caption import download as dl
    from vlm_caption.config import DownloadConfig
    from vlm_caption.errors import FatalError

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(dl, "atomic_write_table", denied)
    source = _source(tmp_path, server, ["/img/0.jpg"])
    with pytest.raises(FatalError, match="cannot write to --output .*urls.parquet.*Permission denied"):
        dl.download_dataset(DownloadConfig(output=str(tmp_path / "out"), source=str(source), processes=1))


def test_endless_dripping_huge_or_cut_bodies_end_as_recorded_failures(tmp_path):
    """urllib's --timeout bounds each wait for bytes, not a response: a body without end grew in the worker's
    memory and one dripped a byte at a time held its shard, both for ever. Now: too large (permanent) past
    --max-image-mb, timed out (retryable) past 3 times --timeout, and a body cut short stays retryable."""
    jpeg = _jpeg(5)
    routes = {"/img/0.jpg": Route(jpeg), "/endless.jpg": Route(jpeg, endless=True),
              "/drip.jpg": Route(jpeg, drip_seconds=0.2), "/huge.jpg": Route(jpeg, advertised_length=2 << 20),
              "/cut.jpg": Route(jpeg, advertised_length=len(jpeg) + 100)}
    with ImageServer(routes) as srv:
        source = _source(tmp_path, srv, list(routes))
        result = _download_bounded(source, tmp_path / "out", "--timeout", "1", "--max-image-mb", "1")
    assert result.returncode == 3, result.stdout + result.stderr  # the timeout and the cut body are retryable
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "out" / "download_summary.json").read_text())
    assert summary["valid"] == 1 and summary["failed"] == 4 and summary["failed_retryable"] == 2
    reasons = sorted(summary["failure_reasons"])
    assert reasons[0] == f"IncompleteRead({len(jpeg)} bytes read, 100 more expected)"
    assert reasons[1].startswith("timed out: the whole response took over 3 s")
    assert reasons[2:] == ["too large: Content-Length 2097152 is over the 1 MB cap (--max-image-mb)",
                           "too large: the body is over the 1 MB cap (--max-image-mb)"]
    assert [is_retryable(r) for r in reasons] == [True, True, False, False]


def test_a_status_line_dripped_a_byte_per_timeout_ends_as_timed_out(tmp_path):
    """The body loop's deadline missed the status line and headers: a byte per --timeout held a thread for days."""
    import socket
    import threading

    from vlm_caption.download_client import bounded_download_image

    srv = socket.create_server(("127.0.0.1", 0))

    def drip():
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):
            for byte in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"x" * 100:
                conn.sendall(bytes([byte]))
                time.sleep(0.5)

    threading.Thread(target=drip, daemon=True).start()
    start = time.monotonic()
    with srv:
        _, body, error = bounded_download_image((0, f"http://127.0.0.1:{srv.getsockname()[1]}/a.jpg"), 1, None, None,
                                                1 << 20)
    assert time.monotonic() - start < 6 and body is None
    assert error.startswith("timed out: the whole response took over 3 s") and is_retryable(error)


def _group(pgid: int) -> list[int]:
    """The live processes of a process group, its leader left out (Linux /proc). A zombie is left out too: an
    orphan's waits for init (or whatever PID 1 is in a container) to reap it."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and int(stat.parent.name) != pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def _ignores_sigint(pid: int) -> bool:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return bool(int(re.search(r"^SigIgn:\s*([0-9a-f]+)", status, re.M).group(1), 16) & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_mid_download_is_one_line_exit_130_and_a_rerun_completes(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: img2dataset's pool workers and its logger process
    printed KeyboardInterrupt tracebacks, and the resource tracker a leaked-semaphore warning, around our line.
    They ignore SIGINT now (the parent stops them), and the rerun downloads every row."""
    slow = {f"/slow/{i}.jpg": Route(_jpeg(i), delay_seconds=0.5) for i in range(40)}
    with ImageServer(slow) as srv:
        source = _source(tmp_path, srv, list(slow))
        out = tmp_path / "out"
        proc = subprocess.Popen([sys.executable, "download_data.py", "--source", str(source), "--output", str(out),
                                 *CLI_ARGS, "--processes", "2", "--threads", "2", "--shard-size", "10"],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while srv.request_count() < 4 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert srv.request_count() >= 4, "img2dataset never asked for images"
            children = [pid for pid in _group(proc.pid) if b"spawn_main" in _cmdline(pid)]
            assert len(children) >= 3, children  # 2 pool workers and the logger process
            assert all(_ignores_sigint(pid) for pid in children)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, err
        shown = [line for line in err.splitlines() if line.strip() and not re.match(r"\d+it \[", line)]
        assert shown == ["download_data.py: interrupted (SIGINT); finished parts are kept, rerun to resume"], err

        srv.replace_routes({path: Route(route.body) for path, route in slow.items()})  # the rerun needs no delay
        rerun = _download(source, out)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["valid"] == 40 and summary["failed"] == 0 and summary["shards"]["unfinished"] == []


def test_spark_and_ray_executors_get_img2dataset_s_own_client():
    """The bounded client is pickled to the workers by reference to this package, which a Spark or Ray
    executor need not have: there img2dataset's own Downloader stays."""
    import importlib

    from vlm_caption.download_client import BoundedDownloader, bounded_downloads

    main = importlib.import_module("img2dataset.main")
    original = main.Downloader
    for distributor in ("pyspark", "ray"):
        with bounded_downloads(1 << 20, distributor):
            assert main.Downloader is original
    with bounded_downloads(1 << 20, "multiprocessing"):
        made = main.Downloader(*[None] * 14, user_agent_token=None, disallowed_header_directives=None)
        assert isinstance(made, BoundedDownloader) and made.max_bytes == 1 << 20
    assert main.Downloader is original
