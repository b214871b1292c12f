"""Download stage: source table -> urls.parquet -> img2dataset -> decode check -> full_metadata, metadata.csv.

Layout under the output directory (see DESIGN.md):

    urls.parquet              url, caption, original_key, md5, tags, merged_tags (+ shard size in its metadata)
    images/                   img2dataset's own output (files format), never modified here
      00000/000000000.jpg     raw downloaded bytes: the extension is always .jpg whatever the content
      00000.parquet           per-shard rows (SHARD_SCHEMA), in completion order
      00000_stats.json        img2dataset's completion marker
    decode_checks/00000.parquet  our per-shard decode results (VALIDATION_SCHEMA); its presence = shard validated
    invalid_images.parquet    key, path, error: files img2dataset saved that PIL cannot fully decode
    full_metadata.parquet     successful, valid rows of every finished shard (FULL_METADATA_SCHEMA)
    metadata.csv              file_name,text for `datasets.load_dataset("imagefolder", data_dir=OUTPUT)`
    download_summary.json     counts, failure reasons, timings

Validation markers live in decode_checks/, not images/: img2dataset treats every `images/*.json` as a
finished shard (it parses the digits before the first '_'), so a stray marker there could make it skip
a shard, and a non-numeric name crashes its scan. No file or directory here may be named like a split
(train, test, valid, validation, dev, eval, ...): `load_dataset("imagefolder", data_dir=OUTPUT)` would
then infer splits from those names and find no images in them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .config import EXIT_ITEMS_FAILED, EXIT_OK, DownloadConfig, FatalError, UsageError

logger = logging.getLogger(__name__)

SOURCE_COLUMNS = ("key", "url", "caption", "md5", "tags", "merged_tags")
URL_COLUMNS = ("url", "caption", "original_key", "md5", "tags", "merged_tags")
# Passed to img2dataset's save_additional_columns, in this order. `md5` is reserved by img2dataset
# (it raises ValueError), so the dataset's md5 travels as `source_md5` and is renamed back afterwards.
SAVED_COLUMNS = ("original_key", "source_md5", "tags", "merged_tags")
IMAGES_DIR = "images"
VALIDATION_DIR = "decode_checks"  # not "validation": datasets would read that name as a split
URLS_FILE = "urls.parquet"
IMG2DATASET_INPUT = "_img2dataset_input.parquet"  # urls.parquet with md5 renamed; removed after the run
FULL_METADATA_FILE = "full_metadata.parquet"
INVALID_FILE = "invalid_images.parquet"
METADATA_CSV = "metadata.csv"
SUMMARY_FILE = "download_summary.json"
ENCODE_FORMAT = "jpg"  # img2dataset names every file {key}.jpg (its encode_format), even PNG bytes
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names and key prefixes have 5 digits
SHARD_SIZE_META = b"vlm_caption.shard_size"
STATS_END_META = b"vlm_caption.stats_end_time"

# What img2dataset 1.47 writes to images/NNNNN.parquet for our input (checked by tests/test_sample_data.py).
SHARD_SCHEMA = pa.schema(
    [(c, pa.string()) for c in SAVED_COLUMNS]
    + [("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
       ("error_message", pa.string())]
    + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    + [("exif", pa.string()), ("sha256", pa.string())]
)
VALIDATION_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("file_name", pa.string()),  # relative to the output dir
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("format", pa.string()),  # what PIL detected (JPEG, PNG, ...); null when undecodable
    ("error", pa.string()),  # null = decodes fully
])
INVALID_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("error", pa.string())])
FULL_METADATA_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("key", "original_key", "url", "caption", "md5", "tags", "merged_tags")]
    + [(c, pa.int64()) for c in ("width", "height", "original_width", "original_height")]
    + [("sha256", pa.string()), ("file_name", pa.string())]
)
METADATA_CSV_SCHEMA = pa.schema([("file_name", pa.string()), ("text", pa.string())])


# ---------------------------------------------------------------------------------------------- names

def img2dataset_key(index: int, shard_size: int) -> str:
    """The key img2dataset gives row `index` of its input (same arithmetic as its compute_key)."""
    shard_id, sample_id = divmod(index, shard_size)
    sample_digits = math.ceil(math.log10(shard_size))
    return f"{(10 ** sample_digits) * shard_id + sample_id:0{sample_digits + OOM_SHARD_COUNT}d}"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def image_file_name(shard_id: int, key: str) -> str:
    """Path of a saved image relative to the output dir."""
    return f"{IMAGES_DIR}/{shard_name(shard_id)}/{key}.{ENCODE_FORMAT}"


def expected_shards(n_rows: int, shard_size: int) -> list[int]:
    return list(range(math.ceil(n_rows / shard_size)))


# ---------------------------------------------------------------------------------------------- files

def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half file under the real name."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- source

def load_source(source: str, split: str, max_rows: int | None) -> pa.Table:
    """The source rows (first max_rows), the six ContraStyles columns as strings.

    A .parquet/.csv/.jsonl/.json file is read with pyarrow; anything else goes through
    `datasets.load_dataset(source, split=split)` (a Hub id such as tomg-group-umd/ContraStyles, or a
    local dataset directory). A missing column is a one-line UsageError raised before any download.
    """
    path = Path(source)
    if path.suffix.lower() in (".parquet", ".csv", ".jsonl", ".json"):
        if not path.is_file():
            raise UsageError(f"--source {source} does not exist")
        table = _read_local_table(path)
    else:
        table = _load_hf_table(source, split, max_rows)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return pa.table({c: _as_strings(table.column(c), c) for c in SOURCE_COLUMNS})


def check_source_columns(columns: list[str], source: str) -> None:
    missing = [c for c in SOURCE_COLUMNS if c not in columns]
    if missing:
        raise UsageError(
            f"--source {source} lacks column(s) {', '.join(missing)}; it needs {', '.join(SOURCE_COLUMNS)}"
        )


def _read_local_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            check_source_columns(pq.read_schema(path).names, str(path))
            return pq.read_table(path, columns=list(SOURCE_COLUMNS))
        if suffix == ".csv":
            # Read every column as text: keys like "000123" must keep their leading zeros.
            header = pa_csv.open_csv(path).schema.names
            check_source_columns(header, str(path))
            types = {c: pa.string() for c in header}
            return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
        import pyarrow.json as pa_json

        table = pa_json.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"--source {path}: cannot read it ({e}); give a .parquet, .csv or .jsonl file") from None
    check_source_columns(table.column_names, str(path))
    return table


def _load_hf_table(source: str, split: str, max_rows: int | None) -> pa.Table:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except FileNotFoundError as e:  # datasets' DatasetNotFoundError and DataFilesNotFoundError
        raise UsageError(f"--source {source}: dataset not found ({e})") from None
    except ValueError as e:  # an unknown split, among others
        raise UsageError(f"--source {source} --split {split}: {e}") from None
    except ConnectionError as e:
        raise FatalError(f"--source {source}: cannot reach the Hub ({e})") from None
    check_source_columns(ds.column_names, source)
    ds = ds.select_columns(list(SOURCE_COLUMNS))
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
    return ds.with_format("arrow")[:]


def _as_strings(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """Every ContraStyles column is a string in the output schema; list columns become 'a, b, c'."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.binary_join(column.cast(pa.list_(pa.string())), ", ")
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise UsageError(f"source column {name} has type {column.type}, which cannot be read as text: {e}") from None


def url_table(source: pa.Table) -> pa.Table:
    """urls.parquet's columns: the dataset's `key` becomes original_key (img2dataset assigns its own keys)."""
    renamed = {"original_key": "key"}
    return pa.table({c: source.column(renamed.get(c, c)) for c in URL_COLUMNS})


def write_urls(out: Path, urls: pa.Table, shard_size: int) -> None:
    """Write urls.parquet, refusing to mix with a download of other rows or another shard size.

    img2dataset resumes by shard number alone, so a rerun over a different row list or shard size would
    silently keep old shards that now mean other rows.
    """
    path = out / URLS_FILE
    if path.is_file() and _finished_stats(out / IMAGES_DIR):
        old = pq.read_table(path, columns=["url"])
        old_size = (old.schema.metadata or {}).get(SHARD_SIZE_META, b"?").decode()
        if old_size != str(shard_size) or not old.column("url").equals(urls.column("url")):
            raise UsageError(
                f"--output {out} already holds a download of other rows or another shard size "
                f"({old.num_rows} rows, shard size {old_size}; now {urls.num_rows} rows, shard size {shard_size}); "
                "rerun with the same --source/--max-rows/--shard-size or use a new --output"
            )
    write_parquet_atomic(urls.replace_schema_metadata({SHARD_SIZE_META: str(shard_size).encode()}), path)


# ---------------------------------------------------------------------------------------------- img2dataset

def check_distributor(distributor: str) -> None:
    """img2dataset silently downloads nothing when ray is missing: fail up front instead."""
    module = {"ray": "ray", "pyspark": "pyspark"}.get(distributor)
    if module is None:
        return
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"--distributor {distributor} needs the {module} package; pip install {module}")


def run_img2dataset(out: Path, urls: pa.Table, cfg: DownloadConfig) -> None:
    """Download every unfinished shard with img2dataset's Python API (incremental: done shards are skipped)."""
    if threading.current_thread() is not threading.main_thread():
        raise FatalError("img2dataset must run in the main thread (it installs a signal handler)")
    input_path = out / IMG2DATASET_INPUT
    write_parquet_atomic(urls.rename_columns(["source_md5" if c == "md5" else c for c in urls.column_names]),
                         input_path)
    # Set before the import: albumentations (imported by img2dataset) checks an index for updates otherwise.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    previous = signal.getsignal(signal.SIGINT)
    try:
        download(
            url_list=str(input_path),
            output_folder=str(out / IMAGES_DIR),
            input_format="parquet",
            output_format="files",
            url_col="url",
            caption_col="caption",
            save_additional_columns=list(SAVED_COLUMNS),
            disable_all_reencoding=True,  # keep the original bytes; we check them with PIL afterwards
            encode_format=ENCODE_FORMAT,
            incremental_mode="incremental",
            compute_hash="sha256",
            timeout=cfg.timeout,
            retries=cfg.retries,
            thread_count=cfg.threads,
            processes_count=cfg.processes,
            distributor=cfg.distributor,
            number_sample_per_shard=cfg.shard_size,
            oom_shard_count=OOM_SHARD_COUNT,
            enable_wandb=False,
        )
    except SystemExit as e:
        # img2dataset's SIGINT handler deletes its _tmp dir and calls sys.exit(0): that is an
        # interruption, not success. Finished shards are kept; a rerun resumes.
        raise KeyboardInterrupt from e
    finally:
        # Its handler is never restored by img2dataset and would turn a later Ctrl-C into exit code 0.
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        input_path.unlink(missing_ok=True)


def _finished_stats(images_dir: Path) -> dict[int, dict]:
    """img2dataset's finished shards: shard id -> its NNNNN_stats.json (written when the shard is done)."""
    done = {}
    for path in images_dir.glob("*_stats.json"):
        prefix = path.name.split("_", 1)[0]
        if prefix.isdigit():
            try:
                done[int(prefix)] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                # img2dataset writes it in place, after closing the shard parquet: a crash mid-write leaves
                # a complete shard with a broken stats file, which img2dataset itself counts as done.
                logger.warning("%s is not valid JSON; treating shard %s as finished", path, prefix)
                done[int(prefix)] = {}
    return done


# ---------------------------------------------------------------------------------------------- validation

def check_image(path: str) -> tuple[int | None, int | None, str | None, str | None]:
    """(width, height, format, error) after decoding every pixel; error None means the file is usable.

    Image.verify() alone does not notice a truncated JPEG; load() does. Messages carry no paths or
    addresses so they are the same on every machine.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if os.path.getsize(path) == 0:
            return None, None, None, "empty file"
        with Image.open(path) as im:
            width, height, fmt = im.width, im.height, im.format
            im.load()
        return width, height, fmt, None
    except FileNotFoundError:
        return None, None, None, "file missing"
    except UnidentifiedImageError:
        return None, None, None, "not an image (unidentified format)"
    except Image.DecompressionBombError as e:
        return None, None, None, f"decompression bomb: {e}"
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
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
    meta = pq.read_schema(path).metadata or {}
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
        if pool is not None:
            pool.shutdown()
    result.seconds = time.perf_counter() - start
    logger.info("validated %d shard(s), %d images in %.1f s", result.shards, result.images, result.seconds)
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
        checks = list(pool.map(check_image, paths, chunksize=16))
    widths, heights, formats, errors = (list(col) for col in zip(*checks)) if checks else ([], [], [], [])
    table = pa.table({"key": keys, "file_name": names, "width": widths, "height": heights,
                      "format": formats, "error": errors}, schema=VALIDATION_SCHEMA)
    # Written last and atomically: its presence is the marker that this shard is validated.
    write_parquet_atomic(table.replace_schema_metadata({STATS_END_META: repr(stats.get("end_time")).encode()}),
                         validation_path(out, shard_id))
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


def build_outputs(out: Path, shard_ids: list[int], include_invalid: bool = False) -> OutputCounts:
    """full_metadata.parquet, metadata.csv and invalid_images.parquet, one shard in memory at a time.

    include_invalid keeps undecodable rows in full_metadata/metadata.csv (sample data for captioner tests).
    """
    counts = OutputCounts()
    tmp = {name: out / f".{name}.tmp" for name in (FULL_METADATA_FILE, METADATA_CSV, INVALID_FILE)}
    with pq.ParquetWriter(tmp[FULL_METADATA_FILE], FULL_METADATA_SCHEMA) as meta_writer, \
            pa_csv.CSVWriter(tmp[METADATA_CSV], METADATA_CSV_SCHEMA) as csv_writer, \
            pq.ParquetWriter(tmp[INVALID_FILE], INVALID_SCHEMA) as invalid_writer:
        for shard_id in shard_ids:
            rows, invalid = _shard_outputs(out, shard_id, counts, include_invalid)
            meta_writer.write_table(rows)
            csv_writer.write_table(pa.table({"file_name": rows["file_name"],
                                             "text": pc.fill_null(rows["caption"], "")}, METADATA_CSV_SCHEMA))
            invalid_writer.write_table(invalid)
    for name, path in tmp.items():
        os.replace(path, out / name)
    return counts


def _shard_outputs(out: Path, shard_id: int, counts: OutputCounts, include_invalid: bool) -> tuple[pa.Table, pa.Table]:
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
    downloaded = shard.filter(ok).select(["key", *SAVED_COLUMNS, "caption", "url", "sha256"])
    rows = downloaded.join(keep.select(["key", "file_name", "width", "height"]), "key", join_type="inner")
    rows = pa.table({
        "key": rows["key"], "original_key": rows["original_key"], "url": rows["url"], "caption": rows["caption"],
        "md5": rows["source_md5"], "tags": rows["tags"], "merged_tags": rows["merged_tags"],
        # img2dataset leaves sizes null when it does not re-encode; PIL measured them. No resizing, so
        # the saved size is the original size.
        "width": rows["width"], "height": rows["height"],
        "original_width": rows["width"], "original_height": rows["height"],
        "sha256": rows["sha256"], "file_name": rows["file_name"],
    }, schema=FULL_METADATA_SCHEMA).sort_by("key")
    counts.metadata_rows += rows.num_rows
    return rows, invalid.sort_by("key")


# ---------------------------------------------------------------------------------------------- summary

def make_summary(cfg: DownloadConfig, n_rows: int, shard_ids: list[int], finished: list[int],
                 counts: OutputCounts, validation: ValidationStats, timings: dict | None) -> dict:
    unfinished = [s for s in shard_ids if s not in set(finished)]
    return {
        "source": cfg.source,
        "split": cfg.split,
        "rows_in": n_rows,
        "shard_size": cfg.shard_size,
        "shards": {"total": len(shard_ids), "finished": len(finished), "unfinished": unfinished},
        "rows_in_finished_shards": counts.rows,
        "downloaded": counts.downloaded,
        "failed": sum(counts.failed_by_status.values()),
        "failed_by_status": dict(counts.failed_by_status.most_common()),
        "failure_reasons": dict(counts.failure_reasons.most_common(20)),
        "invalid": counts.invalid,
        "valid": counts.downloaded - counts.invalid,
        "full_metadata_rows": counts.metadata_rows,
        "validation": validation.as_dict(),
        "seconds": timings or {},
        "files": {"urls": URLS_FILE, "images": f"{IMAGES_DIR}/", "full_metadata": FULL_METADATA_FILE,
                  "metadata_csv": METADATA_CSV, "invalid_images": INVALID_FILE, "validation": f"{VALIDATION_DIR}/"},
    }


def print_summary(out: Path, summary: dict) -> None:
    lines = [
        f"Download summary ({out})",
        f"  rows in source:      {summary['rows_in']} "
        f"in {summary['shards']['total']} shard(s) of {summary['shard_size']}",
        f"  downloaded:          {summary['downloaded']}",
        f"  failed to download:  {summary['failed']}",
    ]
    lines += [f"      {n:>8}  {reason}" for reason, n in list(summary["failure_reasons"].items())[:10]]
    lines += [
        f"  invalid (saved but undecodable): {summary['invalid']}  -> {out / INVALID_FILE}",
        f"  valid images:        {summary['valid']}  -> {out / FULL_METADATA_FILE}, {out / METADATA_CSV}",
        f"  images:              {out / IMAGES_DIR}",
    ]
    unfinished = summary["shards"]["unfinished"]
    if unfinished:
        lines.append(f"  UNFINISHED shards:   {len(unfinished)} ({', '.join(map(shard_name, unfinished[:10]))}"
                     f"{', ...' if len(unfinished) > 10 else ''}); rerun the same command to retry them")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------- entry

def download_dataset(cfg: DownloadConfig) -> dict:
    """The whole stage; returns the summary (also written to download_summary.json)."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    check_distributor(cfg.distributor)
    source = load_source(cfg.source, cfg.split, cfg.max_rows)
    if source.num_rows == 0:
        raise UsageError(f"--source {cfg.source} has no rows")
    urls = url_table(source)
    del source
    out.mkdir(parents=True, exist_ok=True)
    write_urls(out, urls, cfg.shard_size)
    shard_ids = expected_shards(urls.num_rows, cfg.shard_size)

    t1 = time.perf_counter()
    if set(shard_ids) <= set(_finished_stats(out / IMAGES_DIR)):
        logger.info("all %d shard(s) already downloaded; img2dataset has nothing to do", len(shard_ids))
    else:
        run_img2dataset(out, urls, cfg)
    t2 = time.perf_counter()

    wanted = set(shard_ids)
    finished_stats = {s: st for s, st in _finished_stats(out / IMAGES_DIR).items() if s in wanted}
    validation = validate_shards(out, finished_stats, cfg.validate_workers)
    t3 = time.perf_counter()
    counts = build_outputs(out, sorted(finished_stats))
    timings = {"img2dataset": round(t2 - t1, 3), "validation": round(t3 - t2, 3),
               "total": round(time.perf_counter() - t0, 3)}
    summary = make_summary(cfg, urls.num_rows, shard_ids, sorted(finished_stats), counts, validation, timings)
    write_json_atomic(summary, out / SUMMARY_FILE)
    return summary


def run_download(cfg: DownloadConfig) -> int:
    """Run the stage, print the summary; the exit code says whether every shard finished."""
    summary = download_dataset(cfg)
    print_summary(Path(cfg.output), summary)
    if summary["shards"]["unfinished"]:
        logger.error("%d shard(s) did not finish; rerun to retry them", len(summary["shards"]["unfinished"]))
        return EXIT_ITEMS_FAILED
    return EXIT_OK
