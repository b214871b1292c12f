"""download_data.py's source: local files of every kind read whole and as text, bad ones refused in one line."""
from __future__ import annotations

import json
import re
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm_caption import download as dl
from vlm_caption.download_source import NO_URL, SOURCE_COLUMNS
from vlm_caption.errors import UsageError

HEADER = "key,url,caption,md5,tags,merged_tags\n"


def test_csv_with_quoted_multi_line_captions_over_a_reader_block(tmp_path):
    """pandas writes such files; pyarrow's chunked CSV reader lost its place in them (beyond ~1 MB)."""
    path = tmp_path / "src.csv"
    caption = "line one,\nline two \"quoted\"\n" + "x" * 200
    rows = [f'{i:06d},http://127.0.0.1/{i}.jpg,"{caption.replace(chr(34), chr(34) * 2)}",ff,t,m\n' for i in range(8000)]
    path.write_text(HEADER + "".join(rows))
    assert path.stat().st_size > 2 << 20
    table = dl.load_source(str(path), "train", None)
    assert table.num_rows == 8000 and set(table.column("caption").to_pylist()) == {caption}
    assert table.column("key")[7999].as_py() == "007999"


def test_jsonl_with_a_row_larger_than_pyarrows_default_block(tmp_path):
    path = tmp_path / "src.jsonl"
    rows = [{"key": str(i), "url": f"http://127.0.0.1/{i}.jpg", "caption": "c" * (3 << 20) if i == 1 else "c",
             "md5": "ff", "tags": "t", "merged_tags": "m"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = dl.load_source(str(path), "train", None)
    assert table.num_rows == 3 and len(table.column("caption")[1].as_py()) == 3 << 20


def test_list_columns_keep_every_value_and_nested_lists_are_one_line(tmp_path):
    path = tmp_path / "src.jsonl"
    row = {"key": "1", "url": "http://127.0.0.1/1.jpg", "caption": "c", "md5": "ff", "merged_tags": "m"}
    path.write_text(json.dumps({**row, "tags": ["a", None, "c"]}) + "\n" + json.dumps({**row, "tags": []}) + "\n")
    assert dl.load_source(str(path), "train", None).column("tags").to_pylist() == ["a, c", ""]
    path.write_text(json.dumps({**row, "tags": [["a"], ["b"]]}) + "\n")
    with pytest.raises(UsageError, match="source column tags has type list<item: list<item: string>>"):
        dl.load_source(str(path), "train", None)


def test_a_directory_datasets_cannot_build_is_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"key": ["a"], "url": ["u"]}), tmp_path / "d" / "a.parquet")
    pq.write_table(pa.table({"key": [1], "other": [2.0]}), tmp_path / "d" / "b.parquet")
    with pytest.raises(UsageError, match="datasets cannot build a table from it"):
        dl.load_source(str(tmp_path / "d"), "train", None)


@pytest.mark.parametrize("source", ["few.tsv", "./missing", "../elsewhere/rows", "~/rows.gz"])
def test_a_missing_local_source_says_so_before_asking_the_hub(source, tmp_path, monkeypatch):
    """A mistyped path was taken for a Hub id: offline, "cannot reach the Hub"; online, "dataset not found"."""
    monkeypatch.chdir(tmp_path)
    from vlm_caption import download_source

    monkeypatch.setattr(download_source, "_load_hf_table", lambda *a: pytest.fail("asked the Hub"))
    with pytest.raises(UsageError, match="does not exist"):
        dl.load_source(source, "train", None)


def test_repeated_urls_and_urls_that_are_not_http_are_said(caplog):
    urls = ["http://127.0.0.1/a.jpg", "http://127.0.0.1/a.jpg", "file:///etc/hostname", "data:image/png;base64,AA",
            "HTTPS://127.0.0.1/b.jpg", None]
    source = pa.table({c: urls if c == "url" else [str(i) for i in range(len(urls))] for c in SOURCE_COLUMNS})
    with caplog.at_level(logging.WARNING, logger="vlm_caption.download"):
        table = dl.url_table(source)
    assert table.num_rows == len(urls)
    assert "1 row(s) repeat an earlier row's URL" in caplog.text
    assert "2 URLs are not http(s) (e.g. file:///etc/hostname): not fetched, recorded as failed" in caplog.text
    # img2dataset is given URLs urllib refuses for those two (and the null); the others pass unchanged.
    given = dl.img2dataset_input(table)
    assert given.column("url").to_pylist() == [
        urls[0], urls[1], "only http(s) URLs are fetched: file:///etc/hostname",
        "only http(s) URLs are fetched: data:image/png;base64,AA", urls[4], "no URL in the source: "]
    assert "source_md5" in given.column_names and "md5" not in given.column_names


def test_http_urls_with_spaces_around_them_are_fetched_not_failed(caplog):
    """A CSV cell ' http://host/a.jpg ' is an http URL (urllib strips the spaces): it must not be recorded as a
    permanent 'only http(s) URLs are fetched' failure."""
    urls = [" http://127.0.0.1/a.jpg", "\thttps://127.0.0.1/b.jpg \n", " file:///etc/hostname"]
    source = pa.table({c: urls if c == "url" else [str(i) for i in range(len(urls))] for c in SOURCE_COLUMNS})
    with caplog.at_level(logging.WARNING, logger="vlm_caption.download"):
        given = dl.img2dataset_input(dl.url_table(source))
    assert given.column("url").to_pylist() == ["http://127.0.0.1/a.jpg", "https://127.0.0.1/b.jpg",
                                               "only http(s) URLs are fetched:  file:///etc/hostname"]
    assert "1 URL is not http(s)" in caplog.text


def test_urls_with_spaces_or_accents_are_fetched_percent_encoded():
    """urllib refuses a raw space ('URL can't contain control characters') or an accented letter ('ascii' codec
    can't encode): such a URL, which a browser opens, was a permanent failure. Escapes already there stay."""
    urls = ["http://127.0.0.1/peintures/Claude Monet/Impression, soleil levant.jpg",
            "https://127.0.0.1/œuvres/été.jpg?titre=la mer#vue", "http://bücher.example/a.jpg",
            "http://127.0.0.1/already%20encoded.jpg", "http://127.0.0.1/plain.jpg", None]
    source = pa.table({c: urls if c == "url" else [str(i) for i in range(len(urls))] for c in SOURCE_COLUMNS})
    table = dl.url_table(source)
    assert table.column("url").to_pylist() == urls  # urls.parquet keeps them as the source gave them
    assert dl.img2dataset_input(table).column("url").to_pylist() == [
        "http://127.0.0.1/peintures/Claude%20Monet/Impression,%20soleil%20levant.jpg",
        "https://127.0.0.1/%C5%93uvres/%C3%A9t%C3%A9.jpg?titre=la%20mer#vue", "http://xn--bcher-kva.example/a.jpg",
        urls[3], urls[4], "no URL in the source: "]


@pytest.mark.parametrize("text, says", [
    (HEADER.rstrip() + ",key\n1,http://a/1.jpg,c,m,t,mt,2\n", "has column(s) key more than once"),
    (HEADER + '1,http://a/1.jpg,"open quote,m,t,mt\n2,http://a/2.jpg,c,m,t,mt\n', "Expected 6 columns"),
])
def test_a_csv_with_a_repeated_column_or_a_broken_quote_is_one_line(tmp_path, text, says):
    path = tmp_path / "src.csv"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(says)) as e:
        dl.load_source(str(path), "train", None)
    assert "\n" not in str(e.value)


def test_a_category_column_is_carried_as_its_values(tmp_path):
    """pandas writes its category columns dictionary-encoded: scalars all the same, not a column to drop."""
    table = pa.table({c: [f"{c}{i}" for i in range(3)] for c in SOURCE_COLUMNS})
    path = tmp_path / "src.parquet"
    pq.write_table(table.append_column("style", pa.array(["ukiyo-e", "baroque", "ukiyo-e"]).dictionary_encode()), path)
    got = dl.load_source(str(path), "train", None)
    assert got.schema.field("style").type == pa.string()
    assert got.column("style").to_pylist() == ["ukiyo-e", "baroque", "ukiyo-e"]


def test_a_json_array_says_the_source_must_be_json_lines(tmp_path):
    """A rows.json written as one array (pandas' default) said only "Column() changed from object to array"."""
    path = tmp_path / "src.json"
    path.write_text(json.dumps([{"key": "1", "url": "http://127.0.0.1/1.jpg", "caption": "c", "md5": "ff",
                                 "tags": "t", "merged_tags": "m"}]))
    with pytest.raises(UsageError, match="one object per line, not an array"):
        dl.load_source(str(path), "train", None)


def test_a_null_or_blank_url_is_said_and_refused_as_no_url(caplog):
    """A null URL reached img2dataset as None: its failure read "unknown url type: 'None'"; an empty or blank one
    was counted as a URL that is not http(s) (e.g. '') and repeated URLs counted the nulls."""
    urls = [None, "", " \t", "\u00a0", None, "http://127.0.0.1/a.jpg"]
    source = pa.table({c: urls if c == "url" else [str(i) for i in range(len(urls))] for c in SOURCE_COLUMNS})
    with caplog.at_level(logging.WARNING, logger="vlm_caption.download"):
        table = dl.url_table(source)
    said = caplog.text
    assert "5 rows have no URL (null or blank): not fetched, recorded as failed" in said
    assert "not http(s)" not in said and "more than one source row" not in said
    assert dl.img2dataset_input(table).column("url").to_pylist() == [NO_URL] * 5 + [urls[5]]


def test_a_parquet_directory_is_read_as_its_files(tmp_path):
    """What Spark or a partitioned to_parquet writes (x.parquet/part-*.parquet, _SUCCESS): it was 'does not exist'."""
    src = tmp_path / "contrastyles.parquet"
    src.mkdir()
    for part in range(2):
        rows = {c: [f"{part}{i}" if c == "key" else f"http://127.0.0.1/{part}{i}.jpg" if c == "url" else "x"
                    for i in range(3)] for c in SOURCE_COLUMNS}
        pq.write_table(pa.table(rows), src / f"part-{part:05d}.parquet")
    (src / "_SUCCESS").write_text("")
    table = dl.load_source(str(src), "train", None)
    assert table.column("key").to_pylist() == ["00", "01", "02", "10", "11", "12"]
    (tmp_path / "src.csv").mkdir()
    with pytest.raises(UsageError, match=r"--source \S+src.csv is a directory; give the file"):
        dl.load_source(str(tmp_path / "src.csv"), "train", None)


def test_a_parquet_directory_whose_files_differ_in_schema_is_read_with_their_union(tmp_path):
    """Read with the first file's schema, a column all null there (pandas writes the null type) and filled later
    was an ArrowNotImplementedError traceback, and a column of later files only was dropped without a word."""
    def part(prefix: str, **extra) -> pa.Table:
        return pa.table({**{c: [f"{prefix}{i}" if c == "key" else f"http://127.0.0.1/{prefix}{i}.jpg" if c == "url"
                                else "x" for i in range(2)] for c in SOURCE_COLUMNS}, **extra})

    src = tmp_path / "src.parquet"
    for year, table in (("2020", part("a", score=pa.array([None, None]))),
                        ("2021", part("b", score=[5.5, 6.5], painter=["p", None]))):
        (src / f"year={year}").mkdir(parents=True)
        pq.write_table(table, src / f"year={year}" / "part-0.parquet")
    table = dl.load_source(str(src), "train", None)
    assert table.column("score").to_pylist() == [None, None, 5.5, 6.5]
    assert table.column("painter").to_pylist() == [None, None, "p", None]
    assert table.column("year").to_pylist() == [2020, 2020, 2021, 2021]  # a hive partition, as its values
    pq.write_table(part("c", score=["high", "low"]), src / "year=2021" / "part-1.parquet")
    with pytest.raises(UsageError, match="cannot read it .*Field score has incompatible types: double vs string"):
        dl.load_source(str(src), "train", None)
