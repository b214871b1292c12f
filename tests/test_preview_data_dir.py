"""preview.py --data-dir: every data dir names its keys 000000000, 000000001, ..., so the data dir of another run
(another sample, another download) holds other images under the run's keys; they must not be shown as its own."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm_caption import store
from vlm_caption.errors import UsageError
from vlm_caption.preview import write_preview
from vlm_caption.sample_data import write_sample


def checkpoint_of(data: Path, ckpt: Path, n: int = 6) -> Path:
    """A checkpoint dir whose merged rows caption the first n images of `data`."""
    meta = pq.read_table(data / "full_metadata.parquet").slice(0, n).to_pylist()
    rows = [{"key": m["key"], "original_key": m["original_key"], "url": m["url"], "original_caption": m["caption"],
             "vlm_caption": f"caption {i}", "width": m["width"], "height": m["height"],
             "original_width": m["original_width"], "original_height": m["original_height"], "sha256": m["sha256"],
             "md5": m["md5"], "tags": m["tags"], "merged_tags": m["merged_tags"], "caption_model": "tiny",
             "caption_finish": "stop", "caption_tokens": 5} for i, m in enumerate(meta)]
    ckpt.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=store.OUTPUT_SCHEMA), ckpt / store.MERGED)
    return ckpt


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_runs")
    ours = write_sample(root / "ours", n=8, broken=False, seed=1)
    theirs = write_sample(root / "theirs", n=8, broken=False, seed=2)
    return checkpoint_of(ours, root / "ckpt"), ours, theirs


def test_the_data_dir_of_another_run_is_refused(two_runs, tmp_path):
    ckpt, _, theirs = two_runs
    out = tmp_path / "preview.html"
    # Was: exit 0, every card's thumbnail another run's image under the same key.
    with pytest.raises(UsageError, match=r"6 of the 6 rows shown hold another image .* not the data dir"):
        write_preview(ckpt, out, data_dir=theirs)
    assert not out.exists()


def test_its_own_data_dir_gives_local_thumbnails(two_runs, tmp_path):
    ckpt, ours, _ = two_runs
    out = tmp_path / "preview.html"
    assert write_preview(ckpt, out, data_dir=ours) == 6
    assert out.read_text().count("images/00000/") == 6 * 2  # href and src of each card


def test_a_key_whose_image_changed_shows_its_url(two_runs, tmp_path, caplog):
    """One image of the data dir replaced since the run (another download into it): that card shows the url's
    image and a warning says so; the others stay local."""
    ckpt, ours, theirs = two_runs
    data = tmp_path / "data"
    shutil.copytree(ours, data)
    meta = pq.read_table(data / "full_metadata.parquet").to_pylist()
    other = {m["key"]: m for m in pq.read_table(theirs / "full_metadata.parquet").to_pylist()}
    meta[2]["sha256"] = other[meta[2]["key"]]["sha256"]
    pq.write_table(pa.Table.from_pylist(meta, schema=pq.read_schema(data / "full_metadata.parquet")),
                   data / "full_metadata.parquet")
    out = tmp_path / "preview.html"
    assert write_preview(ckpt, out, data_dir=data) == 6
    html = out.read_text()
    assert html.count("images/00000/") == 5 * 2 and f'src="{meta[2]["url"]}"' in html
    assert "1 of the 6 rows shown hold another image" in caplog.text
