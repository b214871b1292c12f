"""download_data.py meeting its own output files broken (another JSON type, garbage bytes): a warning and the
file set aside or done again, or one line saying what to do; never a traceback."""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest

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


def test_an_unreadable_decode_check_is_set_aside_and_its_shard_validated_again(tmp_path, caplog):
    from vlm_caption import store, validate

    path = validate.validation_path(tmp_path, 0)
    path.parent.mkdir()
    path.write_bytes(b"\xb4\xff\x00garbage")
    with caplog.at_level(logging.WARNING):
        assert not validate.is_validated(tmp_path, 0, {"end_time": 1.5})
    assert not path.exists() and [p.name[:13] for p in (tmp_path / store.QUARANTINE_DIR).iterdir()] == ["00000.parquet"]
    assert "its shard is validated again" in caplog.text


def test_an_unreadable_urls_parquet_beside_finished_shards_is_a_one_line_usage_error(tmp_path):
    import pyarrow as pa
    import pytest

    from vlm_caption.data_layout import URLS_FILE
    from vlm_caption.errors import UsageError

    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / "00000_stats.json").write_text('{"end_time": 1.5}')
    (tmp_path / URLS_FILE).write_bytes(b"PAR1\xb4\xff\x00garbage")
    with pytest.raises(UsageError, match=r"urls.parquet cannot be read \(.*\); it says which rows the finished "
                                         r"shards hold: restore it, or use a new --output") as e:
        dl.write_urls(tmp_path, pa.table({"url": ["http://127.0.0.1/a.jpg"]}), 8)
    assert "\n" not in str(e.value) and (tmp_path / URLS_FILE).read_bytes().endswith(b"garbage")  # left as it was


def test_a_file_where_images_or_decode_checks_should_be_is_one_line(tmp_path):
    import pyarrow as pa
    import pytest

    from vlm_caption.config import DownloadConfig
    from vlm_caption.data_layout import VALIDATION_DIR
    from vlm_caption.download_source import SOURCE_COLUMNS
    from vlm_caption.errors import UsageError

    urls = dl.url_table(pa.table({c: ["http://127.0.0.1:9/a.jpg" if c == "url" else "x"] for c in SOURCE_COLUMNS}))
    for name in (IMAGES_DIR, VALIDATION_DIR):
        out = tmp_path / name.strip("_")
        out.mkdir()
        (out / name).write_text("not a directory")
        with pytest.raises(UsageError, match=f"{name} is a file, not a directory: move it aside and rerun"):
            dl._download_into(out, urls, DownloadConfig(output=str(out)), 0.0)


def test_a_rerun_over_a_source_with_nan_is_not_taken_for_other_metadata(tmp_path):
    """NaN != NaN: pandas writes missing floats as NaN, and such a download could not be resumed."""
    import pyarrow as pa
    import pytest

    from vlm_caption.errors import UsageError

    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / "00000_stats.json").write_text('{"end_time": 1.5}')
    urls = pa.table({"url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "score": [float("nan"), 0.5]})
    dl.write_urls(tmp_path, urls, 8)
    dl.write_urls(tmp_path, urls, 8)  # the same source again: resumed
    with pytest.raises(UsageError, match=r"other metadata \(score differ\)"):
        dl.write_urls(tmp_path, urls.set_column(1, "score", pa.array([float("nan"), 0.7])), 8)


def test_a_rerun_over_a_source_with_nan_inside_lists_and_structs_is_not_taken_for_other_metadata(tmp_path):
    """NaN != NaN inside a list<double> or a struct too: such a download could not be resumed either."""
    import pyarrow as pa
    import pytest

    from vlm_caption.errors import UsageError

    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / "00000_stats.json").write_text('{"end_time": 1.5}')
    nan = float("nan")
    scores = pa.array([[1.0, nan], None, [nan]], pa.list_(pa.float64()))
    boxes = pa.array([{"w": nan, "tags": [nan]}, None, {"w": 1.0, "tags": []}],
                     pa.struct([("w", pa.float32()), ("tags", pa.large_list(pa.float64()))]))
    urls = pa.table({"url": [f"http://127.0.0.1/{i}.jpg" for i in range(3)], "scores": scores, "boxes": boxes})
    dl.write_urls(tmp_path, urls, 8)
    dl.write_urls(tmp_path, pa.concat_tables([urls.slice(0, 1), urls.slice(1)]), 8)  # the same again (sliced chunks)
    with pytest.raises(UsageError, match=r"other metadata \(scores differ\)"):
        dl.write_urls(tmp_path, urls.set_column(1, "scores", pa.array([[1.0, 2.0], None, [nan]], scores.type)), 8)


NAN = float("nan")
NESTED_WITH_NAN = {  # kind: (type, values with NaN inside, the same with one value changed)
    "fixed_size_list": (pa.list_(pa.float64(), 2), [[1.0, NAN], None, [NAN, 2.0]], [[1.0, NAN], None, [NAN, 3.0]]),
    "map": (pa.map_(pa.string(), pa.float64()), [[("a", NAN)], None, [("b", 1.0), ("c", NAN)]],
            [[("a", NAN)], None, [("b", 2.0), ("c", NAN)]]),
    "large_list": (pa.large_list(pa.float32()), [[1.0, NAN], None, [NAN]], [[1.0, NAN], None, [0.5]]),
    "list_view": (pa.list_view(pa.float64()), [[1.0, NAN], None, [NAN]], [[2.0, NAN], None, [NAN]]),
    "list of fixed_size_list": (pa.list_(pa.list_(pa.float32(), 2)), [[[1.0, NAN]], None, []],
                                [[[1.0, 1.0]], None, []]),
    "map of struct": (pa.map_(pa.string(), pa.struct([("w", pa.float64())])), [[("a", {"w": NAN})], None, []],
                      [[("a", {"w": 1.0})], None, []]),
}


@pytest.mark.parametrize("kind", NESTED_WITH_NAN)
def test_a_rerun_over_a_source_with_nan_in_any_nested_column_is_not_taken_for_other_metadata(tmp_path, kind):
    """Fixed-size lists, maps and list views holding NaN (at any depth) refused every resume too."""
    from vlm_caption.errors import UsageError

    kind_type, values, changed = NESTED_WITH_NAN[kind]
    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / "00000_stats.json").write_text('{"end_time": 1.5}')
    urls = pa.table({"url": [f"http://127.0.0.1/{i}.jpg" for i in range(3)], "x": pa.array(values, kind_type)})
    dl.write_urls(tmp_path, urls, 8)
    dl.write_urls(tmp_path, pa.concat_tables([urls.slice(0, 1), urls.slice(1)]), 8)  # the same again (sliced chunks)
    with pytest.raises(UsageError, match=r"other metadata \(x differ\)"):
        dl.write_urls(tmp_path, urls.set_column(1, "x", pa.array(changed, kind_type)), 8)


def test_a_rerun_over_columns_parquet_stores_as_another_type_is_not_taken_for_other_metadata(tmp_path):
    import datetime

    import pyarrow as pa

    (tmp_path / IMAGES_DIR).mkdir()
    (tmp_path / IMAGES_DIR / "00000_stats.json").write_text('{"end_time": 1.5}')
    urls = pa.table({"url": ["http://127.0.0.1/a.jpg"], "day": pa.array([datetime.date(2020, 1, 2)], pa.date64()),
                     "at": pa.array([datetime.datetime(2020, 1, 2, 3)], pa.timestamp("s"))})
    dl.write_urls(tmp_path, urls, 8)
    dl.write_urls(tmp_path, urls, 8)  # urls.parquet reads back date32 and timestamp[ms]: the same values


def test_tmp_files_of_a_run_killed_mid_write_are_removed_by_the_next(tmp_path):
    import socket
    import subprocess
    import sys

    import pyarrow as pa
    import pytest

    from vlm_caption.config import DownloadConfig
    from vlm_caption.data_layout import VALIDATION_DIR
    from vlm_caption.download_source import SOURCE_COLUMNS
    from vlm_caption.errors import UsageError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".full_metadata.parquet.tmp-{socket.gethostname()}-{dead}.{dead}",
             tmp_path / VALIDATION_DIR / f".00000.parquet.tmp-{socket.gethostname()}-{dead}.{dead}"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"PAR1 half")
    (tmp_path / IMAGES_DIR).write_text("not a directory")  # stops the run right after its cleanup
    urls = dl.url_table(pa.table({c: ["http://127.0.0.1:9/a.jpg" if c == "url" else "x"] for c in SOURCE_COLUMNS}))
    with pytest.raises(UsageError):
        dl._download_into(tmp_path, urls, DownloadConfig(output=str(tmp_path)), 0.0)
    assert not any(p.exists() for p in stale)


def test_a_decode_worker_that_dies_is_one_fatal_line(tmp_path):
    """The kernel's OOM killer ends a worker decoding a huge image: BrokenProcessPool, not a traceback."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from vlm_caption import validate
    from vlm_caption.errors import FatalError

    (tmp_path / IMAGES_DIR).mkdir()
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(40)], "status": ["success"] * 40}),
                   tmp_path / IMAGES_DIR / "00000.parquet")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=os._exit, initargs=(9,))
    try:
        with pytest.raises(FatalError, match="a decode worker died while checking shard 00000"):
            validate._validate_shard(tmp_path, 0, {}, pool)
    finally:
        pool.shutdown()
    assert not validate.validation_path(tmp_path, 0).exists()


def test_an_image_pil_fails_on_with_another_exception_is_an_invalid_row(tmp_path):
    """A DDS of a pixel format PIL lacks raises NotImplementedError: it stopped the run (and every rerun)."""
    import io

    from PIL import Image

    from vlm_caption import validate

    buf = io.BytesIO()
    Image.new("RGBA", (17, 13)).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = (144).to_bytes(4, "little")  # the pixel format's flags
    (tmp_path / "a.jpg").write_bytes(data)
    assert validate.check_image(str(tmp_path / "a.jpg")) == (None, None, None,
                                                             "NotImplementedError: Unknown pixel format flags 144")


def test_a_big_art_scan_is_checked_without_a_warning_on_stderr(tmp_path):
    """Between PIL's warning and error limits (90-179 MP) every image printed a DecompressionBombWarning."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("L", (12000, 8000)).save(tmp_path / "a.jpg", "PNG")
    code = f"from vlm_caption.validate import check_image; print(check_image({str(tmp_path / 'a.jpg')!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "(12000, 8000, 'PNG', None)" and "Warning" not in done.stderr, done.stderr


def test_ctrl_c_while_validating_drops_the_queued_decodes(tmp_path, monkeypatch):
    """shutdown() ran every image queued for the shard before Ctrl-C or SIGTERM could end the run."""
    import time

    import pytest

    from vlm_caption import validate

    def interrupted(out, shard_id, stats, pool):
        for _ in range(40):
            pool.submit(time.sleep, 0.25)  # 5 s of work for two workers
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "_validate_shard", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        validate.validate_shards(tmp_path, {0: {}}, workers=2)
    assert time.monotonic() - start < 3.5


def test_a_finished_shard_whose_images_folder_is_gone_is_downloaded_again(tmp_path, caplog):
    """Its saved decode check listed files that were deleted: full_metadata.parquet kept them as valid. A shard
    whose URLs all failed has no folder, and stays finished."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption import store

    images = tmp_path / IMAGES_DIR
    images.mkdir()
    for shard, status in (("00000", "success"), ("00001", "failed_to_download")):
        pq.write_table(pa.table({"key": [f"{shard}0000"], "status": [status]}), images / f"{shard}.parquet")
        (images / f"{shard}_stats.json").write_text('{"end_time": 1.5}')
    with caplog.at_level(logging.WARNING):
        dl.set_aside_unreadable_shards(tmp_path, n_rows=2, shard_size=1)
    assert sorted(p.name for p in images.iterdir()) == ["00001.parquet", "00001_stats.json"]
    assert len(list((tmp_path / store.QUARANTINE_DIR).iterdir())) == 2 and "images/00000/ is gone" in caplog.text
    (images / "00000").mkdir()  # a shard with its folder is left alone
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), images / "00000.parquet")
    (images / "00000_stats.json").write_text('{"end_time": 1.5}')
    dl.set_aside_unreadable_shards(tmp_path, n_rows=2, shard_size=1)
    assert (images / "00000_stats.json").exists()
