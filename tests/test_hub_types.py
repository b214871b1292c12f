"""A --keep-columns column that an older run pushed under two types (all null in the early parts: string, later
int64): the Hub's files disagree and `datasets.load_dataset` of the repo fails. New pushes take the type the Hub's
files already use where no value changes; --check-hub names a column whose files disagree."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parts import REPO, RUN, Writer, ckpt, client, sleeps  # noqa: F401  (fixtures: ckpt...)
from test_hub import RUN_INFO
from test_hub_consumers import load_snapshot

from vlm_caption import store


def typed_parts(ckpt, w: Writer, *years: pa.Array) -> None:  # noqa: F811
    """One part of 3 rows per item of `years`, each with a kept column `year` typed as given (as older runs did)."""
    before = {p.path for p in store.list_parts(ckpt)}
    w.parts(*[3] * len(years))
    parts = [p for p in store.list_parts(ckpt) if p.path not in before]
    for part, values in zip(parts, years):
        table = pq.read_table(part.path)
        pq.write_table(table.append_column("year", values), part.path)


def hub_year_types(stub) -> list[pa.DataType]:
    return sorted({pq.read_schema(io.BytesIO(data)).field("year").type for path, data in
                   stub.repo_files(REPO).items() if path.startswith(f"data/{RUN}/")}, key=str)


def test_a_push_after_the_hub_typed_a_column_takes_the_hubs_type(hub_stub, client, ckpt, tmp_path):  # noqa: F811
    w = Writer(ckpt)
    typed_parts(ckpt, w, pa.array([1999, None, 2001], pa.int64()))
    assert client.push_pending(ckpt, RUN, 0) == 3
    typed_parts(ckpt, w, pa.nulls(3, pa.string()))  # all null: the old way typed it as text
    assert client.push_pending(ckpt, RUN, 0) == 3
    assert hub_year_types(hub_stub) == [pa.int64()]
    client.write_card(RUN_INFO, {})
    ds = load_snapshot(hub_stub, tmp_path)
    assert ds.num_rows == 6 and sorted(ds["year"], key=str) == [1999, 2001, None, None, None, None]


def test_ints_pushed_after_floats_take_float64_and_a_text_null_first_file_is_named(hub_stub, client, ckpt,  # noqa: F811
                                                                                   caplog):
    from vlm_caption.hub_types import disagreements

    w = Writer(ckpt)
    typed_parts(ckpt, w, pa.array([0.5, None, 2.5]))
    assert client.push_pending(ckpt, RUN, 0) == 3
    typed_parts(ckpt, w, pa.array([1999, None, 2001], pa.int64()))  # widened where no value changes
    assert client.push_pending(ckpt, RUN, 0) == 3
    assert hub_year_types(hub_stub) == [pa.float64()] and not disagreements(client.snapshot(RUN).entries)

    other = ckpt.parent / "other"  # another run whose first file typed the column as text, all null
    w = Writer(other, run="0123456789ac")
    typed_parts(other, w, pa.nulls(3, pa.string()))
    assert client.push_pending(other, "0123456789ac", 0) == 3
    typed_parts(other, w, pa.array([1999, None, 2001], pa.int64()))  # its values cannot be text: pushed as they are
    assert client.push_pending(other, "0123456789ac", 0) == 3
    assert "column year is string in the run's Hub files and int64" in caplog.text
    mixed = disagreements(client.snapshot("0123456789ac").entries)
    assert list(mixed) == ["year"] and sorted(mixed["year"]) == ["int64", "string, all null"]


@pytest.mark.parametrize("one, other", [(pa.timestamp("us"), pa.timestamp("us", "UTC")),
                                        (pa.decimal128(5, 2), pa.decimal128(5, 3)),
                                        (pa.struct([("a", pa.int64()), ("b", pa.string())]),
                                         pa.struct([("a", pa.int64()), ("b", pa.int64())]))])
def test_types_whose_names_hold_a_comma_are_told_apart(one, other):
    """--check-hub compared the types' names up to their first comma: timestamp[us] and timestamp[us, tz=UTC]
    (or two structs, two decimals) read as one type, and files that disagree were not named."""
    from vlm_caption.hub_key_cache import FileEntry
    from vlm_caption.hub_types import disagreements

    entries = {f"data/{RUN}/{n}.parquet": FileEntry(["k"], {}, pa.schema([("c", kind)])) for n, kind in
               (("a", one), ("b", other))}
    assert disagreements(entries) == {"c": {str(one): [f"data/{RUN}/a.parquet"], str(other): [f"data/{RUN}/b.parquet"]}}
    same = {p: FileEntry(["k"], {}, pa.schema([("c", one)]), frozenset({"c"} if p.endswith("a.parquet") else ()))
            for p in entries}
    assert disagreements(same) == {}  # all null in one file, the same type: one type
