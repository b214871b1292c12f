"""What the download checks after img2dataset: every saved file decoded with PIL (in a process pool for big
shards), the bytes PIL's verify() lets through, decompression bombs, and img2dataset's completion markers."""
from __future__ import annotations

import io
import logging

import pyarrow.parquet as pq

from vlm_caption import download as dl
from vlm_caption import validate
from vlm_caption.sample_data import write_sample


def test_validation_pool_matches_inline(tmp_path):
    """The process pool (used for shards of 32+ images) finds exactly what the inline path finds."""
    root = write_sample(tmp_path / "s", n=48, broken=True, seed=5)
    inline = pq.read_table(root / "decode_checks/00000.parquet")
    (root / "decode_checks/00000.parquet").unlink()
    stats = dl._finished_stats(root / "images")
    result = validate.validate_shards(root, stats, workers=2)
    assert result.images == 45
    assert pq.read_table(root / "decode_checks/00000.parquet").equals(inline)


def test_a_stats_file_cut_short_or_not_utf8_counts_its_shard_as_finished_with_a_warning(tmp_path, caplog):
    """As img2dataset itself does (it only looks for the file); a non-UTF-8 one was a traceback."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "00000_stats.json").write_text('{"count": 3}')
    (images / "00001_stats.json").write_text('{"count"')
    (images / "00002_stats.json").write_bytes(b"\xff\xfe{}")
    with caplog.at_level(logging.WARNING):
        assert dl._finished_stats(images) == {0: {"count": 3}, 1: {}, 2: {}}
    assert caplog.text.count("cannot be read") == 2


def test_check_image_catches_what_verify_misses(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((400, 300)).save(buf, "JPEG")
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(buf.getvalue())
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(cut) as im:
        im.verify()  # passes: verify() does not decode the pixels
    assert "truncated" in validate.check_image(str(cut))[3]
    assert validate.check_image(str(good))[3] is None


def test_check_image_reports_decompression_bombs(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels is more than twice the limit
    width, height, fmt, error = validate.check_image(str(path))
    assert error.startswith("decompression bomb") and width is None
