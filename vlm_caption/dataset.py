"""Choosing the work: which rows of the metadata this worker captions, and where their images are (image_paths.py).

The metadata is streamed: a first pass reads only keys (and shard) to decide what this worker does,
a second pass yields the chosen rows a batch at a time. Only keys are ever held for the whole data set.
"""
from __future__ import annotations

import json
import logging
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Collection, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from .data_layout import (FULL_METADATA_FILE, IMAGES_DIR, SHARD_NAMES, SHARD_SIZE_META, URLS_FILE,
                          VALIDATION_DIR, expected_shards, shard_name, stats_file)
from .download_source import URL_COLUMNS, travels_as_text
from .errors import UsageError, brief
from .flag_checks import check_shards, parse_shards
from .image_match import ImageMatch
from .image_paths import ShardFolders, images_by_key, resolve_image_path, row_shard, shard_of
from .images import IMAGE_SUFFIXES, ImageLoadError, load_image, to_rgb  # noqa: F401  (dataset.* names)
from .schema import COLUMNS, IMAGE_PATH, LOOKUP_COLUMNS, Column, carried, keep_columns

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- metadata


def metadata_files(data_dir: Path) -> list[tuple[Path, str | None]]:
    """(parquet, shard name or None) to read: full_metadata.parquet, else every finished shard parquet."""
    full = data_dir / FULL_METADATA_FILE
    if full.is_file():
        return [(full, None)]
    shards = shard_parquets(data_dir)
    if not shards:
        raise UsageError(f"{data_dir} has no full_metadata.parquet and no images/NNNNN.parquet")
    return [(p, p.stem) for p in shards if p.stem not in unfinished_shards(data_dir)]


def shard_parquets(data_dir: Path) -> list[Path]:
    """images/NNNNN.parquet; a copy set beside them by hand (00000 (1).parquet) is no shard: int() of its name
    raised a traceback, or it was an unfinished download forever (exit 3)."""
    return sorted(p for p in (data_dir / IMAGES_DIR).glob("[0-9]*.parquet") if re.fullmatch("[0-9]+", p.stem))


def metadata_schema(data_dir: Path) -> pa.Schema:
    """The columns of the data dir's metadata and their types, unified over every shard parquet read (the first
    may hold only nulls in a column the next one fills; null everywhere reads as text). The source's further
    columns take urls.parquet's types where it has them, as full_metadata.parquet does: the finished shards of a
    download under way show a part of the data only. An unreadable shard is left out here: the captioning run
    reports it (exit 3); only when none can be read is it a usage error."""
    files = metadata_files(data_dir)
    schemas = []
    for path, shard in files:
        try:
            schemas.append(open_metadata(path).schema_arrow)
        except UsageError:
            if shard is None or path == files[-1][0] and not schemas:
                raise
    if not schemas:  # every shard is unfinished
        raise UsageError(f"{data_dir} holds no finished shard yet: wait for download_data.py to finish one (or "
                         "rerun it, if it stopped)")
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise UsageError(f"the metadata files of {data_dir} disagree on a column's type: {e}") from None
    source = source_types(data_dir) if files[0][1] is not None else {}
    for i, f in enumerate(schema):
        kind = source.get(f.name, f.type)  # null in every row of the source too: text, as from full_metadata.parquet
        schema = schema.set(i, f.with_type(pa.string() if pa.types.is_null(kind) else kind))
    return schema


def source_types(data_dir: Path) -> dict[str, pa.DataType]:
    """The source's further columns in urls.parquet and their types ({} for a data dir without one). A column
    all null in the shards finished so far was typed text, a relaunch after the next shard typed it int64: the
    run's parts, and its Hub files, disagreed (the merge raised; load_dataset read numbers as text). Dates and
    decimals are left to the shards: they travel through img2dataset as text."""
    try:
        schema = pq.read_schema(data_dir / URLS_FILE)
    except (OSError, pa.ArrowException):
        return {}
    return {f.name: f.type for f in schema if f.name not in URL_COLUMNS and not travels_as_text(f.type)}


def metadata_names(data_dir: Path) -> list[str]:
    return list(metadata_schema(data_dir).names)


def extra_columns(data_dir: Path, names: Sequence[str]) -> list[Column]:
    """--keep-columns as registry columns typed from the metadata; an unknown name is a usage error now."""
    return keep_columns(names, metadata_schema(data_dir)) if names else []


def unfinished_shards(data_dir: Path) -> list[str]:
    """Shards img2dataset has not finished (no NNNNN_stats.json): their parquet may be half written."""
    if (data_dir / FULL_METADATA_FILE).is_file():
        return []
    images = data_dir / IMAGES_DIR
    started = [p.stem for p in shard_parquets(data_dir) if not (images / stats_file(p.stem)).is_file()]
    return sorted({*started, *_not_started_shards(data_dir)})


def _not_started_shards(data_dir: Path) -> list[str]:
    """Shards urls.parquet calls for that have no parquet yet (a download stopped before it reached them):
    without them a partial download would look like a whole, smaller one."""
    try:
        meta = pq.read_metadata(data_dir / URLS_FILE)
        shard_size = int((meta.metadata or {}).get(SHARD_SIZE_META, b""))
    except (OSError, ValueError, pa.ArrowException):  # no urls.parquet (a hand-made data dir), or no shard size
        return []
    names = [shard_name(s) for s in expected_shards(meta.num_rows, shard_size)]
    return [n for n in names if not (data_dir / IMAGES_DIR / f"{n}.parquet").exists()]


def open_metadata(path: Path) -> pq.ParquetFile:
    """A metadata parquet, or one line saying why it cannot be read."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read metadata {path}: {brief(str(e))}") from None


def _iter_batches(files: list[tuple[Path, str | None]], columns: list[str], skip_unreadable: bool,
                  skipped: list[tuple[str, str | None]] | None = None,
                  ) -> Iterator[tuple[pa.RecordBatch, str | None, Path]]:
    """Record batches of successful rows; an unreadable shard is logged, added to `skipped` and skipped (or
    raised). A footer that opens does not mean its row groups read (a corrupt page fails in iter_batches)."""
    for path, shard in files:
        try:
            pf = open_metadata(path)
            names = set(pf.schema_arrow.names)
            if "key" not in names:
                raise UsageError(f"metadata {path} has no 'key' column")
            for batch in pf.iter_batches(batch_size=4096, columns=[c for c in columns if c in names]):
                if "status" in batch.schema.names:
                    batch = batch.filter(pc.equal(batch.column("status"), "success"))
                yield batch, shard, path
        except (UsageError, OSError, pa.ArrowException) as e:
            if not skip_unreadable:
                raise UsageError(f"cannot read metadata {path}: {brief(str(e))}") from None
            log.error("skipping unreadable shard metadata %s (its images are not captioned): %s", path, e)
            if skipped is not None:
                skipped.append((str(path), shard))


def worker_of(key: str, num_workers: int) -> int:
    """Stable partition of keys: the same key goes to the same worker on every machine and rerun."""
    return zlib.crc32(key.encode()) % num_workers


@dataclass
class WorkPlan:
    selected: int  # keys in the selection (shards, max-images) for all workers
    mine: int  # keys of this worker's slice
    done: int  # of mine, already captioned (here or, when pushing, on the Hub)
    failed: int  # of mine, recorded as failed and not retried
    todo_keys: set[str]
    duplicate_keys: int  # keys seen more than once in the input (the first one is used)
    unreadable_shards: list[str]
    keyless: list[str] = field(default_factory=list)  # this worker's rows with a null/empty key, not yet recorded
    failed_keys: set[str] = field(default_factory=set)  # of mine, recorded as failed and not retried
    failed_retryable: int = 0  # of those, failures worth retrying (generation errors): set by the pipeline
    done_hub_only: int = 0  # of done, keys done only on the Hub (not in this dir)
    data_keys: set[str] = field(default_factory=set)  # every key of the data dir, whatever the selection
    shards: frozenset[int] | None = None  # --shards: iter_rows reads a key's row from these shards only

    @property
    def todo(self) -> int:
        return len(self.todo_keys)

    def rows(self, data_dir: Path, extra: Sequence[Column] = (), also: Sequence[str] = (),
             unread: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Pass 2 of this plan: its todo rows, each read from a selected shard (iter_rows)."""
        return iter_rows(data_dir, self.todo_keys, extra, also, unread, self.shards)


def keyless_name(path: Path, row: int) -> str:
    """A stable stand-in key for a metadata row without one, so its failure is recorded once."""
    return f"no-key:{path.name}:{row}"


def plan_work(data_dir: Path, *, shards: list[int] | None, max_images: int | None, worker: int,
              num_workers: int, done_keys: set[str], failed_keys: set[str],
              hub_only: set[str] = frozenset(), matches: Sequence[ImageMatch] = (),
              reads_images: bool = True) -> WorkPlan:
    """Pass 1: which keys this worker captions now. Selection is global (shards, then the first
    --max-images keys in key order), then split between workers, then minus done and failed keys.
    `hub_only`: the done keys published but not in this dir, counted in this worker's share only.
    `matches`: what was captioned (a checkpoint dir's parts, the Hub's files), each compared with the data dir's
    images (image_match.py; the caller checks them).
    `reads_images`: a key whose shard's images folder is missing as a whole waits (unreadable_shards), not
    planned to fail for good."""
    files = metadata_files(data_dir)
    seen: set[str] = set()
    data_keys: set[str] = set()
    keyless: list[str] = []
    duplicates = 0
    asked = set(shards) if shards is not None else None  # a set: `in` a list of 0-99999 per row took hours
    unreadable: list[tuple[str, str | None]] = []  # (what, shard name): only those --shards selects count
    for path, shard in files:
        try:
            open_metadata(path)
        except UsageError:
            if len(files) == 1:
                raise
            unreadable.append((str(path), shard))
    readable = [(p, s) for p, s in files if (str(p), s) not in unreadable]
    for shard in unfinished_shards(data_dir):
        if asked is None or int(shard) in asked:
            log.error("shard %s is not finished (no %s): rerun download_data.py; its images are skipped",
                      shard, stats_file(shard))
        unreadable.append((str(data_dir / IMAGES_DIR / f"{shard}.parquet") + " (unfinished download)", shard))
    rows_read: dict[Path, int] = {}
    shards_seen: set[int] = set()
    folders, folderless = ShardFolders(data_dir), {}  # key -> its shard, when the shard's folder is missing
    columns = ["key", "file_name", "status", *(["sha256"] if any(m.images for m in matches) else [])]
    for batch, shard, path in _iter_batches(readable, columns, skip_unreadable=len(files) > 1, skipped=unreadable):
        keys = batch.column("key").to_pylist()
        row_files = batch.column("file_name").to_pylist() if "file_name" in batch.schema.names else [None] * len(keys)
        images = batch.column("sha256").to_pylist() if "sha256" in batch.schema.names else [None] * len(keys)
        first_row = rows_read.get(path, 0)
        rows_read[path] = first_row + len(keys)
        for i, (key, row_file) in enumerate(zip(keys, row_files)):
            key = None if key is None or not str(key).strip() else str(key)
            if key is not None and key not in data_keys:  # (a key's first row: the one captioned)
                for match in matches:
                    match.see(key, images[i])
            if key is not None:
                data_keys.add(key)
            name = row_shard(row_file, shard, key or "")
            shards_seen.add(None if name is None else int(name))
            if asked is not None and (name is None or int(name) not in asked):
                continue
            if key is None:
                keyless.append(keyless_name(path, first_row + i))
                continue
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            if reads_images and folders.missing(name):
                folderless[key] = name
    # A selected shard that exists but cannot be read (yet) is retryable (exit 3), not "no such shard" (exit 2);
    # one outside the selection is not this run's concern (a Slurm task per shard while others download).
    unread = {int(s) for _, s in unreadable if s is not None}
    check_shards(shards, (shards_seen | unread) - {None})
    unreadable = [what for what, s in unreadable if asked is None or s is None or int(s) in asked]
    selection = sorted(seen)
    if max_images is not None:
        selection = selection[:max_images]
    mine = [k for k in selection if worker_of(k, num_workers) == worker]
    done = [k for k in mine if k in done_keys]
    failed = [k for k in mine if k in failed_keys and k not in done_keys]
    todo = set(mine) - done_keys - failed_keys
    # A shard folder missing as a whole (moved, deleted, a disk not mounted): each of its images would fail for
    # good. Its keys stay selected (--max-images takes the same ones) and done ones stay done; the rest wait.
    waiting = Counter(name for key, name in folderless.items() if key in todo)
    todo -= folderless.keys()
    for name, rows in sorted(waiting.items()):
        log.error("shard %s has no images folder %s (moved, deleted, or on a disk not mounted): %d of its rows "
                  "are left for a later run", name, data_dir / IMAGES_DIR / name, rows)
        unreadable.append(f"{IMAGES_DIR}/{name}/ (no images folder)")
    if duplicates:
        log.warning("%d rows repeat a key already seen in the metadata; only the first is captioned", duplicates)
    if keyless:
        log.error("%d metadata rows have no key (null or empty): recorded as failures, never captioned", len(keyless))
    keyless = [k for k in keyless if worker_of(k, num_workers) == worker]
    failed += [k for k in keyless if k in failed_keys]  # recorded before: counted as any failure (--strict)
    return WorkPlan(selected=len(selection), mine=len(mine), done=len(done), failed=len(failed),
                    todo_keys=todo, duplicate_keys=duplicates, unreadable_shards=unreadable,
                    keyless=[k for k in keyless if k not in failed_keys],
                    failed_keys=set(failed), done_hub_only=sum(1 for k in done if k in hub_only),
                    data_keys=data_keys, shards=frozenset(asked) if asked is not None else None)


def plan_run(cfg, *, worker: int = 0, num_workers: int = 1, done_keys: AbstractSet[str] = frozenset(),
             failed_keys: AbstractSet[str] = frozenset(), hub_only: set[str] = frozenset(),
             matches: Sequence[ImageMatch] = (), reads_images: bool = True) -> WorkPlan:
    """plan_work over a run's selection (`cfg`'s --data-dir, --shards, --max-images), then each of `matches`
    checked against the data dir's images: mostly other images is a UsageError, a few a warning. reads_images:
    False for a count of keys (--merge-only, --check-hub), which needs no image folder."""
    plan = plan_work(Path(cfg.data_dir), shards=parse_shards(cfg.shards), max_images=cfg.max_images,
                     worker=worker, num_workers=num_workers, done_keys=done_keys, failed_keys=failed_keys,
                     hub_only=hub_only, matches=matches, reads_images=reads_images)
    for match in matches:
        match.check(f"--data-dir {cfg.data_dir}")
    return plan


def iter_rows(data_dir: Path, todo_keys: set[str], extra: Sequence[Column] = (),
              also: Sequence[str] = (), unread: list[str] | None = None,
              shards: Collection[int] | None = None) -> Iterator[dict[str, Any]]:
    """Pass 2: the metadata rows of `todo_keys`, in metadata order, each once, with `image_path`; the output
    registry's carried columns plus `extra` (--keep-columns), plus the metadata columns `also` under their own
    names (a prompt template needs them; they are not written). Keys not found again (a shard that became
    unreadable, or whose other columns do not read) are said in `unread`: retryable, never skipped silently.
    `shards` (the plan's --shards): a key also in an unselected shard is read from the selected one, as planned."""
    wanted = set(todo_keys)
    images_by_key.cache_clear()  # each pass lists the shard folders afresh
    names = carried(extra)
    types = {c.name: c.type for c in (*COLUMNS, *extra)}
    read = list(dict.fromkeys([*names, *LOOKUP_COLUMNS, *also]))
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    for batch, shard, _ in _iter_batches(metadata_files(data_dir), read, skip_unreadable=True):
        for row in batch.to_pylist():
            key = str(row["key"])  # a null key becomes "None", which is never wanted
            if key not in wanted or shards is not None and shard_of(row.get("file_name"), shard, key) not in shards:
                continue
            wanted.discard(key)
            for name, in_shard in SHARD_NAMES.items():  # md5 is reserved in img2dataset: source_md5 there
                if row.get(name) is None:
                    row[name] = row.get(in_shard)
            if shard is not None and row.get("width") is None:  # img2dataset's parquet: sizes in decode_checks/
                if shard not in sizes:
                    sizes[shard] = measured_sizes(data_dir, shard)
                w, h = sizes[shard].get(key, (None, None))
                row.update(width=w, height=h, original_width=w, original_height=h)  # saved as downloaded
            out = clean_row({dst: row.get(src) for src, dst in names.items()}, types)
            out["key"] = key
            for name in also:
                out.setdefault(name, row.get(name))
            out[IMAGE_PATH] = resolve_image_path(data_dir, key, row.get("file_name"), shard)
            yield out
    if wanted and unread is not None:
        unread.append(f"{len(wanted)} selected rows not read again from the metadata (e.g. key {min(wanted)})")


def measured_sizes(data_dir: Path, shard: str) -> dict[str, tuple[int, int]]:
    """key -> (width, height) PIL measured when the download validated the shard ({} when it has not)."""
    path = data_dir / VALIDATION_DIR / f"{shard}.parquet"
    try:
        table = pq.read_table(path, columns=["key", "width", "height"])
    except (OSError, pa.ArrowException):
        return {}
    return {k: (w, h) for k, w, h in zip(*(table.column(c).to_pylist() for c in ("key", "width", "height")))}


def clean_row(row: dict[str, Any], types: dict[str, pa.DataType]) -> dict[str, Any]:
    """Metadata as the output schema wants it: text as valid UTF-8 (bad bytes replaced, not dropped),
    integers as integers (img2dataset's int32 comes back as float with NaN through pandas); a binary column
    (--keep-columns) stays bytes, its bytes were replaced by U+FFFD."""
    for name, value in row.items():
        kind = types.get(name, pa.string())
        if pa.types.is_integer(kind):
            row[name] = None if value is None or value != value else int(value)
        elif isinstance(value, (bytes, bytearray)) and kind not in (pa.binary(), pa.large_binary()):
            row[name] = bytes(value).decode("utf-8", errors="replace")
        elif pa.types.is_string(kind) and value is not None and not isinstance(value, str):
            row[name] = _as_text(value)
    return row


def _as_text(value: Any) -> str:
    """A value of a text column that is not text (a data dir made by hand): a list's items comma-separated, as
    download_data.py writes list tags (Python's "['ink', 'wash']" went into the prompt and the output), a struct
    or map as JSON."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_as_text(item) for item in value if item is not None)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)
