"""What a consumer of the published dataset gets, compared with the source table given to download_data.py.

The whole workflow runs offline: a source parquet with ContraStyles' columns plus further typed columns ->
download_data.py (img2dataset, from a 127.0.0.1 image server) -> batched_image_inference.py (dummy backend) ->
the local Hub stub -> the repo's parquet files read back. README: `--source` "further scalar or list columns are
kept too (dates, timestamps and decimals included ...)", `--keep-columns` "Each keeps its own type (integers as
int64)", and the project's promise: "keep every original metadata column".
"""
from __future__ import annotations

import datetime
import io
import sys
import zoneinfo
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dummy_runs import clear_launch_env  # noqa: E402
from image_server import ImageServer, Route  # noqa: E402

N = 6
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
# Dates of artworks: Paris kept local mean time (+00:09:21) until 1911, New York (-04:56:02) until 1883.
PAINTED = [datetime.datetime(1890, 5, 1, 12, 0, tzinfo=PARIS), datetime.datetime(1872, 11, 13, 7, 35, tzinfo=PARIS),
           datetime.datetime(2020, 1, 1, 12, 0, tzinfo=PARIS), None, datetime.datetime(1905, 3, 1, tzinfo=PARIS),
           datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=PARIS)]
# A 64-bit perceptual hash as LAION-style metadata stores it: unsigned, half of the values above 2**63.
PHASH = [2**64 - 1, 2**63, 0x8F3C_0000_1234_ABCD, None, 12345, 2**63 - 1]


@pytest.fixture(scope="module")
def source_and_data(tmp_path_factory):
    """A source of N rows (one URL answers 404) downloaded by the real download code into a data dir."""
    from vlm_caption import download as dl
    from vlm_caption.config import DownloadConfig
    from vlm_caption.sample_data import write_sample

    root = tmp_path_factory.mktemp("source_fidelity")
    sample = write_sample(root / "imgs", n=N, seed=7)
    files = pq.read_table(sample / "full_metadata.parquet")["file_name"].to_pylist()
    routes = {f"/img/{i}.jpg": Route((sample / f).read_bytes()) for i, f in enumerate(files)}
    with ImageServer(routes) as server:
        table = pa.table({
            "key": [f"{i:06d}" for i in range(N)],
            "url": [server.url(f"/img/{i}.jpg") for i in range(N - 1)] + [server.url("/missing.jpg")],
            "caption": ["c0", None, "", "مرحبا بالعالم", "emoji 🎨🖌️", "c5"],
            "md5": [f"{i:032x}" for i in range(N)],
            "tags": ["ink"] * N,
            "merged_tags": ["ink, wash"] * N,
            "painted": pa.array(PAINTED, pa.timestamp("us", tz="Europe/Paris")),
            "phash": pa.array(PHASH, pa.uint64()),
            "score": pa.array([float("nan"), float("inf"), -0.0, 1.5, None, 2.0]),
            "painter": pa.nulls(N),  # (pandas' type for a column of None)
        })
        src = root / "contrastyles.parquet"
        pq.write_table(table, src)
        cfg = DownloadConfig(output=str(root / "data"), source=str(src), processes=1, threads=4, timeout=5,
                             retries=0, shard_size=16, validate_workers=1)
        summary = dl.download_dataset(cfg)
    assert summary["full_metadata_rows"] == N - 1  # the 404 row has no image
    return table, root / "data"


def _hub_rows(stub, repo: str) -> list[dict]:
    rows = []
    for path, blob in stub.repo_files(repo).items():
        if path.startswith("data/") and path.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(blob)).to_pylist()
    return rows


def _args(data: Path, ckpt: Path, stub, *extra: str) -> list[str]:
    return ["--model", "dummy-model", "--backend", "dummy", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--max-tokens", "40", "--batch-size", "4", "--num-loader-workers", "1",
            "--hf-repo", "tester/fidelity", "--hub-endpoint", stub.endpoint, *extra]


def test_a_tz_aware_timestamp_of_an_old_artwork_reaches_the_hub_as_the_same_instant(source_and_data, hub_stub,
                                                                                    tmp_path, monkeypatch):
    """User impact: a source timestamp column (README: "timestamps ... included", kept "with its own type") of
    artwork dates in a named time zone is published off by up to a minute for every date before the zone's
    standard offsets: 1890-05-01 12:00 Paris reads 12:00:21 on the Hub (Paris's LMT offset +00:09:21 travels to
    img2dataset as text "+0009" and is cast back without its seconds). Expected: each published value is the
    source's instant (full_metadata.parquet, every part and Hub file)."""
    from batched_image_inference import main

    source, data = source_and_data
    clear_launch_env(monkeypatch)
    by_key = {r["key"]: r["painted"] for r in source.to_pylist()}
    meta = {r["original_key"]: r["painted"] for r in pq.read_table(data / "full_metadata.parquet").to_pylist()}
    assert main(_args(data, tmp_path / "ckpt", hub_stub, "--keep-columns", "painted")) == 0
    published = {r["original_key"]: r["painted"] for r in _hub_rows(hub_stub, "tester/fidelity")}
    assert len(published) == N - 1
    wrong = {k: (str(by_key[k]), str(v)) for k, v in published.items() if v != by_key[k]}
    wrong_meta = {k: (str(by_key[k]), str(v)) for k, v in meta.items() if v != by_key[k]}
    assert not wrong and not wrong_meta, f"published: {wrong}; full_metadata: {wrong_meta}"


def test_an_unsigned_64_bit_column_is_kept_not_a_traceback_after_captioning(source_and_data, hub_stub, tmp_path,
                                                                            monkeypatch):
    """User impact: download_data.py carries a uint64 source column (e.g. a 64-bit perceptual hash) into
    full_metadata.parquet, and `--keep-columns phash` is accepted, but --keep-columns types every integer as int64:
    the first part write, after a whole --checkpoint-every of captions was generated, dies with
    "OverflowError: Python int too large to convert to C long" (a traceback, exit 1), at every relaunch, and
    nothing is ever published. Expected: the column is published with its values (as uint64, or refused before any
    work in one line naming the column if the output cannot hold it)."""
    from batched_image_inference import main

    source, data = source_and_data
    clear_launch_env(monkeypatch)
    assert pq.read_schema(data / "full_metadata.parquet").field("phash").type == pa.uint64()  # carried as it is
    ckpt = tmp_path / "ckpt"
    assert main(_args(data, ckpt, hub_stub, "--keep-columns", "phash")) == 0
    by_key = {r["key"]: r["phash"] for r in source.to_pylist()}
    published = {r["original_key"]: r["phash"] for r in _hub_rows(hub_stub, "tester/fidelity")}
    assert published == {k: v for k, v in by_key.items() if k in published} and len(published) == N - 1


def test_a_column_null_on_every_source_row_is_published_as_text(source_and_data, hub_stub, tmp_path, monkeypatch):
    """It was "not carried" by the download (a warning), so --keep-columns refused it as unknown."""
    from batched_image_inference import main

    _, data = source_and_data
    clear_launch_env(monkeypatch)
    assert pq.read_schema(data / "full_metadata.parquet").field("painter").type == pa.string()
    assert main(_args(data, tmp_path / "ckpt", hub_stub, "--keep-columns", "painter")) == 0
    rows = _hub_rows(hub_stub, "tester/fidelity")
    assert len(rows) == N - 1 and all(r["painter"] is None for r in rows)
