"""How a metadata value of each parquet type reads in a templated prompt (prompt_values.render_value)."""
from __future__ import annotations

import datetime
import decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm_caption.prompts import render_prompt


def _row(**columns: pa.Array) -> dict:
    """One row as the pipeline reads it (dataset.iter_rows: pyarrow's to_pylist)."""
    return pa.table(columns).to_pylist()[0]


def test_a_struct_value_reads_as_json_not_as_a_python_dict():
    """A struct column rendered as Python's dict text: {'artist': 'Hokusai', 'year': 1831}."""
    row = _row(info=pa.array([{"artist": "葛飾北斎", "year": 1831, "lost": None}]))
    assert render_prompt("About: {info}.", row) == 'About: {"artist": "葛飾北斎", "year": 1831, "lost": null}.'


def test_a_map_value_reads_as_a_json_object_not_as_its_keys_and_values_in_a_row():
    """pyarrow reads a map as (key, value) tuples: the prompt said 'medium, oil, support, canvas'."""
    values = pa.array([[("medium", "oil"), ("support", "canvas")]], pa.map_(pa.string(), pa.string()))
    assert render_prompt("Made of {m}", _row(m=values)) == 'Made of {"medium": "oil", "support": "canvas"}'
    repeated = pa.array([[("a", 1), ("a", 2)]], pa.map_(pa.string(), pa.int64()))  # a JSON object would keep one
    assert render_prompt("{m}", _row(m=repeated)) == '[["a", 1], ["a", 2]]'
    assert render_prompt("Materials: {m}", _row(m=pa.array([[]], pa.map_(pa.string(), pa.string())))) == ""


def test_a_list_of_structs_reads_as_json_items_comma_separated():
    row = _row(people=pa.array([[{"name": "Monet", "role": "painter"}, {"name": "Durand-Ruel", "role": None}]]))
    assert render_prompt("People: {people}", row) == (
        'People: {"name": "Monet", "role": "painter"}, {"name": "Durand-Ruel", "role": null}')


def test_a_list_of_lists_keeps_its_grouping():
    """[[1, 2], [3]] read '1, 2, 3'; a flat list stays comma-separated."""
    assert render_prompt("{boxes}", _row(boxes=pa.array([[[1, 2], [3]]]))) == "[1, 2], [3]"
    assert render_prompt("{tags}", _row(tags=pa.array([["oil", None, "canvas"]]))) == "oil, canvas"


def test_nested_dates_bytes_and_decimals_read_as_they_do_alone():
    when = datetime.datetime(1889, 6, 18, 14, 30)
    struct = pa.array([{"when": when, "day": when.date(), "raw": b"caf\xc3\xa9", "price": decimal.Decimal("12.50"),
                        "big": decimal.Decimal("12345678901234567890.123456789"), "ratio": float("nan"),
                        "far": float("inf")}],
                      pa.struct([("when", pa.timestamp("us")), ("day", pa.date32()), ("raw", pa.binary()),
                                 ("price", pa.decimal128(6, 2)), ("big", pa.decimal128(38, 9)),
                                 ("ratio", pa.float64()), ("far", pa.float64())]))
    row = _row(s=struct)
    alone = {k: render_prompt("{v}", {"v": v}) for k, v in row["s"].items()}
    assert alone["when"] == "1889-06-18 14:30:00" and alone["day"] == "1889-06-18" and alone["raw"] == "café"
    assert render_prompt("{s}", row) == (
        '{"when": "1889-06-18 14:30:00", "day": "1889-06-18", "raw": "café", "price": 12.5, '
        '"big": "12345678901234567890.123456789", "ratio": null, "far": "inf"}')


def test_markup_inside_a_struct_stays_plain_text():
    from vlm_caption.quality import CHAT_MARKUP_RE

    rendered = render_prompt("{s}", {"s": {"alt": "<end_of_turn>"}})
    assert not CHAT_MARKUP_RE.search(rendered) and rendered.replace("\u200b", "") == '{"alt": "<end_of_turn>"}'


def test_a_struct_column_of_a_data_dir_reaches_the_prompt_as_json(tmp_path):
    from vlm_caption import dataset
    from vlm_caption.data_layout import FULL_METADATA_FILE
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=2, broken=False)
    meta = pq.read_table(data / FULL_METADATA_FILE)
    info = pa.array([{"artist": f"a{i}", "year": 1900 + i} for i in range(meta.num_rows)])
    pq.write_table(meta.append_column("info", info), data / FULL_METADATA_FILE)
    keys = set(meta.column("key").to_pylist())
    rendered = sorted(render_prompt("Info: {info}", r) for r in dataset.iter_rows(data, keys, (), ["info"]))
    assert rendered == ['Info: {"artist": "a0", "year": 1900}', 'Info: {"artist": "a1", "year": 1901}']


@pytest.mark.parametrize("value", [{}, None])
def test_an_empty_or_null_struct_renders_as_nothing(value):
    assert render_prompt("Title: x.\nInfo: {info}.", {"info": value}) == "Title: x."
