"""Files in a run's Hub folder that this tool did not write for the run: one uploaded by hand or by another tool,
one named like ours whose rows are not those its name says (fewer, none, other keys). What the folder holds is
what the run's dataset config loads, so their rows count as published (pushing their keys again would publish
them twice); a warning and --check-hub name the files. A file lacking one of our columns is unreadable instead:
the config's files would not share one schema."""
from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq
from hub_parts import REPO, RUN, Writer, ckpt, data_files, make_rows  # noqa: F401  (fixtures: ckpt)
from test_exactly_once_more import connect, keys, once, recommit

from vlm_caption.hub_files import hub_path
from vlm_caption.store import OUTPUT_SCHEMA


def parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), buf)
    return buf.getvalue()


def put(stub, path: str, data: bytes) -> None:
    if ("dataset", REPO) not in stub.repos:
        stub.create_repo_direct(REPO)
    recommit(stub, REPO, lambda tree: tree.update({path: stub._put_blob(data)}))


def test_a_file_not_named_by_us_in_the_runs_folder_counts_and_is_named(hub_stub, ckpt, caplog):  # noqa: F811
    extra = f"data/{RUN}/extra.parquet"
    put(hub_stub, extra, parquet(make_rows(0, 5)))  # by hand: keys 0-4 with captions of its own
    Writer(ckpt).parts(10)
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 5  # keys 5-9: 0-4 are published already
    assert extra in caplog.text and "not written by this tool for this run" in caplog.text
    assert once(hub_stub) == keys(10)
    recommit(hub_stub, REPO, lambda tree: tree.pop(extra))  # deleted: its keys are pushed again, once
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 5 and once(hub_stub) == keys(10)


def test_a_file_named_like_ours_with_other_keys_counts_and_is_named(hub_stub, ckpt, caplog):  # noqa: F811
    Writer(ckpt).parts(10)
    impostor = hub_path(RUN, "someoneelse0", 0, 0, 0, ["zz"])  # our pattern, a digest of other keys
    put(hub_stub, impostor, parquet(make_rows(0, 10)))
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 0
    assert impostor in caplog.text and "not those its name says" in caplog.text and once(hub_stub) == keys(10)


def test_a_file_of_ours_rewritten_with_fewer_rows_or_none_gets_the_rest_pushed_once(hub_stub, ckpt):  # noqa: F811
    Writer(ckpt).parts(10)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    (path,) = data_files(hub_stub)
    put(hub_stub, path, parquet(make_rows(0, 4)))  # someone rewrote it with 4 of its rows
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 6 and once(hub_stub) == keys(10)
    put(hub_stub, path, parquet([]))  # then with none
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 4 and once(hub_stub) == keys(10)


def test_a_file_of_our_name_and_keys_lacking_a_column_of_ours_is_not_counted(hub_stub, ckpt, caplog):  # noqa: F811
    """Its name's digest holds (the right keys) but a column is missing: the config's files would not share one
    schema, and the rows it lacks were never published."""
    Writer(ckpt).parts(10)
    path = hub_path(RUN, "someoneelse0", 0, 0, 0, sorted(keys(10)))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(make_rows(0, 10), schema=OUTPUT_SCHEMA).drop_columns(["url"]), buf)
    put(hub_stub, path, buf.getvalue())
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    assert path in caplog.text and "not a readable captions file" in caplog.text
