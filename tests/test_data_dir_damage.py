"""A data dir damaged by hand after its download: a full_metadata.parquet rewritten without file_name, a shard's
images folder gone (moved, deleted, a disk not mounted). Neither may turn images into permanent failures that
reruns skip (every row was a `load` failure, "outside the data dir or malformed key" or "No such file", exit 0)."""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from dummy_runs import clear_launch_env, dummy_args, merged_rows

from vlm_caption import store
from vlm_caption.errors import EXIT_OK, EXIT_ITEMS_FAILED
from vlm_caption.sample_data import write_sample


@pytest.fixture
def data(tmp_path, monkeypatch):
    clear_launch_env(monkeypatch)
    return write_sample(tmp_path / "data", n=12, seed=0, shard_size=6, broken=False)


def failures(ckpt) -> int:
    return sum(pq.read_table(p.path).num_rows for p in store.list_failure_files(ckpt))


def test_full_metadata_without_file_name_finds_each_image_by_its_key(data, tmp_path):
    from batched_image_inference import main

    meta = data / "full_metadata.parquet"
    pq.write_table(pq.read_table(meta).drop_columns(["file_name"]), meta)  # "the useful columns" kept by hand
    assert main(dummy_args(data, tmp_path / "all")) == EXIT_OK
    assert failures(tmp_path / "all") == 0 and len(merged_rows(tmp_path / "all")) == 12
    assert main(dummy_args(data, tmp_path / "one", "--shards", "1")) == EXIT_OK  # the shard is the key's too
    assert sorted(r["key"][:5] for r in merged_rows(tmp_path / "one")) == ["00001"] * 6


@pytest.mark.parametrize("metadata", ["shard parquets", "full_metadata.parquet"])
def test_a_missing_shard_folder_leaves_its_rows_for_a_later_run(data, tmp_path, caplog, metadata):
    from batched_image_inference import main

    if metadata == "shard parquets":
        (data / "full_metadata.parquet").unlink()
    folder, aside = data / "images" / "00000", tmp_path / "unmounted"
    shutil.move(folder, aside)
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(data, ckpt)) == EXIT_ITEMS_FAILED
    assert failures(ckpt) == 0 and sorted(r["key"][:5] for r in merged_rows(ckpt)) == ["00001"] * 6
    assert f"shard 00000 has no images folder {folder} (moved, deleted, or on a disk not mounted): 6 of its " \
           "rows are left for a later run" in caplog.text
    shutil.move(aside, folder)  # mounted again
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert failures(ckpt) == 0 and len(merged_rows(ckpt)) == 12


def test_one_missing_image_is_still_its_rows_failure(data, tmp_path):
    """Only a whole folder is left for later: a shard whose folder is there lost that one file."""
    from batched_image_inference import main

    next((data / "images" / "00001").glob("*.jpg")).unlink()
    assert main(dummy_args(data, tmp_path / "ckpt")) == EXIT_OK
    assert failures(tmp_path / "ckpt") == 1 and len(merged_rows(tmp_path / "ckpt")) == 11


def test_a_download_that_has_only_just_started_is_said_so(sample_data_dir, tmp_path, capsys):
    """urls.parquet written, images/ made, no shard parquet yet: it asked "is it the directory download_data.py
    wrote?" (it is); a moment later, with one unfinished shard, it said "no finished shard yet"."""
    from dummy_runs import assert_one_line_usage_errors

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(sample_data_dir / "urls.parquet", data / "urls.parquet")
    assert_one_line_usage_errors(data, tmp_path / "ckpt", [((), "holds no finished shard yet: wait for "
                                                                "download_data.py to finish one")], capsys)


def test_a_captioned_shard_whose_images_were_moved_away_is_not_retryable(data, tmp_path):
    """Only keys still to caption need their image: --merge-only and a relaunch exited 3, and coverage.json
    expected 6 keys of 12, once the captioned shard's folder was archived."""
    import json

    from batched_image_inference import main

    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(data, ckpt)) == 0
    shutil.move(str(data / "images" / "00000"), str(tmp_path / "archived-00000"))  # done with those images
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(ckpt)]) == 0
    coverage = json.loads((ckpt / store.COVERAGE).read_text())
    assert coverage["expected"] == 12 and coverage["captioned"] == 12 and coverage["unexpected_keys"] == 0
    assert main(dummy_args(data, ckpt)) == 0  # a relaunch: nothing left to caption
