"""download_data.py --source as a .jsonl or .parquet: the further columns a consumer of the published dataset gets.

README (`download_data.py --source`): "a local .parquet ... / .csv / .jsonl with columns key, url, caption, md5,
tags, merged_tags; further scalar or list columns are kept too (dates, timestamps and decimals included; others,
e.g. times of day, are named and left out)".
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from vlm_caption import download as dl

ROW = {"url": "http://127.0.0.1/x.jpg", "caption": "c", "md5": "ff", "tags": "t", "merged_tags": "m"}
ROW_NO_TAGS = {k: v for k, v in ROW.items() if k != "tags"}


def test_jsonl_text_that_looks_like_a_date_stays_the_sources_text(tmp_path):
    """User impact: a JSON Lines source whose text column holds ISO-looking values (an artwork's "date":
    "1890-05-01", a scrape time "2020-01-01T10:00:00+02:00") is published as timestamp[s] values: "1890-05-01"
    reads 1890-05-01 00:00:00, and "10:00+02:00" becomes a naive 08:00 (its offset gone). JSON has no date type:
    these are strings in the source and pyarrow's JSON reader guessed them into timestamps (the same file with one
    non-date value in the column keeps them as text, so the published type depends on the data). Expected: a JSON
    string is carried as the same string (vlm_caption/download_source.py _read_local_table reads JSONL with
    pyarrow.json's type inference)."""
    path = tmp_path / "src.jsonl"
    rows = [{**ROW, "key": str(i), "date": f"1890-05-0{i + 1}", "scraped": "2020-01-01T10:00:00+02:00"}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = dl.load_source(str(path), "train", None)
    assert table.schema.field("date").type == pa.string(), table.schema.field("date")
    assert table.column("date").to_pylist() == [r["date"] for r in rows]
    assert table.column("scraped").to_pylist() == [r["scraped"] for r in rows]


def test_a_source_column_null_on_every_row_is_kept_as_a_column(tmp_path):
    """User impact: a further source column that happens to be null on every row (pandas writes it with the null
    type; a JSON field that is always null; or a --max-rows trial of a sparse column) is "not carried" and missing
    from full_metadata.parquet, so `--keep-columns` refuses it and the published dataset lacks a source column
    ("keep every original metadata column"). The captioner already types such a column as text
    (dataset.metadata_schema: "text for one null in every source row"), so the download alone drops it.
    Expected: carried as a string column of nulls (as `list<null>` would be a list of strings)."""
    path = tmp_path / "src.parquet"
    table = pa.table({"key": ["0", "1"], **{c: [v, v] for c, v in ROW.items()},
                      "painter": pa.nulls(2), "styles": pa.array([[], []], pa.list_(pa.null()))})
    pq.write_table(table, path)
    got = dl.load_source(str(path), "train", None)
    assert "painter" in got.column_names and got.column("painter").to_pylist() == [None, None], got.column_names
    assert "styles" in got.column_names and got.column("styles").to_pylist() == [[], []], got.column_names


def test_a_jsonl_list_of_date_looking_strings_is_carried_as_the_files_text(tmp_path, caplog):
    """User impact: a JSON Lines source with a list column whose strings look like dates (an artwork's
    "exhibited": ["1890-05-01", "1901-03-02"], ISO scrape times) is left out of the download: pyarrow's JSON
    reader guesses list<timestamp[s]>, download_source._read_local_table re-reads as text only the *top-level*
    timestamp/date columns, and further_columns drops a list of timestamps with "source column exhibited
    (list<item: timestamp[s]>) is not carried: only scalar and list columns are" (it is a list column of
    strings in the file). The same strings as a top-level column, or one non-date element in the list, are kept:
    whether a column survives depends on its values. The README promises further scalar or list columns are
    kept and that a .jsonl string that looks like a date stays text.
    Expected: carried as list<string> holding the file's strings, as [["1890-05-01", "x"]] is."""
    path = tmp_path / "src.jsonl"
    rows = [{**ROW_NO_TAGS, "key": str(i), "tags": "t", "exhibited": ["1890-05-01", f"190{i}-03-02"]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = dl.load_source(str(path), "train", None)
    assert "exhibited" in table.column_names, (table.schema, caplog.text)
    assert pa.types.is_list(table.schema.field("exhibited").type) or pa.types.is_large_list(
        table.schema.field("exhibited").type)
    assert table.column("exhibited").to_pylist() == [r["exhibited"] for r in rows]


def test_jsonl_tags_that_all_look_like_dates_keep_the_files_text(tmp_path):
    """User impact: the ContraStyles `tags` column given as a JSON list whose items all look like dates (a
    dataset tagging works by year or date, "tags": ["1890-05-01"]) is published as "1890-05-01 00:00:00": the
    list is guessed list<timestamp[s]> and _as_strings casts the timestamps to text, while the same file with a
    scalar "tags": "1890-05-01" keeps "1890-05-01". Expected: the file's strings, "1890-05-01"."""
    path = tmp_path / "src.jsonl"
    rows = [{**ROW_NO_TAGS, "key": str(i), "tags": [f"189{i}-05-01", "1901-01-01"]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = dl.load_source(str(path), "train", None)
    assert table.column("tags").to_pylist() == [", ".join(r["tags"]) for r in rows]
