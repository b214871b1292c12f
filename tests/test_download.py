"""download_data.py end to end against a real HTTP server on 127.0.0.1, with img2dataset's real client.

45 source rows in 3 shards of 16: 40 good images, a 404, a 0-byte body, an HTML page, a truncated JPEG
and a response slower than --timeout. Shard 2 (rows 32-44) holds only good images.
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route
from vlm_caption import download as dl
from vlm_caption import validate
from vlm_caption.config import DownloadConfig
from vlm_caption.download_source import SOURCE_COLUMNS
from vlm_caption.errors import UsageError
from vlm_caption.sample_data import write_sample

REPO_ROOT = Path(__file__).resolve().parent.parent
BAD = {3: "/missing.jpg", 8: "/empty.jpg", 12: "/page.jpg", 17: "/truncated.jpg", 20: "/slow.jpg"}
N_ROWS, N_GOOD, SHARD_SIZE, RETRIES = 45, 40, 16, 1
CLI_ARGS = ["--processes", "2", "--threads", "8", "--timeout", "2", "--retries", str(RETRIES),
            "--shard-size", str(SHARD_SIZE), "--validate-workers", "2"]


def _routes(images: list[bytes]) -> dict[str, Route]:
    jpeg = images[0]
    routes = {f"/img/{i}.jpg": Route(b) for i, b in enumerate(images)}
    routes["/empty.jpg"] = Route(b"")
    routes["/page.jpg"] = Route(b"<html><body>Not here</body></html>", content_type="text/html")
    routes["/truncated.jpg"] = Route(jpeg[: len(jpeg) // 2])
    routes["/slow.jpg"] = Route(jpeg, delay_seconds=4)  # twice the --timeout
    return routes


def _source_rows(server: ImageServer) -> list[dict]:
    rows, good = [], iter(range(N_GOOD))
    for i in range(N_ROWS):
        path = BAD.get(i) or f"/img/{next(good)}.jpg"
        rows.append({
            "key": f"{i:06d}",  # leading zeros must survive
            "url": server.url(path),
            "caption": f'Painting {i}, "quoted", naïve — by Ando Hiroshige' if i % 7 else None,
            "md5": f"{i:032x}",
            "tags": f"ukiyo-e, landscape, tag{i}",
            "merged_tags": f"ukiyo-e, landscape, tag{i}, japanese art",
        })
    return rows


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sample = write_sample(tmp_path_factory.mktemp("imgs") / "s", n=N_GOOD, seed=7)
    files = pq.read_table(sample / "full_metadata.parquet")["file_name"].to_pylist()
    with ImageServer(_routes([(sample / f).read_bytes() for f in files])) as srv:
        yield srv


@pytest.fixture(scope="module")
def source(server, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "contrastyles.parquet"
    pq.write_table(pa.Table.from_pylist(_source_rows(server)), path)
    return path


@pytest.fixture(scope="module")
def first_run(source, server, tmp_path_factory):
    """One download in this process (img2dataset needs the main thread, which pytest gives us)."""
    out = tmp_path_factory.mktemp("dl") / "data"
    cfg = DownloadConfig(output=str(out), source=str(source), processes=2, threads=8, timeout=2, retries=RETRIES,
                         shard_size=SHARD_SIZE, validate_workers=2)
    handler_before = signal.getsignal(signal.SIGINT)
    summary = dl.download_dataset(cfg)
    return {"out": out, "cfg": cfg, "summary": summary, "requests": server.request_count(),
            "requests_404": server.request_count("/missing.jpg"),
            "handler_before": handler_before, "handler_after": signal.getsignal(signal.SIGINT)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "download_data.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_counts_per_outcome(first_run, server):
    s = first_run["summary"]
    assert s["rows_in"] == N_ROWS and s["shards"] == {"total": 3, "finished": 3, "unfinished": []}
    assert s["downloaded"] == N_GOOD + 3  # img2dataset records 0-byte, HTML and truncated as success
    assert s["failure_reasons"] == {"HTTP Error 404: File not found": 1, "timed out": 1}
    assert s["failed_by_status"] == {"failed_to_download": 2}
    assert s["invalid"] == 3 and s["valid"] == N_GOOD and s["full_metadata_rows"] == N_GOOD
    # Every URL once, the two failures once more each (--retries 1).
    assert first_run["requests"] == N_ROWS + 2 * RETRIES
    assert first_run["requests_404"] == 1 + RETRIES

    invalid = pq.read_table(first_run["out"] / "invalid_images.parquet").to_pylist()
    by_key = {r["key"]: r for r in pq.read_table(first_run["out"] / "images/00000.parquet").to_pylist()}
    by_key.update({r["key"]: r for r in pq.read_table(first_run["out"] / "images/00001.parquet").to_pylist()})
    assert sorted(by_key[r["key"]]["url"].rsplit("/", 1)[1] for r in invalid) == ["empty.jpg", "page.jpg",
                                                                                  "truncated.jpg"]
    errors = {by_key[r["key"]]["url"].rsplit("/", 1)[1]: r["error"] for r in invalid}
    assert errors["empty.jpg"] == "empty file"
    assert errors["page.jpg"].startswith("not an image")
    assert "truncated" in errors["truncated.jpg"]
    assert all((first_run["out"] / r["path"]).is_file() for r in invalid)  # listed, never deleted


def test_extra_columns_arrive_unchanged(first_run, source):
    meta = pq.read_table(first_run["out"] / "full_metadata.parquet")
    assert meta.schema.equals(validate.FULL_METADATA_SCHEMA)
    src = {r["key"]: r for r in pq.read_table(source).to_pylist()}
    rows = meta.to_pylist()
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    for row in rows:
        want = src[row["original_key"]]
        for col in ("url", "caption", "md5", "tags", "merged_tags"):
            assert row[col] == want[col], col
        assert row["width"] > 0 and row["width"] == row["original_width"]
        assert (first_run["out"] / row["file_name"]).is_file()
    bad_keys = {f"{i:06d}" for i in BAD}
    assert not bad_keys & {r["original_key"] for r in rows}


def test_metadata_csv_loads_as_imagefolder(first_run):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(first_run["out"]), split="train")
    assert ds.num_rows == N_GOOD and set(ds.column_names) == {"image", "text"}
    captions = set(pq.read_table(first_run["out"] / "full_metadata.parquet")["caption"].to_pylist())
    assert ds[1]["image"].size[0] > 0 and ds[1]["text"] in captions


def test_sigint_handler_is_restored(first_run):
    assert first_run["handler_after"] is first_run["handler_before"]


def test_rerun_downloads_and_validates_nothing(first_run, source, server):
    out = first_run["out"]
    checks = {p.name: p.stat().st_mtime_ns for p in (out / "decode_checks").iterdir()}
    before = pq.read_table(out / "full_metadata.parquet")
    result = _cli("--source", str(source), "--output", str(out), *CLI_ARGS)
    # Row 20 timed out: retryable work is left (exit 3), and a rerun alone does not retry a finished shard.
    assert result.returncode == 3, result.stderr
    assert "worth retrying" in result.stderr and "images/00001_stats.json" in result.stderr
    assert server.request_count() == first_run["requests"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "decode_checks").iterdir()} == checks
    summary = json.loads((out / "download_summary.json").read_text())
    assert summary["validation"]["shards_validated_now"] == 0
    assert pq.read_table(out / "full_metadata.parquet").equals(before)
    assert "valid images:        40" in result.stdout


def test_rerun_redoes_only_an_unfinished_shard(first_run, source, server, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(first_run["out"], out)
    (out / "images/00002_stats.json").unlink()  # as if the run had died during shard 2
    checks = {p.name: p.stat().st_mtime_ns for p in (out / "decode_checks").iterdir()}
    before = server.request_count()
    cfg = dataclasses.replace(first_run["cfg"], output=str(out))
    summary = dl.download_dataset(cfg)
    assert server.request_count() - before == N_ROWS - 2 * SHARD_SIZE  # shard 2's 13 good URLs, nothing else
    assert summary["validation"]["shards_validated_now"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in (out / "decode_checks").iterdir()}
    assert after["00000.parquet"] == checks["00000.parquet"] and after["00002.parquet"] != checks["00002.parquet"]
    assert summary["valid"] == N_GOOD


def test_an_unreadable_finished_shard_is_set_aside_and_downloaded_again(first_run, server, tmp_path):
    """A finished shard whose parquet is cut short (two runs at once, a crash mid-write) made every later run a
    traceback: it goes to quarantine/ with its stats and img2dataset fetches it again."""
    out = tmp_path / "data"
    shutil.copytree(first_run["out"], out)
    shard = out / "images/00002.parquet"
    shard.write_bytes(shard.read_bytes()[:50])
    before = server.request_count()
    summary = dl.download_dataset(dataclasses.replace(first_run["cfg"], output=str(out)))
    assert server.request_count() - before == N_ROWS - 2 * SHARD_SIZE  # shard 2 again, nothing else
    assert summary["valid"] == N_GOOD and pq.read_table(out / "full_metadata.parquet").num_rows == N_GOOD
    assert sorted(p.name.split(".")[0] for p in (out / "quarantine").iterdir()) == ["00002", "00002_stats"]


def test_a_download_with_shards_to_do_sets_full_metadata_aside_until_it_is_done(first_run, tmp_path, monkeypatch):
    """Killed while redoing a shard, the old full_metadata.parquet would be read as if current; without it
    the captioner reads the shard parquets (and names the unfinished one)."""
    from vlm_caption import dataset
    from vlm_caption.interrupts import Interrupted

    out = tmp_path / "data"
    shutil.copytree(first_run["out"], out)
    (out / "images/00002_stats.json").unlink()

    def killed(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(dl, "run_img2dataset", killed)
    with pytest.raises(Interrupted):
        dl.download_dataset(dataclasses.replace(first_run["cfg"], output=str(out)))
    assert not (out / "full_metadata.parquet").exists() and not (out / "metadata.csv").exists()
    assert dataset.unfinished_shards(out) == ["00002"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(first_run, server):
    from vlm_caption import locks

    held = locks.hold_exclusive(first_run["out"] / "download.lock", "test")
    before = server.request_count()
    try:
        with pytest.raises(UsageError, match=r"--output .* is in use by another process \(pid \d+"):
            dl.download_dataset(first_run["cfg"])
    finally:
        import os

        os.close(held)
    assert server.request_count() == before


def test_same_urls_with_other_metadata_are_refused(first_run, source, server, tmp_path):
    """The shards carry the first run's captions and tags: a changed source would be published stale."""
    changed = tmp_path / "v2.parquet"
    table = pq.read_table(source)
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption",
                                    pa.array(["new"] * table.num_rows)), changed)
    with pytest.raises(UsageError, match=r"same URLs with other metadata \(caption differ\)"):
        dl.download_dataset(dataclasses.replace(first_run["cfg"], source=str(changed)))


def test_an_output_dir_that_is_not_a_download_is_refused(first_run, tmp_path):
    mine = tmp_path / "my_files"
    mine.mkdir()
    (mine / "metadata.csv").write_text("precious\n")
    with pytest.raises(UsageError, match="not a download_data.py output"):
        dl.download_dataset(dataclasses.replace(first_run["cfg"], output=str(mine)))
    assert (mine / "metadata.csv").read_text() == "precious\n"


def test_urls_that_are_not_http_are_failed_not_fetched(server, tmp_path):
    """file: and data: URLs would have been read by img2dataset's urllib as if downloaded: a local file
    captioned and published."""
    local = tmp_path / "local.jpg"
    local.write_bytes(b"\xff\xd8 not fetched")
    rows = [{"key": "0", "url": server.url("/img/0.jpg")}, {"key": "1", "url": local.as_uri()},
            {"key": "2", "url": "data:image/jpeg;base64,/9j/4AAQ"}]
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "caption": "c", "md5": "ff", "tags": "t", "merged_tags": "m"}
                                         for r in rows]), path)
    out = tmp_path / "out"
    summary = dl.download_dataset(DownloadConfig(output=str(out), source=str(path), processes=1, threads=2,
                                                 timeout=2, retries=0, validate_workers=1))
    assert summary["valid"] == 1 and summary["failed"] == 2
    assert summary["failure_reasons"] == {"<urlopen error unknown url type: only http(s) urls are fetched>": 2}
    assert pq.read_table(out / "full_metadata.parquet").column("original_key").to_pylist() == ["0"]
    assert [p.name for p in (out / "images/00000").glob("*.jpg")] == ["000000000.jpg"]
    # urls.parquet keeps the source's URLs as they were.
    assert pq.read_table(out / "urls.parquet").column("url").to_pylist() == [r["url"] for r in rows]


def test_a_null_or_blank_url_is_failed_as_no_url(server, tmp_path):
    """A null URL's failure read "unknown url type: 'None'"; an empty or blank one's named no reason at all."""
    rows = [{"key": "0", "url": server.url("/img/0.jpg")}, {"key": "1", "url": None}, {"key": "2", "url": ""},
            {"key": "3", "url": "  "}]
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "caption": "c", "md5": "ff", "tags": "t", "merged_tags": "m"}
                                         for r in rows]), path)
    summary = dl.download_dataset(DownloadConfig(output=str(tmp_path / "out"), source=str(path), processes=1,
                                                 threads=2, timeout=2, retries=0, validate_workers=1))
    assert summary["valid"] == 1 and summary["failed"] == 3
    assert summary["failure_reasons"] == {"<urlopen error unknown url type: no url in the source>": 3}


def test_every_further_source_column_reaches_full_metadata_with_its_type(server, tmp_path, caplog):
    """Not only the six ContraStyles columns: the rest travel through img2dataset too, renamed source_{name}
    where img2dataset or the outputs use the name; a column that is not a scalar or a list is said."""
    rows = [{"key": str(i), "url": server.url(f"/img/{i}.jpg"), "caption": "c", "md5": "ff", "tags": "t",
             "merged_tags": "m", "aesthetic": i / 4, "license": "cc-by", "width": 1000 + i, "labels": ["a", str(i)],
             "blob": b"\x00", "day": datetime.date(2020, 1, 1 + i), "price": decimal.Decimal(f"{i}.50"),
             "at": datetime.time(i)} for i in range(3)]  # img2dataset's per-image .json cannot hold dates
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="vlm_caption.download"):
        summary = dl.download_dataset(DownloadConfig(output=str(out), source=str(path), processes=1, threads=2,
                                                     timeout=5, retries=0, validate_workers=1))
    assert summary["valid"] == 3 and "source column blob (binary) is not carried" in caplog.text
    assert "source column at (time64[us]) is not carried" in caplog.text
    meta = pq.read_table(out / "full_metadata.parquet")
    assert meta.schema.names[len(validate.FULL_METADATA_SCHEMA):] == ["aesthetic", "license", "source_width", "labels",
                                                                      "day", "price"]
    assert meta.schema.field("aesthetic").type == pa.float64() and meta.schema.field("source_width").type == pa.int64()
    assert meta.schema.field("labels").type == pa.list_(pa.string())
    by_key = {r["original_key"]: r for r in meta.to_pylist()}
    for r in rows:
        got = by_key[r["key"]]
        assert (got["aesthetic"], got["license"], got["source_width"], got["labels"], got["day"], got["price"]) == \
            (r["aesthetic"], r["license"], r["width"], r["labels"], r["day"], r["price"])
        assert got["width"] > 0 and got["width"] != r["width"]  # the measured size keeps its name
    # ... and the captioner can carry them into every output row.
    from batched_image_inference import main

    ckpt = tmp_path / "ckpt"
    assert main(["--data-dir", str(out), "--checkpoint-dir", str(ckpt), "--no-push", "--backend", "dummy",
                 "--model", "dummy", "--keep-columns", "aesthetic,labels"]) == 0
    merged = pq.read_table(ckpt / "all_captions.parquet")
    assert sorted(merged.column("aesthetic").to_pylist()) == [0.0, 0.25, 0.5]
    assert merged.schema.field("labels").type == pa.list_(pa.string())


def test_other_shard_size_on_rerun_is_refused(first_run, server):
    before = server.request_count()
    cfg = dataclasses.replace(first_run["cfg"], shard_size=8)
    with pytest.raises(UsageError, match="another shard size"):
        dl.download_dataset(cfg)
    assert server.request_count() == before


def test_missing_column_fails_in_one_line_before_any_request(source, server, tmp_path):
    bad = tmp_path / "no_md5.parquet"
    pq.write_table(pq.read_table(source).drop_columns(["md5", "tags"]), bad)
    before = server.request_count()
    result = _cli("--source", str(bad), "--output", str(tmp_path / "out"), *CLI_ARGS)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "lacks column(s) md5, tags" in result.stderr
    assert server.request_count() == before
    assert not (tmp_path / "out" / "urls.parquet").exists()


def test_repeated_source_keys_are_said_and_every_row_kept(caplog):
    source = pa.table({c: ["a", "b", "a"] if c == "key" else ["x"] * 3 for c in SOURCE_COLUMNS})
    with caplog.at_level(logging.WARNING, logger="vlm_caption.download"):
        assert dl.url_table(source).num_rows == 3
    assert "source keys on more than one row: 1 (e.g. a)" in caplog.text


def test_a_local_file_of_another_kind_is_a_usage_error(tmp_path):
    (tmp_path / "src.tsv").write_text("key\turl\n")
    with pytest.raises(UsageError, match="give a .parquet, .csv, .jsonl or .json file"):
        dl.load_source(str(tmp_path / "src.tsv"), "train", None)


def test_csv_source_keeps_leading_zeros(tmp_path):
    path = tmp_path / "src.csv"
    path.write_text('key,url,caption,md5,tags,merged_tags\n00042,http://127.0.0.1/a.jpg,"a, b",ff,t,m\n')
    table = dl.load_source(str(path), "train", None)
    assert table.to_pylist() == [{"key": "00042", "url": "http://127.0.0.1/a.jpg", "caption": "a, b",
                                  "md5": "ff", "tags": "t", "merged_tags": "m"}]


def test_datasets_code_path_with_a_local_dataset_dir(source, tmp_path):
    """The Hub path (datasets.load_dataset) works offline on a local dataset directory."""
    ds_dir = tmp_path / "hf_dataset"
    ds_dir.mkdir()
    shutil.copy(source, ds_dir / "train.parquet")
    table = dl.load_source(str(ds_dir), "train", max_rows=5)
    assert table.num_rows == 5 and table.column_names == list(SOURCE_COLUMNS)
    pq.write_table(pq.read_table(source).drop_columns(["merged_tags"]), ds_dir / "train.parquet")
    with pytest.raises(UsageError, match="lacks column"):
        dl.load_source(str(tmp_path / "hf_dataset"), "train", None)


def test_missing_distributor_package_is_a_usage_error():
    """ray is not a dependency, and img2dataset silently downloads nothing when it is missing."""
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    with pytest.raises(UsageError, match="needs the ray package"):
        dl.check_distributor("ray")


def test_img2dataset_processes_leave_no_temp_dirs_behind(server, tmp_path, monkeypatch):
    """wandb (imported by img2dataset) makes temp dirs in every spawned process, which never removes them:
    two empty dirs in the system's temp dir per process and run, before."""
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist(_source_rows(server)[:4]), path)
    out = tmp_path / "out"
    dl.download_dataset(DownloadConfig(output=str(out), source=str(path), processes=2, threads=2, timeout=2,
                                       retries=0, shard_size=2, validate_workers=1))
    assert list(system_tmp.iterdir()) == []
    assert not (out / dl.SPAWNED_TMPDIR).exists()
    assert os.environ["TMPDIR"] == str(system_tmp)
