"""The synthetic sample has exactly the layout, columns and types that a real download produces."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.image_server import ImageServer, Route
from vlm_caption import download as dl
from vlm_caption.config import DownloadConfig
from vlm_caption.errors import UsageError
from vlm_caption.sample_data import write_sample

TOP_FILES = ["urls.parquet", "full_metadata.parquet", "metadata.csv", "invalid_images.parquet", "download_summary.json"]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_rows(root: Path, shard: str = "00000") -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(root / "images" / f"{shard}.parquet").to_pylist()}


def test_layout_and_broken_rows(sample_data_dir):
    root = sample_data_dir
    for name in TOP_FILES + ["images/00000.parquet", "images/00000_stats.json", "decode_checks/00000.parquet"]:
        assert (root / name).is_file(), name
    rows = _shard_rows(root)
    assert len(rows) == 48
    assert all(len(k) == 9 for k in rows)  # default shard size 10000: 5 shard digits + 4 sample digits
    for key, row in rows.items():
        files = {p.suffix for p in (root / "images/00000").glob(f"{key}.*")}
        assert files == ({".jpg", ".json", ".txt"} if row["status"] == "success" else set()), key
        assert row["width"] is None  # img2dataset does not measure without re-encoding
    failed = [r for r in rows.values() if r["status"] != "success"]
    assert sorted(r["error_message"] for r in failed) == [
        "HTTP Error 403: Forbidden", "HTTP Error 404: File not found", "timed out"]

    invalid = pq.read_table(root / "invalid_images.parquet").to_pylist()
    assert len(invalid) == 3
    contents = sorted((root / r["path"]).read_bytes()[:15] for r in invalid)
    assert contents[0] == b""  # the 0-byte file
    assert contents[1] == b"<!DOCTYPE html>"
    assert contents[2].startswith(b"\xff\xd8")  # the truncated JPEG still starts like one
    meta = pq.read_table(root / "full_metadata.parquet")
    assert meta.num_rows == 45  # the fixture passes include_broken_in_metadata=True
    assert set(r["key"] for r in invalid) <= set(meta["key"].to_pylist())
    assert sum(1 for _ in open(root / "metadata.csv")) == 46


def test_image_variety(sample_data_dir):
    from PIL import Image

    meta = pq.read_table(sample_data_dir / "full_metadata.parquet").to_pylist()
    kinds, orientations, long_sides = set(), [], []
    for row in meta:
        if row["width"] is None:
            continue
        with Image.open(sample_data_dir / row["file_name"]) as im:
            kinds.add((im.format, im.mode))
            orientations.append(im.getexif().get(0x0112))
            long_sides.append(max(im.size))
    assert {m for _, m in kinds} >= {"RGB", "RGBA", "L", "P"}
    assert {f for f, _ in kinds} == {"JPEG", "PNG"}
    assert sorted(o for o in orientations if o) == [6, 8]
    assert min(long_sides) == 32 and max(long_sides) == 2000
    total = sum((sample_data_dir / r["file_name"]).stat().st_size for r in meta)
    assert total < 2_000_000  # small files: the sample is for tests


def test_several_shards_without_broken_rows(tmp_path):
    root = write_sample(tmp_path / "s", n=48, shard_size=16, seed=1)
    assert sorted(p.name for p in (root / "images").glob("*.parquet")) == ["00000.parquet", "00001.parquet",
                                                                           "00002.parquet"]
    # 16 rows per shard: 2 sample digits, so keys are 7 digits; the 17th row is shard 1, sample 0.
    assert "0000100" in _shard_rows(root, "00001")
    meta = pq.read_table(root / "full_metadata.parquet")
    assert meta.num_rows == 48 and meta["key"].to_pylist() == sorted(meta["key"].to_pylist())
    assert pq.read_table(root / "invalid_images.parquet").num_rows == 0


def test_broken_rows_stay_out_of_metadata_by_default(tmp_path):
    """As in a real download: full_metadata.parquet holds only successful, decodable rows."""
    root = write_sample(tmp_path / "s", n=20, broken=True)
    meta = pq.read_table(root / "full_metadata.parquet")
    invalid = pq.read_table(root / "invalid_images.parquet")
    assert meta.num_rows == 14 and invalid.num_rows == 3
    assert not set(invalid["key"].to_pylist()) & set(meta["key"].to_pylist())
    assert None not in meta["width"].to_pylist()
    assert sum(1 for _ in open(root / "metadata.csv")) == 15
    # The shard parquets still list the broken files as downloaded: that path still meets them.
    shard = pq.read_table(root / "images/00000.parquet")
    assert set(invalid["key"].to_pylist()) <= set(shard.filter(pc.equal(shard["status"], "success"))["key"].to_pylist())


def test_same_seed_same_bytes(tmp_path):
    a = write_sample(tmp_path / "a", n=40, broken=True, seed=3, shard_size=16)
    b = write_sample(tmp_path / "b", n=40, broken=True, seed=3, shard_size=16)
    c = write_sample(tmp_path / "c", n=40, broken=True, seed=4, shard_size=16)
    assert _tree_hashes(a) == _tree_hashes(b)
    assert _tree_hashes(a) != _tree_hashes(c)


def test_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        write_sample(tmp_path / "s", n=4)
    (tmp_path / "f").write_text("a file")  # was a NotADirectoryError traceback
    with pytest.raises(UsageError, match="is a file"):
        write_sample(tmp_path / "f", n=4)


def test_matches_a_real_img2dataset_download(sample_data_dir, tmp_path):
    """Serve some of the sample's own files, download them with download.py's img2dataset call, compare."""
    sample_rows = _shard_rows(sample_data_dir)
    invalid = {r["key"] for r in pq.read_table(sample_data_dir / "invalid_images.parquet").to_pylist()}
    exif_row = next(r for r in sample_rows.values() if "Orientation" in (r["exif"] or ""))
    png_row = next(r for r in sample_rows.values() if r["url"].endswith(".png"))
    picked = [exif_row, png_row] + [sample_rows[k] for k in sorted(invalid)]
    failed_row = next(r for r in sample_rows.values() if r["error_message"] == "HTTP Error 404: File not found")
    routes = {f"/{r['key']}": Route((sample_data_dir / f"images/00000/{r['key']}.jpg").read_bytes()) for r in picked}

    with ImageServer(routes) as server:
        source = [dict(r, url=server.url(f"/{r['key']}")) for r in picked + [failed_row]]
        src = tmp_path / "src.jsonl"
        src.write_text("".join(json.dumps({"key": r["original_key"], "url": r["url"], "caption": r["caption"],
                                           "md5": r["source_md5"], "tags": r["tags"],
                                           "merged_tags": r["merged_tags"]}) + "\n" for r in source))
        cfg = DownloadConfig(output=str(tmp_path / "real"), source=str(src), processes=1, threads=4, timeout=5,
                             retries=0, validate_workers=1)
        summary = dl.download_dataset(cfg)
    real = tmp_path / "real"
    assert summary["downloaded"] == 5 and summary["invalid"] == 3 and summary["failed"] == 1

    # Same columns, same order, same types, no schema metadata, in every table both write.
    for name in ["images/00000.parquet", "full_metadata.parquet", "urls.parquet", "invalid_images.parquet",
                 "decode_checks/00000.parquet"]:
        assert pq.read_schema(real / name).equals(pq.read_schema(sample_data_dir / name), check_metadata=False), name
    assert pq.read_schema(real / "images/00000.parquet").equals(dl.SHARD_SCHEMA, check_metadata=True)
    assert (real / "metadata.csv").read_text().splitlines()[0] == (sample_data_dir / "metadata.csv").read_text(
    ).splitlines()[0]

    real_rows = {r["original_key"]: r for r in pq.read_table(real / "images/00000.parquet").to_pylist()}
    for sample_row in picked + [failed_row]:
        got = real_rows[sample_row["original_key"]]
        for col in ("status", "error_message", "exif", "sha256", "width", "caption", "tags", "merged_tags",
                    "source_md5"):
            assert got[col] == sample_row[col], (col, sample_row["key"])
    one = next(iter((real / "images/00000").glob("*.json")))
    assert list(json.loads(one.read_text())) == list(dl.SHARD_SCHEMA.names)
    stats_keys = set(json.loads((real / "images/00000_stats.json").read_text()))
    assert stats_keys == set(json.loads((sample_data_dir / "images/00000_stats.json").read_text()))
    assert set(json.loads((real / "download_summary.json").read_text())) == set(
        json.loads((sample_data_dir / "download_summary.json").read_text()))
