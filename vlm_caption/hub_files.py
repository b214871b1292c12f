"""What goes where on the Hub: a worker's consecutive unpublished parts become one file of the run's folder,

    data/{run_id}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{digest}.parquet

its rows sorted by key, the same rows always the same bytes (digest names the keys: two files share a name only
when they share their rows). hub.py decides when and checks what the repo already holds.
"""
from __future__ import annotations

import io
from typing import Callable, NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub.errors import HfHubHTTPError

from .hub_index import HUB_FILE_RE, keys_digest, run_data_dir  # noqa: F401  (HUB_FILE_RE: hub.py's)
from .hub_retry import http_status
from .hub_types import align
from .merge import parts_schema
from .rows import conform
from .store import Part

T = TypeVar("T")

MAX_ROWS_PER_HUB_FILE = 100_000
ROW_GROUP_ROWS = 10_000  # small row groups keep the dataset viewer and streaming readers fast


class HubFile(NamedTuple):
    path: str
    worker: int
    parts: list[Part]
    keys: list[str]  # the rows of `parts` this file publishes (the others are on the Hub already)

    @property
    def rows(self) -> int:
        return len(self.keys)


def hub_path(run_id: str, dir_id: str, worker: int, first: int, last: int, keys: list[str]) -> str:
    return f"{run_data_dir(run_id)}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{keys_digest(keys)}.parquet"


def plan_hub_files(run_id: str, dir_id: str, pending: list[tuple[Part, list[str]]]) -> list[HubFile]:
    """Group parts per worker into runs of consecutive seq numbers publishing at most MAX_ROWS_PER_HUB_FILE
    rows."""
    max_rows = MAX_ROWS_PER_HUB_FILE  # read at each call: tests lower it
    groups: list[list[tuple[Part, list[str]]]] = []
    for part, keys in sorted(pending):
        last = groups[-1] if groups else None
        if (last is None or last[-1][0].worker != part.worker or part.seq != last[-1][0].seq + 1
                or sum(len(k) for _, k in last) + len(keys) > max_rows):
            groups.append([])
        groups[-1].append((part, keys))
    files = []
    for g in groups:
        keys = [k for _, ks in g for k in ks]
        first, last = g[0][0], g[-1][0]
        files.append(HubFile(hub_path(run_id, dir_id, first.worker, first.seq, last.seq, keys), first.worker,
                             [p for p, _ in g], keys))
    return files


def hub_file_bytes(f: HubFile, targets: dict | None = None) -> bytes:
    """The file's rows sorted by key, as parquet; the same rows always give the same bytes. `targets`: the types
    the run's Hub files give their columns (hub_types.hub_targets), taken where no value changes.

    Only the key column is sorted; the rows are gathered one row group at a time. Filtering, sorting and
    de-duplicating whole tables held about four copies of a file's rows (up to MAX_ROWS_PER_HUB_FILE of them):
    a 50K-row file of 3,600-character captions took 735 MB of Arrow memory, now 435 MB."""
    tables = [pq.read_table(p.path).replace_schema_metadata(None) for p in f.parts]  # + --keep-columns
    schema = parts_schema([p.path for p in f.parts], tables)  # parts of two types for one kept column (older runs)
    table = pa.concat_tables([conform(t, schema) for t in tables])
    table = align(table, targets, f"the rows of {f.path}") if targets else table
    order = pc.sort_indices(table.column("key"))  # stable: of a key's rows, the first part's comes first
    keys = table.column("key").take(order)
    wanted = pc.is_in(keys, value_set=pa.array(f.keys, pa.string()))
    if len(keys) > 1:  # the first row of each key
        first = pa.concat_arrays([pa.array([True]), pc.not_equal(keys[1:], keys[:-1]).combine_chunks()])
        wanted = pc.and_(wanted, first)
    order = order.filter(wanted)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        for start in range(0, max(len(order), 1), ROW_GROUP_ROWS):
            writer.write_table(table.take(order[start:start + ROW_GROUP_ROWS]).combine_chunks(),
                               row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def rows_committed(sent: list, on_hub=None) -> int:
    """The rows of the (HubFile, CommitOperationAdd) pairs of a commit that it put on the Hub (`on_hub`: the
    paths the repo holds, after a commit whose answer was lost). huggingface_hub leaves out of a commit an add
    whose path the head holds with the same bytes (its preupload answer): another pusher committed that file
    since this process read the repo; a commit of only such files is none, and answers the head's id."""
    return sum(f.rows for f, op in sent if (on_hub is None or f.path in on_hub) and not _unchanged_on_hub(op))


def _unchanged_on_hub(op) -> bool:
    remote, local = getattr(op, "_remote_oid", None), getattr(op, "_local_oid", None)
    return remote is not None and remote == local


def send_commit(sent: list, commit: Callable[[], T]) -> T:
    """commit() of the (HubFile, op) pairs `sent`. An answer of 4xx (a lost race: 409/412) says nothing of it
    landed: `sent` is emptied, so files of its names the next look finds are another pusher's, not counted as
    this push's rows (rows_committed). A 5xx or a lost answer keeps it: that commit may have landed."""
    try:
        return commit()
    except HfHubHTTPError as e:
        if (http_status(e) or 500) < 500:
            sent.clear()
        raise
