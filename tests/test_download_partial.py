"""Captioning a download that has not finished: every shard it still owes is named and the exit code is 3,
including shards img2dataset never started (no parquet yet), not only the one it was cut short in."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from batched_image_inference import main
from vlm_caption import dataset, store
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK
from vlm_caption.sample_data import write_sample


def test_shards_a_stopped_download_never_started_are_unfinished_not_silently_missing(tmp_path, caplog):
    data = write_sample(tmp_path / "data", n=6, broken=False, seed=5, shard_size=2)  # shards 00000-00002
    for name in ("full_metadata.parquet", "metadata.csv"):  # what download_data.py leaves while shards remain
        (data / name).unlink()
    shutil.rmtree(data / "images" / "00002")  # stopped after shard 00001: shard 00002 was never begun
    for name in ("00002.parquet", "00002_stats.json"):
        (data / "images" / name).unlink()
    assert dataset.unfinished_shards(data) == ["00002"]

    ckpt = tmp_path / "ckpt"
    code = main(["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir",
                 str(ckpt), "--no-push", "--batch-size", "4", "--num-loader-workers", "1"])
    assert code == EXIT_ITEMS_FAILED
    assert "shard 00002 is not finished" in caplog.text
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert summary["selection"]["unreadable_shards"] == [str(data / "images" / "00002.parquet") +
                                                         " (unfinished download)"]


def test_a_finished_download_and_a_hand_made_data_dir_have_no_unfinished_shards(tmp_path):
    data = write_sample(tmp_path / "data", n=6, broken=False, seed=5, shard_size=2)
    (data / "full_metadata.parquet").unlink()
    assert dataset.unfinished_shards(data) == []
    (data / "urls.parquet").unlink()  # a data dir put together by hand: nothing to compare against
    assert dataset.unfinished_shards(data) == []


def _shards_of_two(tmp_path):
    data = write_sample(tmp_path / "data", n=6, broken=False, seed=5, shard_size=2)  # shards 00000-00002
    for name in ("full_metadata.parquet", "metadata.csv"):
        (data / name).unlink()
    return data


def test_only_the_shards_selected_decide_the_exit_code(tmp_path, caplog):
    """A Slurm task per shard while the download still writes shard 2: the task of shard 0 (all done) exited 3
    for a shard not its own; the task of shard 2 was told "--shards 2: no such shard" (exit 2, a user mistake)."""
    data = _shards_of_two(tmp_path)
    (data / "images" / "00002_stats.json").unlink()
    args = ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--no-push", "--batch-size", "4"]
    assert main([*args, "--checkpoint-dir", str(tmp_path / "c0"), "--shards", "0"]) == EXIT_OK
    assert "00002" not in caplog.text
    assert main([*args, "--checkpoint-dir", str(tmp_path / "c2"), "--shards", "2"]) == EXIT_ITEMS_FAILED
    assert "shard 00002 is not finished" in caplog.text


@pytest.mark.parametrize("column", ["key", "original_key"])
def test_a_shard_whose_pages_do_not_read_is_retryable_not_skipped(column, tmp_path, caplog):
    """Its footer opens, a data page is garbage: the shard's rows were skipped with a log line and the run
    exited 0. A bad key page fails the first pass, a bad page of another column only the second."""
    data = _shards_of_two(tmp_path)
    path = data / "images" / "00001.parquet"
    pq.write_table(pq.read_table(path), path, compression="none")
    chunk = pq.read_metadata(path).row_group(0).column(pq.read_schema(path).names.index(column))
    raw = bytearray(path.read_bytes())
    raw[chunk.data_page_offset:chunk.data_page_offset + chunk.total_compressed_size] = \
        b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(raw))
    ckpt = tmp_path / "ckpt"
    code = main(["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir",
                 str(ckpt), "--no-push", "--batch-size", "4"])
    assert code == EXIT_ITEMS_FAILED
    assert json.loads((ckpt / store.SUMMARY).read_text())["selection"]["unreadable_shards"]
    assert len(pq.read_table(ckpt / store.MERGED)) == 4  # shards 0 and 2


def test_a_copy_of_a_shard_parquet_set_beside_it_is_no_shard(tmp_path):
    """00000 (1).parquet: without its stats file an unfinished download forever (exit 3), with one a traceback."""
    data = _shards_of_two(tmp_path)
    shutil.copy(data / "images" / "00000.parquet", data / "images" / "00000 (1).parquet")
    args = ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--no-push", "--batch-size", "4"]
    assert main([*args, "--checkpoint-dir", str(tmp_path / "a")]) == EXIT_OK
    (data / "images" / "00000 (1)_stats.json").write_text("{}")
    assert main([*args, "--checkpoint-dir", str(tmp_path / "b")]) == EXIT_OK
    assert len(pq.read_table(tmp_path / "b" / store.MERGED)) == 6
