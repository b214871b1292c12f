"""The data directory's layout: file names, shard names and keys, atomic writes (README: "Data layout").

    urls.parquet              url, caption, original_key, md5, tags, merged_tags, the source's further columns
                              (download_source.further_columns) (+ shard size in its metadata)
    images/                   img2dataset's own output (files format), never modified here
      00000/000000000.jpg     raw downloaded bytes: the extension is always .jpg whatever the content
      00000.parquet           per-shard rows (download.SHARD_SCHEMA), in completion order
      00000_stats.json        img2dataset's completion marker
    decode_checks/00000.parquet  per-shard decode results (validate.VALIDATION_SCHEMA); present = shard validated
    invalid_images.parquet    key, path, error: files img2dataset saved that PIL cannot fully decode
    full_metadata.parquet     successful, decodable rows of every finished shard (validate.FULL_METADATA_SCHEMA);
                              undecodable files are only in invalid_images.parquet
    metadata.csv              file_name,text for `datasets.load_dataset("imagefolder", data_dir=OUTPUT)`
    download_summary.json     counts, failure reasons, timings
    download.lock             held by the download_data.py run writing here (two at once corrupt shards)
    download_workers.lock     held shared by each of img2dataset's workers while it writes a shard (they outlive
                              a run killed alone by up to a second: a rerun waits for them)
    download_errors.log       tracebacks of errors in img2dataset's workers (appended to by every run)
    quarantine/               finished shards whose parquet could not be read, set aside and downloaded again;
                              unreadable decode_checks/ files, set aside (their shards are validated again)

download.py writes urls.parquet, runs img2dataset and writes the summary; validate.py writes
decode_checks/, invalid_images.parquet, full_metadata.parquet and metadata.csv; sample_data.py writes
the same layout synthetically (files written with vlm_caption.atomic). The names live here so that none of them
imports another for a constant.

Validation markers live in decode_checks/, not images/: img2dataset treats every `images/*.json` as a
finished shard (it parses the digits before the first '_'), so a stray marker there could make it skip
a shard, and a non-numeric name crashes its scan. No file or directory here may be named like a split
(train, test, valid, validation, dev, eval, ...): `load_dataset("imagefolder", data_dir=OUTPUT)` would
then infer splits from those names and find no images in them.
"""
from __future__ import annotations

import math


# Passed to img2dataset's save_additional_columns, in this order. `md5` is reserved by img2dataset
# (it raises ValueError), so the dataset's md5 travels as `source_md5` and is renamed back afterwards.
SAVED_COLUMNS = ("original_key", "source_md5", "tags", "merged_tags")
SHARD_NAMES = {"md5": "source_md5"}  # source column -> its name in img2dataset's shard parquets
IMAGES_DIR = "images"
VALIDATION_DIR = "decode_checks"  # not "validation": datasets would read that name as a split
URLS_FILE = "urls.parquet"
SHARD_SIZE_META = b"vlm_caption.shard_size"  # urls.parquet's schema metadata: the --shard-size it was cut by
FULL_METADATA_FILE = "full_metadata.parquet"
INVALID_FILE = "invalid_images.parquet"
METADATA_CSV = "metadata.csv"
SUMMARY_FILE = "download_summary.json"
DOWNLOAD_LOCK = "download.lock"
WORKERS_LOCK = "download_workers.lock"  # img2dataset's workers, each while on a shard (download_client.py)
ERRORS_LOG = "download_errors.log"  # img2dataset's worker tracebacks, appended to (download_workers.py)
ENCODE_FORMAT = "jpg"  # img2dataset names every file {key}.jpg (its encode_format), even PNG bytes
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names and key prefixes have 5 digits


# ---------------------------------------------------------------------------------------------- names

def img2dataset_key(index: int, shard_size: int) -> str:
    """The key img2dataset gives row `index` of its input (same arithmetic as its compute_key)."""
    shard_id, sample_id = divmod(index, shard_size)
    sample_digits = math.ceil(math.log10(shard_size))
    return f"{(10 ** sample_digits) * shard_id + sample_id:0{sample_digits + OOM_SHARD_COUNT}d}"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


STATS_SUFFIX = "_stats.json"  # img2dataset writes NNNNN_stats.json when shard NNNNN is done


def stats_file(shard: str) -> str:
    """The name of a shard's completion marker, e.g. 00003_stats.json."""
    return f"{shard}{STATS_SUFFIX}"


def image_file_name(shard_id: int, key: str) -> str:
    """Path of a saved image relative to the output dir."""
    return f"{IMAGES_DIR}/{shard_name(shard_id)}/{key}.{ENCODE_FORMAT}"


def expected_shards(n_rows: int, shard_size: int) -> list[int]:
    return list(range(math.ceil(n_rows / shard_size)))
