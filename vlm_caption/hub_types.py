"""One type per column across a run's Hub files.

Before urls.parquet typed --keep-columns, a column all null in the first shards was pushed as text and later as
int64: the run's Hub files disagree, and `datasets.load_dataset` of the repo casts every file to the first one's
types (int64 values became text, or the load failed with a cast error), while each push of a dir whose parts still
disagree could add a file of either type. A push takes the type the Hub's files already give a column where no
value changes (merge.parts_schema's rules: a column all null takes any type, int widens to float64 where exact);
--check-hub names a column whose files disagree. Hub files are never rewritten here.
"""
from __future__ import annotations

import logging

import pyarrow as pa

from .hub_key_cache import FileEntry

log = logging.getLogger(__name__)


def file_types(entries: dict[str, FileEntry]) -> dict[str, dict[pa.DataType, list[str]]]:
    """column -> its type -> the files typing it so; files where it is all null are listed under pa.null()
    (they say no type)."""
    kinds: dict[str, dict[pa.DataType, list[str]]] = {}
    for path, entry in sorted(entries.items()):
        for f in entry.schema or []:
            kind = pa.null() if f.name in entry.null_columns else f.type
            kinds.setdefault(f.name, {}).setdefault(kind, []).append(path)
    return kinds


def hub_targets(entries: dict[str, FileEntry]) -> dict[str, tuple[pa.DataType, bool]]:
    """column -> (the type the Hub's files give it, whether any of them holds a value in it). Only columns of one
    type among the files holding values, or of one type in all files when none does."""
    declared: dict[str, set[pa.DataType]] = {}
    for entry in entries.values():
        for f in entry.schema or []:
            declared.setdefault(f.name, set()).add(f.type)
    targets = {}
    for name, kinds in file_types(entries).items():
        typed = [k for k in kinds if k != pa.null()]
        if len(typed) == 1:
            targets[name] = (typed[0], True)
        elif not typed and len(declared[name]) == 1:
            targets[name] = (next(iter(declared[name])), False)
    return targets


def align(table: pa.Table, targets: dict[str, tuple[pa.DataType, bool]], what: str) -> pa.Table:
    """`table` with each column cast to the Hub's type where no value changes; a column that cannot be is kept
    as it is, with a warning (the run's files then disagree: --check-hub names them)."""
    for i, f in enumerate(table.schema):
        if f.name not in targets or targets[f.name][0] == f.type:
            continue
        want, hub_has_values = targets[f.name]
        column = table.column(i)
        if column.null_count == len(column):
            table = table.set_column(i, pa.field(f.name, want, f.nullable, f.metadata), pa.nulls(len(column), want))
            continue
        try:
            wider = pa.unify_schemas([pa.schema([(f.name, want)]), pa.schema([(f.name, f.type)])],
                                     promote_options="permissive").field(f.name).type
            if not hub_has_values or wider != want:
                raise pa.ArrowInvalid(f"{want} would not hold its values" if hub_has_values else "no value there")
            table = table.set_column(i, pa.field(f.name, want, f.nullable, f.metadata), column.cast(want))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            log.warning("Hub: column %s is %s in the run's Hub files and %s in %s (%s); pushed as %s, so the run's "
                        "files disagree on it: --check-hub names them", f.name, want, f.type, what,
                        str(e).splitlines()[0][:100], f.type)
    return table


def disagreements(entries: dict[str, FileEntry]) -> dict[str, dict[str, list[str]]]:
    """Columns the run's files give more than one type: column -> type (with ', all null' where the files hold
    no value in it) -> those files."""
    out = {}
    for name, kinds in file_types(entries).items():
        declared: dict[str, list[str]] = {}
        types = set()  # (the types themselves: their names hold commas, as timestamp[us, tz=UTC] does)
        for kind, paths in kinds.items():
            for path in paths:
                own = entries[path].schema.field(name).type
                types.add(own)
                declared.setdefault(f"{own}, all null" if kind == pa.null() else str(own), []).append(path)
        if len(types) > 1:
            out[name] = dict(sorted(declared.items()))
    return out
