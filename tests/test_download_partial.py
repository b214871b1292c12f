"""Captioning a download that has not finished: every shard it still owes is named and the exit code is 3,
including shards img2dataset never started (no parquet yet), not only the one it was cut short in."""
from __future__ import annotations

import json
import shutil

from batched_image_inference import main
from vlm_caption import dataset, store
from vlm_caption.errors import EXIT_ITEMS_FAILED
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
