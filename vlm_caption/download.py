"""Download stage: source table -> urls.parquet -> img2dataset -> validate -> summary.

The decode checks and the metadata files they feed (invalid_images.parquet, full_metadata.parquet,
metadata.csv) are validate.py's; the directory layout is in data_layout.py.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .atomic import atomic_write_json, atomic_write_table
from .cli import plural
from .config import DownloadConfig
from .data_layout import (ENCODE_FORMAT, IMAGES_DIR, OOM_SHARD_COUNT, SAVED_COLUMNS, SHARD_NAMES, SUMMARY_FILE,
                          URLS_FILE, expected_shards)
from .download_summary import make_summary, print_summary, stats_files
from .errors import EXIT_ITEMS_FAILED, EXIT_OK, FatalError, UsageError
from .interrupts import Interrupted
from .validate import build_outputs, validate_shards

logger = logging.getLogger(__name__)

SOURCE_COLUMNS = ("key", "url", "caption", "md5", "tags", "merged_tags")
URL_COLUMNS = ("url", "caption", "original_key", "md5", "tags", "merged_tags")
IMG2DATASET_INPUT = "_img2dataset_input.parquet"  # urls.parquet with md5 renamed; removed after the run
IMG2DATASET_TMP = "_tmp"  # img2dataset's own temp dir under images/ (its input cut into shards)
SHARD_SIZE_META = b"vlm_caption.shard_size"

# What img2dataset 1.47 writes to images/NNNNN.parquet for our input (checked by tests/test_sample_data.py).
SHARD_SCHEMA = pa.schema(
    [(c, pa.string()) for c in SAVED_COLUMNS]
    + [("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
       ("error_message", pa.string())]
    + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    + [("exif", pa.string()), ("sha256", pa.string())]
)


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
    elif path.is_file():  # a local file load_dataset would take for a Hub id
        raise UsageError(f"--source {source}: give a .parquet, .csv, .jsonl or .json file, a local dataset "
                         "directory, or a Hub dataset id")
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
    counts = pc.value_counts(source.column("key"))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):  # every row is still downloaded (as its own key); original_key just does not tell them apart
        logger.warning("source keys on more than one row: %d (e.g. %s); each row is downloaded as a row of its own",
                       len(repeated), ", ".join(map(str, repeated.field("values")[:3].to_pylist())))
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
    atomic_write_table(path, urls.replace_schema_metadata({SHARD_SIZE_META: str(shard_size).encode()}))


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
    atomic_write_table(input_path,
                       urls.rename_columns([SHARD_NAMES.get(c, c) for c in urls.column_names]))
    # Set before the import: albumentations (imported by img2dataset) checks an index for updates otherwise.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    previous = signal.getsignal(signal.SIGINT)
    terms: list[int] = []

    def on_sigterm(signum, frame):
        # img2dataset handles SIGINT only: its handler removes its _tmp dir, stops its logger process and
        # exits, and leaving its process pool terminates the workers. SIGTERM (Slurm, kill) takes the same
        # way out; Python's default would end this process alone and orphan the pool and the logger.
        terms.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not previous:
            handler(signal.SIGINT, frame)
        raise Interrupted(signum)

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
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
        raise Interrupted(terms[0] if terms else signal.SIGINT) from e
    finally:
        # Its handler is never restored by img2dataset and would turn a later Ctrl-C into exit code 0.
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        input_path.unlink(missing_ok=True)


def remove_img2dataset_leftovers(out: Path) -> None:
    """Delete what an img2dataset run killed after its last shard's stats file, before it returned, left.

    img2dataset removes its _tmp dir (its input cut into shards) only when it returns, and run_img2dataset
    removes the input copy after that. A rerun that still has shards to do reuses and removes both; once
    every shard is done no run calls img2dataset again, so they would stay forever.
    """
    tmp_dir = out / IMAGES_DIR / IMG2DATASET_TMP
    if tmp_dir.is_dir():
        logger.info("removing %s, left by an interrupted img2dataset run", tmp_dir)
        shutil.rmtree(tmp_dir)
    (out / IMG2DATASET_INPUT).unlink(missing_ok=True)


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
        logger.info("%s already downloaded; img2dataset has nothing to do",
                    "the 1 shard" if len(shard_ids) == 1 else f"all {len(shard_ids)} shards")
        remove_img2dataset_leftovers(out)
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
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def run_download(cfg: DownloadConfig, strict: bool = False) -> int:
    """Run the stage, print the summary (always) and return the exit code (README: "Exit codes").

    3 when nothing usable was downloaded, when a shard is unfinished or a download failed in a way worth
    retrying (is_retryable), and with strict when anything failed at all; otherwise 0: every row is a valid
    image or a permanent failure (404, undecodable file, ...) recorded with its reason.
    """
    summary = download_dataset(cfg)
    print_summary(Path(cfg.output), summary)
    unfinished = summary["shards"]["unfinished"]
    retryable = summary.get("failed_retryable", 0)
    permanent = summary["failed"] - retryable + summary["invalid"]
    nothing = summary["valid"] == 0
    if nothing:
        logger.error("nothing usable was downloaded: none of the %s gave a decodable image (reasons above, "
                     "and in %s)", plural(summary["rows_in"], "source row"), SUMMARY_FILE)
    if unfinished:
        logger.error("%s did not finish; rerun the same command to retry %s", plural(len(unfinished), "shard"),
                     "it" if len(unfinished) == 1 else "them")
        return EXIT_ITEMS_FAILED
    if retryable:  # also after a network outage for the whole run: say how to try again
        logger.error(
            "%s failed in a way worth retrying (timeouts, HTTP 408/429/5xx, connection errors). A rerun skips "
            "finished shards: to retry, delete %s and rerun the same command (the whole shard is fetched "
            "again)", plural(retryable, "download"),
            stats_files(summary.get("shards_with_retryable", [])) or "the shard's NNNNN_stats.json")
        return EXIT_ITEMS_FAILED
    if nothing:
        return EXIT_ITEMS_FAILED
    if strict and permanent:
        logger.error("--strict: %s failed for good (HTTP 4xx, undecodable files, ...); see the reasons above",
                     plural(permanent, "row"))
        return EXIT_ITEMS_FAILED
    return EXIT_OK

