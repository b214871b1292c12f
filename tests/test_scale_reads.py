"""What the steps without a model read, counted at small scale: the costs that grow with the data set's size
(benchmarks/bench_scale.py measures them at 400K rows)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from vlm_caption import dataset
from vlm_caption.sample_data import write_sample
from vlm_caption.schema import IMAGE_PATH


def shard_layout_sample(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A sample in img2dataset's layout without full_metadata.parquet (the shard parquets are read)."""
    data = write_sample(tmp_path / "data", n=6, broken=False, seed=3, shard_size=3)
    full = {r["key"]: r for r in pq.read_table(data / "full_metadata.parquet").to_pylist()}
    (data / "full_metadata.parquet").unlink()
    return data, full


def count_listings(monkeypatch, folder: Path) -> list[str]:
    """Every listing of a subfolder of `folder` (os.scandir or os.listdir) is recorded."""
    listed: list[str] = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def spy(path=".", _real=real):
            if Path(path).parent == folder:
                listed.append(str(path))
            return _real(path)

        monkeypatch.setattr(os, name, spy)
    return listed


def test_shard_rows_find_their_image_without_listing_the_shard_folder(tmp_path, monkeypatch):
    """img2dataset names each file {key}.jpg: one stat finds it. Listing every shard folder (10K-30K entries
    each) cost a relaunch with a few keys left ~6.7 s per worker at 400K rows."""
    data, full = shard_layout_sample(tmp_path)
    listed = count_listings(monkeypatch, data / "images")
    rows = list(dataset.iter_rows(data, set(full)))
    assert {r["key"]: r[IMAGE_PATH] for r in rows} == {k: data / r["file_name"] for k, r in full.items()}
    assert listed == []


def test_a_shard_image_of_another_suffix_is_still_found(tmp_path):
    data, full = shard_layout_sample(tmp_path)
    key = sorted(full)[1]
    jpg = data / full[key]["file_name"]
    png = jpg.with_suffix(".png")
    jpg.rename(png)
    rows = {r["key"]: r[IMAGE_PATH] for r in dataset.iter_rows(data, set(full))}
    assert rows[key] == png
    assert all(path.is_file() for path in rows.values())
