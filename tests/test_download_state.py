"""download_data.py meeting its own output files broken (another JSON type, garbage bytes): a warning and the
file set aside or done again, or one line saying what to do; never a traceback."""
from __future__ import annotations

import logging

from vlm_caption import download as dl
from vlm_caption.data_layout import IMAGES_DIR


def test_a_stats_file_of_another_json_type_counts_its_shard_finished_with_a_warning(tmp_path, caplog):
    images = tmp_path / IMAGES_DIR
    images.mkdir()
    (images / "00000_stats.json").write_text('{"end_time": 1.5, "count": 4}')
    (images / "00001_stats.json").write_text("[1, 2, 3]")
    with caplog.at_level(logging.WARNING):
        assert dl._finished_stats(images) == {0: {"end_time": 1.5, "count": 4}, 1: {}}
    assert "00001_stats.json cannot be read (not a JSON object); treating shard 00001 as finished" in caplog.text
