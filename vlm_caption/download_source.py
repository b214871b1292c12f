"""The download's source: the ContraStyles rows (a Hub dataset, a local dataset dir, or a .parquet / .csv /
.jsonl file): the six ContraStyles columns as text, further columns with their own types, and urls.parquet's
table made from them. Split from download.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .cli import plural
from .data_layout import SHARD_NAMES
from .errors import FatalError, UsageError, brief
from .schema import COLUMNS

logger = logging.getLogger("vlm_caption.download")  # the messages users know, under the name they had

SOURCE_COLUMNS = ("key", "url", "caption", "md5", "tags", "merged_tags")
URL_COLUMNS = ("url", "caption", "original_key", "md5", "tags", "merged_tags")
FETCHED_URL_RE = r"(?i)^\s*https?://"  # fetched (urllib strips spaces); file:, data:, ... would read local files
NOT_FETCHED = "only http(s) URLs are fetched: "  # urllib refuses it: "unknown url type: only http(s) urls are ..."
NO_URL = "no URL in the source: "  # a null or blank URL, refused the same way: "unknown url type: no url in the source"
JSON_BLOCK_BYTES = 64 << 20  # pyarrow's JSON reader needs each line inside one block (its default: 1 MiB)


# Names img2dataset writes or reserves in its shard parquets, and names of our own outputs: a source column
# called so travels as source_{name} (as md5 does, data_layout.SHARD_NAMES).
_TAKEN = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
          "error_message", "exif", "md5", "sha256", "sha512", "file_name", "text", "original_key", "source_md5",
          *(c.name for c in COLUMNS)}


def travels_as_text(kind: pa.DataType) -> bool:
    """Dates, timestamps and decimals: img2dataset writes every saved row's values to a .json beside its image,
    and json cannot write these (the row is lost, its shard never finishes). They travel to it as text and are
    cast back to their type in full_metadata.parquet."""
    return pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_decimal(kind)


def _carried(kind: pa.DataType) -> bool:
    """A column kept as it is: scalars, and lists of them (not images, structs or bytes, nor times of day,
    durations or lists of travels_as_text values, which neither json nor a cast back from text can carry)."""
    if pa.types.is_dictionary(kind):  # pandas' category columns: carried as their values (load_source)
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        kind = kind.value_type
    elif travels_as_text(kind):
        return True
    return (pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_null(kind))  # null on every row so far: carried as text (_plain)


def further_columns(schema: pa.Schema) -> dict[str, str]:
    """The source's columns beyond the six, carried with their own types: source name -> name in the data dir
    (source_{name} where img2dataset or our outputs use the name). Others are said, not dropped silently."""
    names: dict[str, str] = {}
    for f in schema:
        if f.name in SOURCE_COLUMNS:
            continue
        if not _carried(f.type):
            logger.warning("source column %s (%s) is not carried: only scalar and list columns are", f.name, f.type)
            continue
        names[f.name] = f"source_{f.name}" if f.name in _TAKEN else f.name
    if len(set(names.values())) < len(names):  # e.g. both width and source_width
        raise UsageError(f"--source: columns {', '.join(names)} clash once renamed ({', '.join(names.values())})")
    return names


_FILE_SUFFIXES = (".tsv", ".txt", ".gz", ".zip", ".arrow", ".feather", ".xlsx")  # never the end of a Hub id


def load_source(source: str, split: str, max_rows: int | None) -> pa.Table:
    """The source rows (first max_rows): the six ContraStyles columns as strings, then every further column
    with its own type (further_columns).

    A .parquet/.csv/.jsonl/.json file is read with pyarrow; anything else goes through
    `datasets.load_dataset(source, split=split)` (a Hub id such as tomg-group-umd/ContraStyles, or a
    local dataset directory). A missing column is a one-line UsageError raised before any download.
    """
    path = Path(source)
    if path.suffix.lower() in (".parquet", ".csv", ".jsonl", ".json"):
        if path.is_dir() and path.suffix.lower() != ".parquet":  # (a parquet dir: Spark's or pandas' partitions)
            raise UsageError(f"--source {source} is a directory; give the file")
        if not path.exists():
            raise UsageError(f"--source {source} does not exist")
        table = _read_local_table(path)
    elif path.is_file():  # a local file load_dataset would take for a Hub id
        raise UsageError(f"--source {source}: give a .parquet, .csv, .jsonl or .json file, a local dataset "
                         "directory, or a Hub dataset id")
    elif not path.exists() and (source.startswith((".", "/", "~")) or path.suffix.lower() in _FILE_SUFFIXES):
        # a mistyped path: the Hub would answer "not found", or offline "cannot reach the Hub"
        raise UsageError(f"--source {source} does not exist (a Hub dataset id looks like owner/name)")
    else:
        table = _load_hf_table(source, split, max_rows)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    further = further_columns(table.schema)
    return pa.table({**{c: _as_strings(table.column(c), c) for c in SOURCE_COLUMNS},
                     **{name: _plain(table.column(c)) for c, name in further.items()}})


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A dictionary-encoded column as its values (its shard parquets and full_metadata hold plain values); one
    null on every row (pandas' type for an all-None column, an always-null JSON field) as text, as the
    captioner reads such a column (dataset.metadata_schema), and a list of nulls as a list of text."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return column.cast(kind.value_type)
    if pa.types.is_null(kind):
        return column.cast(pa.string())
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_null(kind.value_type):
        return column.cast(pa.large_list(pa.string()) if pa.types.is_large_list(kind) else pa.list_(pa.string()))
    return column


def check_source_columns(columns: list[str], source: str) -> None:
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:  # which of them holds the URLs would be a guess (pyarrow refuses to pick one)
        raise UsageError(f"--source {source} has column(s) {', '.join(repeated)} more than once; rename or drop "
                         "the extra ones")
    missing = [c for c in SOURCE_COLUMNS if c not in columns]
    if missing:
        raise UsageError(
            f"--source {source} lacks column(s) {', '.join(missing)}; it needs {', '.join(SOURCE_COLUMNS)}"
        )


def _read_parquet_dir(path: Path) -> pa.Table:
    """A directory of parquet files, their schemas unified: read with the first file's alone, a column all null
    there (pandas writes the null type) and filled in a later file was an ArrowNotImplementedError traceback, and a
    column of later files only was dropped. Hive partition columns come as their values, not dictionaries."""
    dataset = pq.ParquetDataset(path)
    schema = pa.unify_schemas([dataset.schema, *(pq.read_schema(f) for f in dataset.files)],
                              promote_options="permissive")
    schema = pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema])
    check_source_columns(schema.names, str(path))
    return pq.read_table(path, schema=schema)


def _read_local_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet" and path.is_dir():  # what Spark and a partitioned to_parquet write
            return _read_parquet_dir(path)
        if suffix == ".parquet":
            check_source_columns(pq.read_schema(path).names, str(path))
            return pq.read_table(path)
        if suffix == ".csv":
            # Read every column as text: keys like "000123" must keep their leading zeros.
            header = pa_csv.open_csv(path).schema.names
            check_source_columns(header, str(path))
            types = {c: pa.string() for c in header}
            return pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                                   convert_options=pa_csv.ConvertOptions(column_types=types))
        import pyarrow.json as pa_json

        options = pa_json.ReadOptions(block_size=JSON_BLOCK_BYTES)
        table = pa_json.read_json(path, read_options=options)
        # JSON has no dates: pyarrow guesses "1890-05-01" a timestamp (and drops a "+02:00"). Read those as the text
        # the file holds, as a CSV's columns are.
        guessed = [pa.field(f.name, text) for f in table.schema if (text := _as_text_type(f.type)) is not None]
        if guessed:
            order = table.column_names
            table = pa_json.read_json(path, read_options=options, parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(guessed), unexpected_field_behavior="infer")).select(order)
    except (pa.ArrowException, OSError) as e:
        # brief: a CSV parse error quotes the offending rows, newlines included
        # pyarrow reads JSON Lines only: a JSON array (pandas' to_json) fails with "changed from object to array"
        json_lines = " (JSON Lines: one object per line, not an array)" if suffix in (".json", ".jsonl") else ""
        raise UsageError(f"--source {path}: cannot read it ({brief(str(e))}); give a .parquet, .csv or .jsonl "
                         f"file{json_lines}") from None
    check_source_columns(table.column_names, str(path))
    return table


def _as_text_type(kind: pa.DataType) -> pa.DataType | None:
    """The text type a JSON field pyarrow guessed as dates should have (a list of them: a list of text), or None."""
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return pa.string()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = _as_text_type(kind.value_type)
        return None if item is None else pa.large_list(item) if pa.types.is_large_list(kind) else pa.list_(item)
    return None


def _load_hf_table(source: str, split: str, max_rows: int | None) -> pa.Table:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except FileNotFoundError as e:  # datasets' DatasetNotFoundError and DataFilesNotFoundError
        raise UsageError(f"--source {source}: dataset not found ({e})") from None
    except ValueError as e:  # an unknown split, among others
        raise UsageError(f"--source {source} --split {split}: {e}") from None
    except ConnectionError as e:
        raise FatalError(f"--source {source}: cannot reach the Hub ({e})") from None
    except datasets.exceptions.DatasetGenerationError as e:  # e.g. a directory of files it cannot read as one table
        cause = e.__cause__ or e
        raise UsageError(f"--source {source}: datasets cannot build a table from it ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    check_source_columns(ds.column_names, source)
    further = further_columns(ds.data.schema)  # images and other large columns are left out (and said) here
    ds = ds.select_columns([*SOURCE_COLUMNS, *further])
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
    return ds.with_format("arrow")[:]


def _as_strings(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """Every ContraStyles column is a string in the output schema; list columns become 'a, b, c' (null
    elements left out: binary_join would null the whole row for one of them)."""
    try:
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            items = column.cast(pa.list_(pa.string())).to_pylist()
            return pa.chunked_array([pa.array([None if row is None else ", ".join(x for x in row if x is not None)
                                               for row in items], pa.string())])
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise UsageError(f"source column {name} has type {column.type}, which cannot be read as text: {e}") from None


def url_table(source: pa.Table) -> pa.Table:
    """urls.parquet's columns: the dataset's `key` becomes original_key (img2dataset assigns its own keys)."""
    renamed = {"original_key": "key"}
    counts = pc.value_counts(source.column("key"))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):  # every row is still downloaded (as its own key); original_key just does not tell them apart
        logger.warning("source keys on more than one row: %d (e.g. %s); each row is downloaded as a row of its own",
                       len(repeated), ", ".join(map(str, repeated.field("values")[:3].to_pylist())))
    urls = source.column("url")
    missing = _missing_urls(urls)
    if n_missing := pc.sum(missing).as_py():
        logger.warning("%s no URL (null or blank): not fetched, recorded as failed",
                       plural(n_missing, "row has", "rows have"))
    given = pc.filter(urls, pc.invert(missing))
    n_repeated = len(given) - len(pc.unique(given))
    if n_repeated:
        logger.warning("URLs on more than one source row: %d row(s) repeat an earlier row's URL; each row is "
                       "downloaded and captioned as a row of its own", n_repeated)
    unfetched = pc.filter(given, pc.invert(pc.match_substring_regex(given, FETCHED_URL_RE)))
    if len(unfetched):
        logger.warning("%s not http(s) (e.g. %s): not fetched, recorded as failed", plural(len(unfetched), "URL is",
                       "URLs are"), unfetched[0].as_py()[:80])
    further = [c for c in source.column_names if c not in SOURCE_COLUMNS]  # already under their data-dir names
    return pa.table({**{c: source.column(renamed.get(c, c)) for c in URL_COLUMNS},
                     **{c: source.column(c) for c in further}})


def further_names(urls: pa.Table) -> list[str]:
    """urls.parquet's columns beyond the six: the source's further columns, under their data-dir names."""
    return [c for c in urls.column_names if c not in URL_COLUMNS]


def img2dataset_input(urls: pa.Table) -> pa.Table:
    """urls.parquet as img2dataset reads it: md5 renamed (a name it reserves), and any URL that is not
    http(s) made one urllib refuses, so that its row is a permanent failure with its reason in the shard
    parquet ("unknown url type: only http(s) urls are fetched") instead of a local file or an inline payload
    read as if downloaded. A null or blank URL likewise ("unknown url type: no url in the source", not urllib's
    "unknown url type: 'None'" or an empty name)."""
    url = urls.column("url")
    url = pc.if_else(pc.fill_null(pc.match_substring_regex(url, FETCHED_URL_RE), True), _percent_encoded(url),
                     pc.binary_join_element_wise(NOT_FETCHED, url, ""))
    url = pc.if_else(_missing_urls(urls.column("url")), pa.scalar(NO_URL, pa.string()), url)
    urls = urls.set_column(urls.column_names.index("url"), "url", url)
    for c in further_names(urls):
        kind = urls.schema.field(c).type
        if travels_as_text(kind):
            values = urls.column(c)
            if pa.types.is_timestamp(kind) and kind.tz:  # as UTC ("...Z"): a local offset's seconds (Paris before
                values = values.cast(pa.timestamp(kind.unit, "UTC"))  # 1911: +00:09:21) are cut in "+0009"
            urls = urls.set_column(urls.column_names.index(c), c, values.cast(pa.string()))
    return urls.rename_columns([SHARD_NAMES.get(c, c) for c in urls.column_names])


def _missing_urls(urls: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row, whether its URL is null, empty or only whitespace (never null itself)."""
    return pc.fill_null(pc.match_substring_regex(urls, r"^[\s\p{Z}]*$"), True)


_UNSAFE_URL_RE = r"[^\x21-\x7e]"  # spaces, control and non-ASCII characters: urllib refuses them ('ascii' codec ...)


def _percent_encoded(urls: pa.ChunkedArray) -> pa.Array:
    """URLs as a browser sends them: a space or an accented letter in a path (common in art sites' file names)
    percent-encoded, a non-ASCII host name in IDNA; escapes already there are kept. Other URLs are unchanged."""
    values = urls.to_pylist()
    for i in pc.indices_nonzero(pc.fill_null(pc.match_substring_regex(urls, _UNSAFE_URL_RE), False)).to_pylist():
        parts = urlsplit(values[i].strip())
        try:
            netloc = parts.netloc if parts.netloc.isascii() else parts.netloc.encode("idna").decode("ascii")
        except UnicodeError:  # not a valid host name: urllib will say so for this row
            netloc = parts.netloc
        values[i] = urlunsplit((parts.scheme, netloc, quote(parts.path, safe="/%:@!$&'()*+,;=~"),
                                quote(parts.query, safe="/%:@!$&'()*+,;=~?"),
                                quote(parts.fragment, safe="/%:@!$&'()*+,;=~?")))
    return pa.array(values, pa.string())


def nan_as_null(table: pa.Table) -> pa.Table:
    """NaN as null in float values, inside nested values too (lists of every kind, map items, structs):
    NaN never equals itself, so a source with NaN (pandas' missing float) would read as changed on every rerun,
    and its download could never be resumed. (Dictionary columns never get here: load_source decodes them.)"""
    for i, f in enumerate(table.schema):
        column = table.column(i)
        table = table.set_column(i, f, pa.chunked_array([_nan_as_null(c) for c in column.chunks], f.type))
    return table


def _nan_as_null(array: pa.Array) -> pa.Array:
    kind = array.type
    if pa.types.is_floating(kind):
        return pc.if_else(pc.is_nan(array), pa.scalar(None, kind), array)
    if pa.types.is_struct(kind):  # .flatten() follows a slice
        return pa.StructArray.from_arrays([_nan_as_null(a) for a in array.flatten()], fields=list(kind),
                                          mask=array.is_null())
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            or pa.types.is_map(kind) or pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind)):
        return array
    array = pa.concat_arrays([array]) if array.offset else array  # from_arrays takes no mask with a slice
    mask = array.is_null()
    if pa.types.is_map(kind):  # keys cannot be null: only the items
        return pa.MapArray.from_arrays(array.offsets, array.keys, _nan_as_null(array.items), kind, mask=mask)
    if pa.types.is_fixed_size_list(kind):  # .values is the whole child, also past a slice's end
        values = _nan_as_null(array.values.slice(0, len(array) * kind.list_size))
        return pa.FixedSizeListArray.from_arrays(values, type=kind, mask=mask)
    values = _nan_as_null(array.values)
    if pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind):
        views = pa.ListViewArray if pa.types.is_list_view(kind) else pa.LargeListViewArray
        return views.from_arrays(array.offsets, array.sizes, values, kind, mask=mask)
    lists = pa.ListArray if pa.types.is_list(kind) else pa.LargeListArray
    return lists.from_arrays(array.offsets, values, kind, mask=mask)
