"""Download stage: source table -> urls.parquet -> img2dataset -> validate -> summary.

The decode checks and the metadata files they feed (invalid_images.parquet, full_metadata.parquet,
metadata.csv) are validate.py's; the directory layout is in data_layout.py.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import locks, store
from .atomic import atomic_write_json, atomic_write_table, remove_stale_tmp
from .cli import plural
from .config import DownloadConfig
from .data_layout import (DOWNLOAD_LOCK, ENCODE_FORMAT, FULL_METADATA_FILE, IMAGES_DIR, METADATA_CSV,
                          OOM_SHARD_COUNT, SAVED_COLUMNS, SHARD_SIZE_META, STATS_SUFFIX, SUMMARY_FILE, URLS_FILE,
                          VALIDATION_DIR, WORKERS_LOCK, expected_shards, shard_name, stats_file)
from .download_space import low_space, out_of_space
from .download_source import (URL_COLUMNS, further_names, img2dataset_input, load_source,  # noqa: F401  (dl.* names)
                              nan_as_null, url_table)
from .download_summary import make_summary, print_summary, stats_files
from .download_workers import SPAWNED_TMPDIR, ErrorLogs, defer_unused_imports, spawned_tmpdir, torch_kept_out
from .errors import EXIT_ITEMS_FAILED, EXIT_OK, FatalError, UsageError, brief
from .interrupts import Interrupted, StopSignals
from .validate import build_outputs, validate_shards

logger = logging.getLogger(__name__)

IMG2DATASET_INPUT = "_img2dataset_input.parquet"  # urls.parquet with md5 renamed; removed after the run
IMG2DATASET_TMP = "_tmp"  # img2dataset's own temp dir under images/ (its input cut into shards)
QUIET_TRACKER = "ignore:resource_tracker:UserWarning"  # a -W option of the processes multiprocessing starts

# What img2dataset 1.47 writes to images/NNNNN.parquet for our input (checked by tests/test_sample_data.py).
SHARD_SCHEMA = pa.schema(
    [(c, pa.string()) for c in SAVED_COLUMNS]
    + [("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
       ("error_message", pa.string())]
    + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    + [("exif", pa.string()), ("sha256", pa.string())]
)


def write_urls(out: Path, urls: pa.Table, shard_size: int) -> None:
    """Write urls.parquet, refusing to mix with a download of other rows or another shard size.

    img2dataset resumes by shard number alone, so a rerun over a different row list or shard size would
    silently keep old shards that now mean other rows.
    """
    path = out / URLS_FILE
    if path.is_file() and _finished_stats(out / IMAGES_DIR):
        try:
            old = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:  # without it, which rows the finished shards hold is unknown
            raise UsageError(f"--output {out}: {URLS_FILE} cannot be read ({brief(str(e))}); it says which rows the "
                             "finished shards hold: restore it, or use a new --output") from None
        old_size = (old.schema.metadata or {}).get(SHARD_SIZE_META, b"?").decode()
        same_urls = old.column("url").equals(urls.column("url"))
        if old_size != str(shard_size) or not same_urls:
            raise UsageError(
                f"--output {out} already holds a download of other rows or another shard size "
                f"({old.num_rows} rows, shard size {old_size}; now {urls.num_rows} rows, shard size {shard_size}); "
                "rerun with the same --source/--max-rows/--shard-size or use a new --output"
            )
        old, new = old.replace_schema_metadata(None), urls.replace_schema_metadata(None)
        if old.schema.names == new.schema.names and not old.schema.equals(new.schema):
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                old = old.cast(new.schema)  # parquet keeps date64 as date32, timestamp[s] as [ms]: same values
        old, new = nan_as_null(old), nan_as_null(new)
        if not old.equals(new):
            # The shards carry the metadata of the first run: keeping them would publish stale captions and tags.
            names = dict.fromkeys([*old.column_names, *new.column_names])
            differ = [c for c in names if c not in old.column_names or c not in new.column_names
                      or not old.column(c).equals(new.column(c))]
            raise UsageError(
                f"--output {out} already holds a download of the same URLs with other metadata ({', '.join(differ)} "
                "differ): its shards would keep the old values; download into a new --output"
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


def run_img2dataset(out: Path, urls: pa.Table, cfg: DownloadConfig) -> str | None:
    """Download every unfinished shard with img2dataset's Python API (incremental: done shards are skipped).
    Returns the line naming the logs of its workers' tracebacks (download_workers.py), or None if none."""
    if threading.current_thread() is not threading.main_thread():
        raise FatalError("img2dataset must run in the main thread (it installs a signal handler)")
    input_path = out / IMG2DATASET_INPUT
    atomic_write_table(input_path, img2dataset_input(urls))
    # Set before the import: albumentations (imported by img2dataset) checks an index for updates otherwise.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    defer_unused_imports()
    with torch_kept_out():
        from img2dataset import download

        from .download_client import bounded_downloads

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

    # The workers img2dataset's pool terminates on a stop (Ctrl-C, SIGTERM) never release the locks they made; the
    # resource tracker, started with this process's -W options, removes them and warned about "leaked semaphore
    # objects" under the one line that says the run was interrupted. Nothing of the download's is lost there.
    if QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(QUIET_TRACKER)
    errors = ErrorLogs(out)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with spawned_tmpdir(out, cfg.distributor), \
                bounded_downloads(cfg.max_image_mb << 20, cfg.distributor, errors.workers, str(out / WORKERS_LOCK)):
            download(
                url_list=str(input_path),
                output_folder=str(out / IMAGES_DIR),
                input_format="parquet",
                output_format="files",
                url_col="url",
                caption_col="caption",
                save_additional_columns=[*SAVED_COLUMNS, *further_names(urls)],
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
    return errors.note()


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
    shutil.rmtree(out / SPAWNED_TMPDIR, ignore_errors=True)
    (out / IMG2DATASET_INPUT).unlink(missing_ok=True)


def _finished_stats(images_dir: Path) -> dict[int, dict]:
    """img2dataset's finished shards: shard id -> its NNNNN_stats.json (written when the shard is done)."""
    done = {}
    for path in images_dir.glob(f"*{STATS_SUFFIX}"):
        prefix = path.name.split("_", 1)[0]
        if prefix.isdigit():
            try:
                done[int(prefix)] = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(done[int(prefix)], dict):
                    raise ValueError("not a JSON object")
            except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, unreadable
                # img2dataset writes it in place, after closing the shard parquet: a crash mid-write leaves
                # a complete shard with a broken stats file, which img2dataset itself counts as done.
                logger.warning("%s cannot be read (%s); treating shard %s as finished", path,
                               str(e).splitlines()[0] if str(e) else type(e).__name__, prefix)
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
    check_output_dir(out)
    try:
        lock = locks.hold_exclusive(out / DOWNLOAD_LOCK, f"--output {out}")
        try:
            check_no_workers_left(out)
            # SIGTERM as Ctrl-C in every phase (img2dataset's own handling takes over while it runs): the
            # validation pool is shut down on the way out instead of the process dying under it.
            with StopSignals():
                return _download_into(out, urls, cfg, t0)
        finally:
            os.close(lock)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        # Our files are written atomically (tmp + rename): nothing half written stays; finished shards are kept.
        where = f" ({e.filename})" if e.filename else ""
        raise FatalError(f"cannot write to --output {out}{where}: {e.strerror or e}; free space or fix "
                         "permissions and rerun the same command (finished shards are kept)") from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def check_no_workers_left(out: Path) -> None:
    """img2dataset's pool workers outlive a run killed alone (kill -9, the OOM killer; not its process group): by a
    second under download_data.py (download_workers.exit_with_parent), else until their shard is done. Each holds
    WORKERS_LOCK shared meanwhile (download_client.py): a rerun would write that shard's files at the same time."""
    fd = locks.open_lock(out / WORKERS_LOCK)
    try:
        if not locks.try_flock(fd, fcntl.LOCK_EX):
            raise UsageError(f"--output {out}: img2dataset processes of an earlier run that was killed are still "
                             f"writing shards into it; they stop within seconds, or after their shard: wait and "
                             f"rerun (`fuser -v {out / WORKERS_LOCK}` names them)")
    finally:
        os.close(fd)


def check_output_dir(out: Path) -> None:
    """--output is new, empty, or an earlier download (img2dataset and validation write into it freely)."""
    if out.is_dir() and not (out / URLS_FILE).is_file():
        # urls.parquet's tmp file too: a first run killed while writing it left it, and every rerun was refused
        others = sorted(p.name for p in out.iterdir() if p.name not in (DOWNLOAD_LOCK, WORKERS_LOCK, IMAGES_DIR)
                        and not p.name.startswith(f".{URLS_FILE}.tmp-"))
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UsageError(f"--output {out} holds other files ({shown}) and no urls.parquet: it is not a "
                             "download_data.py output; give a new or empty directory")


def set_aside_unreadable_shards(out: Path, n_rows: int, shard_size: int) -> None:
    """A finished shard whose parquet cannot be read (a crash or a second process mid-write), that lacks
    rows of its slice of urls.parquet, or whose saved images' folder is gone, goes to quarantine/ with its
    stats file, so img2dataset downloads it again (it redoes shards without stats). img2dataset catches an error
    writing a sample (disk full, file size limit), prints it, leaves the row out of the shard parquet and
    still marks the shard done: without this check those rows, metadata and all, would vanish from every
    count."""
    finished = _finished_stats(out / IMAGES_DIR)
    for link in (out / IMAGES_DIR).glob("[0-9]*.parquet"):  # of a shard to fetch: img2dataset wrote through it
        if link.is_symlink() and link.stem.isdigit() and int(link.stem) not in finished:
            store.quarantine(out, link, "a symlink", f"shard {link.stem} is written here by the download")
    for shard_id in sorted(finished):
        name = shard_name(shard_id)
        path = out / IMAGES_DIR / f"{name}.parquet"
        expected = max(0, min(shard_size, n_rows - shard_id * shard_size))
        try:
            rows = pq.read_metadata(path).num_rows
            problem = None if rows >= expected else (
                f"missing {expected - rows} of its {expected} rows (img2dataset could not write them: "
                "disk full? see its error above)")
            if problem is None and not (out / IMAGES_DIR / name).is_dir() and _saved_any(path):
                problem = f"its images folder {IMAGES_DIR}/{name}/ is gone"  # its rows would list missing files
        except (pa.ArrowInvalid, OSError) as e:
            problem = f"unreadable ({str(e).splitlines()[0]})"
        if problem is None:
            continue
        if os.path.lexists(path):  # a dangling symlink too: img2dataset wrote the shard again through it, outside
            store.quarantine(out, path, problem, f"shard {name} is downloaded again by a rerun")
        store.quarantine(out, out / IMAGES_DIR / stats_file(name), "the stats of a shard set aside",
                         "its shard counts as unfinished")


def _saved_any(shard_parquet: Path) -> bool:
    """Whether img2dataset saved an image of this shard (a shard whose URLs all failed has no folder)."""
    return pq.read_table(shard_parquet, columns=["status"])["status"].to_pylist().count("success") > 0


def _download_into(out: Path, urls: pa.Table, cfg: DownloadConfig, t0: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves its tmp files (full_metadata's: the size of the data set's metadata). Not
    # images/: img2dataset writes there in place, and a walk of its million files would cost minutes.
    remove_stale_tmp(out, recursive=False)
    remove_stale_tmp(out / VALIDATION_DIR)
    for name in (IMAGES_DIR, VALIDATION_DIR):  # img2dataset and mkdir would end in a traceback
        if (out / name).exists() and not (out / name).is_dir():
            raise UsageError(f"{out / name} is a file, not a directory: move it aside and rerun")
    write_urls(out, urls, cfg.shard_size)
    set_aside_unreadable_shards(out, urls.num_rows, cfg.shard_size)
    shard_ids = expected_shards(urls.num_rows, cfg.shard_size)

    t1 = time.perf_counter()
    if set(shard_ids) <= set(_finished_stats(out / IMAGES_DIR)):
        logger.info("%s already downloaded; img2dataset has nothing to do",
                    "the 1 shard" if len(shard_ids) == 1 else f"all {len(shard_ids)} shards")
        remove_img2dataset_leftovers(out)
    else:
        # full_metadata.parquet stands for a finished download: while shards change it would be read stale (a
        # kill now would leave it describing the old shards). The shards' own parquets serve meanwhile; it is
        # written anew at the end of this run.
        for name in (FULL_METADATA_FILE, METADATA_CSV):
            if (out / name).exists():
                logger.info("removing %s until the shards are done (it is rebuilt at the end)", name)
                (out / name).unlink()
        errors_note = run_img2dataset(out, urls, cfg)
        set_aside_unreadable_shards(out, urls.num_rows, cfg.shard_size)  # rows img2dataset failed to write
        left = [s for s in shard_ids if s not in _finished_stats(out / IMAGES_DIR)]
        if left and (why := out_of_space(out, left + shard_ids)):  # its "No space left on device" lines above
            raise FatalError(f"--output {out}: the disk is full ({why}); {plural(len(left), 'shard')} did not "
                             "finish: free space and rerun the same command (finished shards are kept)"
                             + (f"; {errors_note}" if errors_note else ""))
        if errors_note:
            logger.warning("%s", errors_note)
        if left and (low := low_space(out, left + shard_ids, cfg.shard_size)):  # unfinished for another reason
            logger.warning("--output %s is nearly full (%s): free space before the rerun, or it may fill the disk",
                           out, low)
    t2 = time.perf_counter()

    wanted = set(shard_ids)
    finished_stats = {s: st for s, st in _finished_stats(out / IMAGES_DIR).items() if s in wanted}
    validation = validate_shards(out, finished_stats, cfg.validate_workers)
    t3 = time.perf_counter()
    # full_metadata.parquet stands for a finished download: the captioner would read it as the whole data set and
    # skip the unfinished shards' rows without a word. Without it, it reads the shards and names them.
    counts = build_outputs(out, sorted(finished_stats), further=[urls.schema.field(c) for c in further_names(urls)],
                           metadata=len(finished_stats) == len(shard_ids))
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
            stats_files(Path(cfg.output), summary.get("shards_with_retryable", [])) or "the shard's NNNNN_stats.json")
        return EXIT_ITEMS_FAILED
    if nothing:
        return EXIT_ITEMS_FAILED
    if strict and permanent:
        logger.error("--strict: %s failed for good (HTTP 4xx, undecodable files, ...); see the reasons above",
                     plural(permanent, "row"))
        return EXIT_ITEMS_FAILED
    return EXIT_OK
