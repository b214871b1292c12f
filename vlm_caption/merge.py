"""Merging the parts of one or more checkpoint dirs into one parquet sorted by key, one row per key."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import FatalError, UsageError, brief
from .rows import conform
from .schema import OUTPUT_SCHEMA, unified_schema
from .store import list_parts, read_run_json_safe, usable_file

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    rows: int
    parts: int
    duplicate_keys: list[str]
    keys: set[str]  # every captioned key kept (callers count failures against it without reading the parts again)
    output: Path | None  # (None: counted only)
    not_in_data: list[str] = field(default_factory=list)  # captioned keys the data dir no longer holds (left out)


def _part_ranges(dirs: list[Path]) -> tuple[list[tuple[Path, str, str]], Counter]:
    ranges, counts = [], Counter()
    for d in dirs:
        run_id = (read_run_json_safe(d)[0] or {}).get("run_id")  # a part of another run is not merged (set aside)
        for part in list_parts(d):
            check = usable_file(d, part, OUTPUT_SCHEMA, run_id)
            if check is not None and check.keys:
                ranges.append((part.path, min(check.keys), max(check.keys)))
                counts.update(check.keys)
    return ranges, counts


def merge_parts(dirs: list[Path | str], output: Path | str | None, data_keys: set[str] | None = None,
                bucket_rows: int = 50_000) -> MergeReport:
    """Merge every part of `dirs` into one parquet sorted by key, one row per key; keys not in `data_keys`
    (a shard removed from the data since) are reported and left out, their parts kept. output None: the report
    only (a dir in use: its last worker writes the merge).

    Streams: only the key column of all parts is held at once; rows are read a key range at a time
    (parts hold nearly contiguous key ranges, so each part is read about once).
    """
    dirs, output = [Path(d) for d in dirs], Path(output) if output is not None else None
    ranges, counts = _part_ranges(dirs)
    duplicates = sorted(k for k, n in counts.items() if n > 1)
    gone = sorted(k for k in counts if data_keys is not None and k not in data_keys)
    keys = sorted(set(counts) - set(gone))
    schema = parts_schema([path for path, _, _ in ranges])  # + --keep-columns, prompt columns
    if output is not None:
        _write_merge(output, ranges, keys, gone, schema, bucket_rows)
    if duplicates:
        log.warning("%d keys were captioned more than once; kept the first of each (e.g. %s)",
                    len(duplicates), duplicates[:5])
    if gone:
        log.warning("%d captioned keys are no longer in the data dir (a shard removed?); left out of %s, their "
                    "parts kept (e.g. %s)", len(gone), output.name if output else "the count", gone[:5])
    return MergeReport(rows=len(keys), parts=len(ranges), duplicate_keys=duplicates, keys=set(keys),
                       output=output, not_in_data=gone)


def _write_merge(output: Path, ranges: list, keys: list[str], gone: list[str], schema: pa.Schema,
                 bucket_rows: int) -> None:
    try:
        with atomic_path(output) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for start in range(0, len(keys), bucket_rows):
                lo, hi = keys[start], keys[min(start + bucket_rows, len(keys)) - 1]
                tables = [conform(_rows_between(path, lo, hi, whole=lo <= pmin and pmax <= hi), schema)
                          for path, pmin, pmax in ranges if pmin <= hi and pmax >= lo]
                bucket = pa.concat_tables(tables).sort_by("key")
                if gone:
                    bucket = bucket.filter(pc.is_in(bucket.column("key"), pa.array(keys[start:start + bucket_rows])))
                writer.write_table(_first_per_key(bucket))
    except OSError as e:  # a full disk at the end of a run: one line, the parts are whole (exit 1, not a traceback)
        raise FatalError(f"could not write {output}: {brief(str(e))}; every caption is kept in the parts: free "
                         "space and rerun (or --merge-only)") from None


def _rows_between(path: Path, lo: str, hi: str, whole: bool) -> pa.Table:
    """The rows of a part with keys in [lo, hi] (`whole`: all of them). A part is a checkpoint's few hundred rows:
    read whole and filtered in memory, faster than read_table's filters, which build a dataset per file."""
    table = pq.ParquetFile(path).read()
    if whole:
        return table
    keys = table.column("key")
    return table.filter(pc.and_(pc.greater_equal(keys, lo), pc.less_equal(keys, hi)))


def parts_schema(paths: Sequence[Path], tables: Sequence[pa.Table] | None = None) -> pa.Schema:
    """The schema rows of `paths` merge into (schema.unified_schema). A --keep-columns column typed differently
    by some parts (before urls.parquet typed them, one all null in the first shards was text, later int64) takes
    the type of the parts holding values in it, int and float widen to float64 where no value changes; any other
    disagreement is a one-line UsageError naming the column, both types and a file of each. `tables`: the parts
    already read, one per path (a Hub push holds them): their schemas and columns serve, no file is read again."""
    if tables is not None and len(tables) != len(paths):
        raise ValueError(f"parts_schema: {len(tables)} tables for {len(paths)} paths")

    def column(i: int, name: str) -> pa.ChunkedArray:
        return tables[i].column(name) if tables is not None else pq.read_table(paths[i], columns=[name]).column(name)

    schemas = ([t.schema.remove_metadata() for t in tables] if tables is not None
               else [pq.read_schema(p).remove_metadata() for p in paths])
    kinds: dict[str, dict[pa.DataType, Path]] = {}  # column -> its types -> the first part of each
    for path, s in zip(paths, schemas):
        for f in s:
            kinds.setdefault(f.name, {}).setdefault(f.type, path)
    mixed = [name for name, types in kinds.items() if len(types) > 1]
    empty = {(i, name) for name in mixed for i, p in enumerate(paths)  # all null in that part: says no type
             if name in schemas[i].names and _all_null(column(i, name))}
    for name in mixed:
        holders = [i for i, s in enumerate(schemas) if name in s.names]
        typed = [i for i in holders if (i, name) not in empty] or holders[-1:]  # null everywhere: the last's type
        for i in set(holders) - set(typed):
            schemas[i] = schemas[i].set(schemas[i].get_field_index(name), pa.field(name, pa.null()))
        kinds[name] = {}
        for i in typed:
            kinds[name].setdefault(schemas[i].field(name).type, paths[i])
    for name in mixed:  # the first pair of types that do not unify, named
        seen: dict[pa.DataType, Path] = {}
        for kind, path in kinds[name].items():
            for other, where in seen.items():
                try:
                    pa.unify_schemas([pa.schema([(name, other)]), pa.schema([(name, kind)])],
                                     promote_options="permissive")
                except (pa.ArrowTypeError, pa.ArrowInvalid):
                    raise _disagree(name, other, where, kind, path, "they do not unify") from None
            seen[kind] = path
    schema = unified_schema(schemas)
    for name in mixed:  # int64 parts of values >= 0 (before uint64 was kept) and uint64 parts: uint64, 2**63 fits
        if set(kinds[name]) == {pa.int64(), pa.uint64()} and all(
                (pc.min(column(i, name)).as_py() or 0) >= 0 for i, s in enumerate(schemas)
                if name in s.names and s.field(name).type == pa.int64()):
            schema = schema.set(schema.get_field_index(name), schema.field(name).with_type(pa.uint64()))
    for name in mixed:  # int64 -> float64 only where no value changes (2**53 + 1 would)
        want = schema.field(name).type
        for i, path in enumerate(paths):
            if name in schemas[i].names and schemas[i].field(name).type not in (want, pa.null()):
                try:
                    column(i, name).cast(want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    kind = schemas[i].field(name).type
                    other = want if want in kinds[name] else next(k for k in kinds[name] if k != kind)
                    raise _disagree(name, kind, path, other, kinds[name][other],
                                    f"as {want} a value would change: {brief(str(e), 100)}") from None
    return schema


def _all_null(column: pa.ChunkedArray) -> bool:
    return column.null_count == len(column)


def _disagree(name: str, kind: pa.DataType, path: Path, other: pa.DataType, where: Path, why: str) -> UsageError:
    return UsageError(f"the parts disagree on column {name}'s type: {kind} in {path}, {other} in {where} ({why}); "
                      "set aside the parts of one type (their keys are captioned again) and rerun")


def _first_per_key(table: pa.Table) -> pa.Table:
    keys = table.column("key").to_pylist()
    keep = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return table if len(keep) == len(keys) else table.take(keep)
