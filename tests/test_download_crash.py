"""download_data.py killed for real (SIGKILL to its whole process group), rerun, compared with a clean run.

50 source rows in 5 shards of 10, served by tests/image_server.py on 127.0.0.1 with a 0.1 s delay per
response so a shard takes about half a second: a 404, a 0-byte body, an HTML page, a truncated JPEG,
and in every shard two 5000x5000 PNGs that take ~0.1 s each to decode, so validation lasts long enough
to be killed in the middle.

Kill points: (1) while img2dataset downloads: shard 0 finished, shard 1 half written; (2) while the
images are decode-checked: some shards validated, outputs not built yet. Each kill is followed by a rerun
of the same command; the last one finishes. Its outputs must equal a clean run's, and the reruns must
not have fetched a URL of a shard that had finished.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.image_server import ImageServer, Route
from vlm_caption import data_layout as layout
from vlm_caption import download as dl

REPO_ROOT = Path(__file__).resolve().parent.parent
N_ROWS, SHARD_SIZE = 50, 10
SHARDS = list(range(N_ROWS // SHARD_SIZE))
BAD = {3: "/missing-3.jpg", 14: "/empty-14.jpg", 25: "/page-25.jpg", 36: "/truncated-36.jpg"}
BIG = {i for i in range(N_ROWS) if i % SHARD_SIZE in (5, 6)}  # slow to decode: two per shard
DELAY = 0.1  # seconds per response: with 2 threads, about 0.5 s a shard
CLI_ARGS = ["--processes", "1", "--threads", "2", "--timeout", "10", "--retries", "0",
            "--shard-size", str(SHARD_SIZE), "--validate-workers", "1"]
RUN_TIMEOUT = 90  # seconds; a run takes 1-10 s here


def _jpeg(i: int) -> bytes:
    img = Image.linear_gradient("L").convert("RGB").resize((48 + i, 40))
    img.paste((i * 5 % 256, 90, 200), (0, 0, 8, 8))  # every image differs
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5000, 5000), (30, 60, 90)).save(buf, "PNG")  # ~70 KB, 75 MB of pixels
    return buf.getvalue()


def _path(i: int) -> str:
    return BAD.get(i) or (f"/big-{i}.png" if i in BIG else f"/img-{i}.jpg")


def _routes() -> dict[str, Route]:
    big = _big_png()
    routes = {_path(i): Route(big if i in BIG else _jpeg(i), delay_seconds=DELAY) for i in range(N_ROWS)
              if i not in BAD}
    truncated = _jpeg(99)
    routes["/empty-14.jpg"] = Route(b"", delay_seconds=DELAY)
    routes["/page-25.jpg"] = Route(b"<html><body>gone</body></html>", content_type="text/html", delay_seconds=DELAY)
    routes["/truncated-36.jpg"] = Route(truncated[: len(truncated) // 2], delay_seconds=DELAY)
    return routes  # /missing-3.jpg is not in the table: 404


@pytest.fixture(scope="module")
def server():
    with ImageServer(_routes()) as srv:
        yield srv


@pytest.fixture(scope="module")
def source(server, tmp_path_factory) -> Path:
    rows = [{"key": f"{i:05d}", "url": server.url(_path(i)), "caption": f"picture {i}", "md5": f"{i:032x}",
             "tags": f"tag{i}", "merged_tags": f"tag{i}, art"} for i in range(N_ROWS)]
    path = tmp_path_factory.mktemp("src") / "source.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------------------------------------- running

def _start(source: Path, out: Path, log: Path) -> subprocess.Popen:
    # A session of its own: img2dataset's worker and logger processes join its process group, so one
    # killpg stops all of them at once, as a lost node or a job scheduler's kill would.
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "download_data.py", "--source", str(source), "--output", str(out),
                                 *CLI_ARGS], cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _run(source: Path, out: Path, log: Path) -> None:
    proc = _start(source, out, log)
    assert proc.wait(timeout=RUN_TIMEOUT) == 0, log.read_text()


def _kill_when(source: Path, out: Path, log: Path, ready) -> None:
    """Start a run and SIGKILL its process group as soon as ready(out) holds; fail if it ends first."""
    proc = _start(source, out, log)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready(out):
        assert proc.poll() is None, f"the run ended before the kill point:\n{log.read_text()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    # A process with a pending SIGKILL never runs another instruction of its own: the rerun may start at once.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _downloading_shard_1(out: Path) -> bool:
    images = out / "images"
    return ((images / "00000_stats.json").exists() and not (images / "00001_stats.json").exists()
            and any((images / "00001").glob("*.jpg")))


def _validating(out: Path) -> bool:
    return any((out / "decode_checks").glob("*.parquet"))


def _request_counts(server: ImageServer) -> dict[int, int]:
    return {i: server.request_count(_path(i)) for i in range(N_ROWS)}


def _since(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {i: after[i] - before[i] for i in after}


# ---------------------------------------------------------------------------------------------- scenario

@pytest.fixture(scope="module")
def runs(source, server, tmp_path_factory):
    """A clean run, then kill 1, rerun killed (kill 2), rerun to the end; what each step saw."""
    root = tmp_path_factory.mktemp("crash")
    clean, crashed, log = root / "clean", root / "crashed", root / "runs.log"
    seen = {"clean": clean, "crashed": crashed}

    counts0 = _request_counts(server)
    _run(source, clean, log)
    counts1 = _request_counts(server)
    seen["clean_requests"] = _since(counts0, counts1)

    _kill_when(source, crashed, log, _downloading_shard_1)
    server.wait_idle()  # the killed run's requests in flight are counted as the server reads them: after the kill
    counts2 = _request_counts(server)
    seen["kill1_stats"] = sorted(p.name for p in (crashed / "images").glob("*_stats.json"))
    seen["kill1_partial"] = sorted(p.name for p in (crashed / "images" / "00001").glob("*.jpg"))
    seen["kill1_partial_parquet_readable"] = _readable(crashed / "images" / "00001.parquet")
    seen["kill1_leftovers"] = _leftovers(crashed)

    _kill_when(source, crashed, log, _validating)
    server.wait_idle()
    counts3 = _request_counts(server)
    seen["rerun1_requests"] = _since(counts2, counts3)
    seen["kill2_stats"] = sorted(p.name for p in (crashed / "images").glob("*_stats.json"))
    seen["kill2_checks"] = sorted(p.name for p in (crashed / "decode_checks").glob("*.parquet"))
    seen["kill2_outputs"] = [n for n in (layout.FULL_METADATA_FILE, layout.METADATA_CSV, layout.SUMMARY_FILE)
                             if (crashed / n).exists()]

    _run(source, crashed, log)
    seen["rerun2_requests"] = _since(counts3, _request_counts(server))
    return seen


def _leftovers(out: Path) -> list[str]:
    """Temporary files and directories: ours (.NAME.tmp), img2dataset's (images/_tmp, its input copy)."""
    found = [p for p in out.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    found += [p for p in (out / "images" / dl.IMG2DATASET_TMP, out / dl.IMG2DATASET_INPUT) if p.exists()]
    return sorted(str(p.relative_to(out)) for p in found)


def _readable(path: Path) -> bool:
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid):
        return False
    return True


def _shard_of(i: int) -> int:
    return i // SHARD_SIZE


def _sorted(path: Path) -> pa.Table:
    return pq.read_table(path).sort_by("key")  # shard rows are in completion order


def _files(out: Path) -> dict[str, bytes]:
    """Every saved image, caption and per-image json, by path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").glob("*/*"))
            if p.parent.name != dl.IMG2DATASET_TMP}


# ---------------------------------------------------------------------------------------------- checks

def test_kill_points_were_hit(runs):
    # Kill 1: shard 0 done; shard 1 half written: some image files, a parquet without its footer, no stats.
    assert runs["kill1_stats"] == ["00000_stats.json"]
    assert runs["kill1_partial"] and not runs["kill1_partial_parquet_readable"]
    assert "images/_tmp" in runs["kill1_leftovers"]
    # Kill 2: every shard downloaded, some but not all validated, no outputs written yet.
    assert runs["kill2_stats"] == [f"{layout.shard_name(s)}_stats.json" for s in SHARDS]
    assert 0 < len(runs["kill2_checks"]) < len(SHARDS)
    assert runs["kill2_outputs"] == []


def test_reruns_fetch_only_unfinished_shards(runs):
    assert set(runs["clean_requests"].values()) == {1}  # --retries 0: every URL exactly once
    assert runs["rerun1_requests"] == {i: 0 if _shard_of(i) == 0 else 1 for i in range(N_ROWS)}
    assert set(runs["rerun2_requests"].values()) == {0}


def test_same_counts_as_a_clean_run(runs):
    keep = ("rows_in", "shards", "rows_in_finished_shards", "downloaded", "failed", "failed_by_status",
            "failure_reasons", "invalid", "valid", "full_metadata_rows")
    clean, crashed = (json.loads((runs[k] / layout.SUMMARY_FILE).read_text()) for k in ("clean", "crashed"))
    assert {k: crashed[k] for k in keep} == {k: clean[k] for k in keep}
    assert clean["downloaded"] == N_ROWS - 1 and clean["invalid"] == 3 and clean["valid"] == N_ROWS - 4
    # The last rerun validated exactly the shards the killed one had not.
    assert crashed["validation"]["shards_validated_now"] == len(SHARDS) - len(runs["kill2_checks"])


def test_same_outputs_as_a_clean_run(runs):
    clean, crashed = runs["clean"], runs["crashed"]
    for name in (layout.FULL_METADATA_FILE, layout.INVALID_FILE):
        assert pq.read_table(crashed / name).equals(pq.read_table(clean / name)), name
    assert (crashed / layout.METADATA_CSV).read_bytes() == (clean / layout.METADATA_CSV).read_bytes()
    for shard in SHARDS:
        name = layout.shard_name(shard)
        for rel in (f"images/{name}.parquet", f"decode_checks/{name}.parquet"):
            assert _sorted(crashed / rel).equals(_sorted(clean / rel)), rel
    assert _files(crashed) == _files(clean)


def test_no_temporary_files_left(runs):
    assert _leftovers(runs["crashed"]) == []
    assert _leftovers(runs["clean"]) == []


def test_rerun_with_nothing_to_download_removes_img2dataset_leftovers(runs, server, source, tmp_path):
    """A kill after img2dataset wrote its last stats file but before it returned (a window of ~0.2 s, too
    short to hit reliably) leaves its temp dir and input copy; the rerun skips img2dataset altogether."""
    out = tmp_path / "data"
    shutil.copytree(runs["crashed"], out)
    (out / "images" / dl.IMG2DATASET_TMP).mkdir()
    shutil.copy(out / layout.URLS_FILE, out / "images" / dl.IMG2DATASET_TMP / "4.feather")
    shutil.copy(out / layout.URLS_FILE, out / dl.IMG2DATASET_INPUT)
    before = server.request_count()
    _run(source, out, tmp_path / "run.log")
    assert server.request_count() == before
    assert _leftovers(out) == []


def test_sigterm_while_validating_stops_like_ctrl_c(source, tmp_path, monkeypatch):
    """Outside img2dataset, SIGTERM killed the process by its default action under the validation pool, with
    no line and no clean-up; it now raises Interrupted (exit 143 in the CLI) like Ctrl-C."""
    from vlm_caption.config import DownloadConfig
    from vlm_caption.interrupts import Interrupted

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop validation")

    out = tmp_path / "out"
    cfg = DownloadConfig(output=str(out), source=str(source), processes=1, threads=4, timeout=5, retries=0,
                         validate_workers=1, max_rows=4)
    monkeypatch.setattr(dl, "validate_shards", terminated)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        dl.download_dataset(cfg)
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
