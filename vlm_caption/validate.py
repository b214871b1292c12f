"""Validate stage: decode every image img2dataset saved, then write the outputs of the valid rows.

Per finished shard, decode_checks/NNNNN.parquet records what PIL made of each saved file (written last:
its presence marks the shard validated); from those and the shard parquets, invalid_images.parquet,
full_metadata.parquet and metadata.csv are rebuilt on every run, one shard in memory at a time.
The directory layout is in data_layout.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from . import store
from .atomic import atomic_path, atomic_write_table
from .cli import plural
from .data_layout import (FULL_METADATA_FILE, IMAGES_DIR, INVALID_FILE, METADATA_CSV, SAVED_COLUMNS, VALIDATION_DIR,
                          image_file_name, shard_name)
from .errors import FatalError, brief
from .schema import COLUMNS

logger = logging.getLogger(__name__)

STATS_END_META = b"vlm_caption.stats_end_time"
VALIDATION_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("file_name", pa.string()),  # relative to the output dir
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("format", pa.string()),  # what PIL detected (JPEG, PNG, ...); null when undecodable
    ("error", pa.string()),  # null = decodes fully
])
INVALID_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("error", pa.string())])
# Every carried column of the output registry under its metadata name, plus where the image file is.
FULL_METADATA_SCHEMA = pa.schema([(c.source, c.type) for c in COLUMNS if c.source] + [("file_name", pa.string())])
METADATA_CSV_SCHEMA = pa.schema([("file_name", pa.string()), ("text", pa.string())])


# ---------------------------------------------------------------------------------------------- validation

def check_image(path: str) -> tuple[int | None, int | None, str | None, str | None]:
    """(width, height, format, error) after decoding every pixel; error None means the file is usable.

    Image.verify() alone does not notice a truncated JPEG; load() does. Messages carry no paths or
    addresses so they are the same on every machine.
    """
    from PIL import UnidentifiedImageError

    from .images import ImageLoadError, open_checked

    try:
        if os.path.getsize(path) == 0:
            return None, None, None, "empty file"
        # Decoded at full size; a JPEG over the pixel limit at the scale the loader decodes it (images.open_checked)
        with open(path, "rb") as f:
            im, (width, height) = open_checked(f, draft=False)
            with im:
                fmt = im.format
                im.load()
        return width, height, fmt, None
    except FileNotFoundError:
        return None, None, None, "file missing"
    except UnidentifiedImageError:
        return None, None, None, "not an image (unidentified format)"
    except ImageLoadError as e:  # over the pixel limit, said as the loader says it
        return None, None, None, str(e)
    except Exception as e:  # noqa: BLE001  PIL's plugins raise more (NotImplementedError from DDS, ...): a bad
        # file from the web is a row's failure; escaping, it stopped the run, and every rerun at the same file
        return None, None, None, f"{type(e).__name__}: {e}"


@dataclass
class ValidationStats:
    shards: int = 0  # shards validated in this run
    images: int = 0  # images decoded in this run
    seconds: float = 0.0

    def as_dict(self) -> dict:
        rate = self.images / self.seconds if self.seconds > 0 else None
        return {"shards_validated_now": self.shards, "images_checked_now": self.images,
                "seconds": round(self.seconds, 3), "images_per_second": round(rate, 1) if rate else None}


def validation_path(out: Path, shard_id: int) -> Path:
    return out / VALIDATION_DIR / f"{shard_name(shard_id)}.parquet"


def is_validated(out: Path, shard_id: int, stats: dict) -> bool:
    """Validated, and for this very download of the shard (img2dataset rewrites stats when it redoes one)."""
    path = validation_path(out, shard_id)
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:  # cut short or overwritten by hand: the shard's images are decoded again
        store.quarantine(out, path, f"unreadable ({brief(str(e))})", "its shard is validated again")
        return False
    return meta.get(STATS_END_META) == repr(stats.get("end_time")).encode()


def validate_shards(out: Path, finished: dict[int, dict], workers: int) -> ValidationStats:
    """Decode the saved images of every finished shard not validated yet; write decode_checks/NNNNN.parquet."""
    todo = [s for s in sorted(finished) if not is_validated(out, s, finished[s])]
    result = ValidationStats()
    if not todo:
        return result
    (out / VALIDATION_DIR).mkdir(exist_ok=True)
    start = time.perf_counter()
    pool = _make_pool(workers)
    try:
        for shard_id in todo:
            result.images += _validate_shard(out, shard_id, finished[shard_id], pool)
            result.shards += 1
    finally:
        if pool is not None:  # on Ctrl-C/SIGTERM the shard's queued images are dropped, not decoded for nothing
            pool.shutdown(cancel_futures=True)
    result.seconds = time.perf_counter() - start
    logger.info("validated %s, %s in %.1f s", plural(result.shards, "shard"), plural(result.images, "image"),
                result.seconds)
    return result


def _make_pool(workers: int) -> ProcessPoolExecutor | None:
    if workers <= 1:
        return None
    # spawn, not fork: pyarrow and img2dataset leave threads behind, and forking a threaded process can hang.
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))


def _validate_shard(out: Path, shard_id: int, stats: dict, pool: ProcessPoolExecutor | None) -> int:
    shard = pq.read_table(out / IMAGES_DIR / f"{shard_name(shard_id)}.parquet", columns=["key", "status"])
    keys = sorted(shard.filter(pc.equal(shard["status"], "success"))["key"].to_pylist())
    names = [image_file_name(shard_id, k) for k in keys]
    paths = [str(out / n) for n in names]
    if pool is None or len(paths) < 32:  # a pool round trip costs more than decoding a handful
        checks = list(map(check_image, paths))
    else:
        try:
            checks = list(pool.map(check_image, paths, chunksize=16))
        except BrokenProcessPool:  # a worker killed, mostly by the kernel's OOM killer: images decoded at once
            raise FatalError(f"a decode worker died while checking shard {shard_name(shard_id)} (out of memory?); "
                             "rerun with fewer --validate-workers (validated shards are kept)") from None
    widths, heights, formats, errors = (list(col) for col in zip(*checks)) if checks else ([], [], [], [])
    table = pa.table({"key": keys, "file_name": names, "width": widths, "height": heights,
                      "format": formats, "error": errors}, schema=VALIDATION_SCHEMA)
    # Written last and atomically: its presence is the marker that this shard is validated.
    atomic_write_table(validation_path(out, shard_id),
                       table.replace_schema_metadata({STATS_END_META: repr(stats.get("end_time")).encode()}))
    return len(keys)


# ---------------------------------------------------------------------------------------------- outputs

@dataclass
class OutputCounts:
    rows: int = 0  # rows in finished shards
    downloaded: int = 0  # status success
    failed_by_status: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)
    invalid: int = 0
    metadata_rows: int = 0  # rows in full_metadata.parquet


def build_outputs(out: Path, shard_ids: list[int], include_invalid: bool = False,
                  further: list[pa.Field] | None = None, metadata: bool = True) -> OutputCounts:
    """full_metadata.parquet, metadata.csv and invalid_images.parquet, one shard in memory at a time.

    include_invalid keeps undecodable rows in full_metadata/metadata.csv (sample data for captioner tests).
    `further`: the source's further columns (img2dataset carried them into the shard parquets), appended.
    metadata False (a download with shards unfinished): the counts and invalid_images.parquet only; the two
    metadata files stand for a finished download, which the captioner would take for the whole data set.
    """
    counts = OutputCounts()
    schema = pa.schema([*FULL_METADATA_SCHEMA, *(further or [])])
    with contextlib.ExitStack() as stack:
        invalid_writer = stack.enter_context(pq.ParquetWriter(stack.enter_context(atomic_path(out / INVALID_FILE)),
                                                              INVALID_SCHEMA))
        meta_writer = csv_writer = None
        if metadata:
            meta_writer = stack.enter_context(pq.ParquetWriter(
                stack.enter_context(atomic_path(out / FULL_METADATA_FILE)), schema))
            csv_writer = stack.enter_context(pa_csv.CSVWriter(
                stack.enter_context(atomic_path(out / METADATA_CSV)), METADATA_CSV_SCHEMA))
        for shard_id in shard_ids:
            rows, invalid = _shard_outputs(out, shard_id, counts, include_invalid, schema)
            invalid_writer.write_table(invalid)
            if meta_writer is not None and csv_writer is not None:
                meta_writer.write_table(rows)
                csv_writer.write_table(pa.table({"file_name": rows["file_name"],
                                                 "text": pc.fill_null(rows["caption"], "")}, METADATA_CSV_SCHEMA))
    return counts


def _shard_outputs(out: Path, shard_id: int, counts: OutputCounts, include_invalid: bool,
                   schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    """(full_metadata rows, invalid rows) of one shard, sorted by key; updates counts."""
    shard = pq.read_table(out / IMAGES_DIR / f"{shard_name(shard_id)}.parquet")
    checks = pq.read_table(validation_path(out, shard_id))
    ok = pc.equal(shard["status"], "success")
    counts.rows += shard.num_rows
    counts.downloaded += pc.sum(ok).as_py() or 0
    failed = shard.filter(pc.invert(ok))
    counts.failed_by_status.update(failed["status"].to_pylist())
    counts.failure_reasons.update(failed["error_message"].to_pylist())

    bad = checks.filter(pc.is_valid(checks["error"]))
    counts.invalid += bad.num_rows
    invalid = pa.table({"key": bad["key"], "path": bad["file_name"], "error": bad["error"]}, schema=INVALID_SCHEMA)

    keep = checks if include_invalid else checks.filter(pc.is_null(checks["error"]))
    further = schema.names[len(FULL_METADATA_SCHEMA):]
    downloaded = shard.filter(ok).select(["key", *SAVED_COLUMNS, "caption", "url", "sha256", *further])
    # Joined on row numbers: Acero's join takes no list columns, which a source may have (further columns).
    numbered = pa.table({"key": downloaded["key"], "_row": pa.array(range(downloaded.num_rows), pa.int64())})
    checked = numbered.join(keep.select(["key", "file_name", "width", "height"]), "key", join_type="inner")
    rows = downloaded.take(checked["_row"])
    rows = pa.table({
        "key": rows["key"], "original_key": rows["original_key"], "url": rows["url"], "caption": rows["caption"],
        "md5": rows["source_md5"], "tags": rows["tags"], "merged_tags": rows["merged_tags"],
        # img2dataset leaves sizes null when it does not re-encode; PIL measured them. No resizing, so
        # the saved size is the original size.
        "width": checked["width"], "height": checked["height"],
        "original_width": checked["width"], "original_height": checked["height"],
        "sha256": rows["sha256"], "file_name": checked["file_name"],
        **{c: rows[c].cast(schema.field(c).type) for c in further},  # dates and decimals came back as text
    }, schema=schema).sort_by("key")
    counts.metadata_rows += rows.num_rows
    return rows, invalid.sort_by("key")
