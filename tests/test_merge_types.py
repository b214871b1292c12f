"""Merging parts that give one --keep-columns column two types (runs before urls.parquet typed them: a column all
null in the first shards was text, later int64): unified where no value changes, else one line naming both."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parts import Writer

from vlm_caption import store
from vlm_caption.errors import UsageError
from vlm_caption.merge import merge_parts, parts_schema


def _typed_parts(ckpt, *columns: dict[str, pa.Array]) -> list:
    """One part of 3 rows per item of `columns`, each with those further columns (the run's metadata kept)."""
    w = Writer(ckpt)
    w.parts(*[3] * len(columns))
    parts = store.list_parts(ckpt)
    for part, extra in zip(parts, columns):
        table = pq.read_table(part.path)
        for name, values in extra.items():
            table = table.append_column(name, values)
        pq.write_table(table, part.path)
    return [p.path for p in parts]


def test_parts_of_two_types_for_one_kept_column_merge_into_one_type_that_datasets_loads(tmp_path):
    import datasets

    ckpt = tmp_path / "ckpt"
    _typed_parts(ckpt, {"year": pa.nulls(3, pa.string()), "score": pa.array([1, 2, None], pa.int64())},
                 {"year": pa.array([1999, None, 2001], pa.int64()), "score": pa.array([0.5, None, 2.5])},
                 {"year": pa.array([2002, 2003, 2004], pa.int32()), "score": pa.nulls(3, pa.string())})
    report = merge_parts([ckpt], ckpt / store.MERGED)
    assert report.rows == 9
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.schema.field("year").type == pa.int64() and merged.schema.field("score").type == pa.float64()
    assert merged.column("year").to_pylist() == [None, None, None, 1999, None, 2001, 2002, 2003, 2004]
    assert merged.column("score").to_pylist() == [1.0, 2.0, None, 0.5, None, 2.5, None, None, None]
    ds = datasets.load_dataset("parquet", data_files=str(ckpt / store.MERGED), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.features["year"].dtype == "int64" and ds.features["score"].dtype == "float64"
    assert ds["year"][3] == 1999


def test_a_column_null_in_every_part_under_two_types_merges(tmp_path):
    ckpt = tmp_path / "ckpt"
    _typed_parts(ckpt, {"year": pa.nulls(3, pa.string())}, {"year": pa.nulls(3, pa.int64())})
    merge_parts([ckpt], ckpt / store.MERGED)
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.column("year").null_count == 6 and not pa.types.is_null(merged.schema.field("year").type)


@pytest.mark.parametrize("first, second, why", [
    (pa.array(["1999", None, "x"]), pa.array([2000, 2001, None], pa.int64()), "do not unify"),
    (pa.array([2**53 + 1, 1, 2], pa.int64()), pa.array([0.5, None, 1.0]), "a value would change"),
    (pa.array([["a"], None, []], pa.list_(pa.string())), pa.array([[1], [2], None], pa.list_(pa.int64())),
     "do not unify"),
])
def test_parts_whose_types_cannot_merge_without_loss_are_refused_in_one_line(tmp_path, first, second, why):
    ckpt = tmp_path / "ckpt"
    paths = _typed_parts(ckpt, {"year": first}, {"year": second})
    with pytest.raises(UsageError) as e:
        merge_parts([ckpt], ckpt / store.MERGED)
    line = str(e.value)
    assert "\n" not in line and "column year" in line and why in line
    kinds = [str(pq.read_schema(p).field("year").type) for p in paths]  # as parquet stores them
    assert all(f"{kind} in {path}" in line for kind, path in zip(kinds, paths))
    assert not (ckpt / store.MERGED).exists()


def test_merge_only_over_parts_of_two_types_exits_2_in_one_line(tiny_model_dir, tmp_path, capsys):
    from batched_image_inference import main
    from vlm_caption.cli import run_main
    from vlm_caption.errors import EXIT_OK, EXIT_USAGE
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=4)
    meta = pq.read_table(data / "full_metadata.parquet")
    pq.write_table(meta.append_column("year", pa.array(range(meta.num_rows), pa.int64())),
                   data / "full_metadata.parquet")
    ckpt = tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--backend", "dummy", "--max-tokens", "8", "--batch-size", "4", "--checkpoint-every", "4",
            "--keep-columns", "year"]
    assert main(args) == EXIT_OK
    first = store.list_parts(ckpt)[0].path
    assert len(store.list_parts(ckpt)) > 1
    table = pq.read_table(first)
    at = table.column_names.index("year")
    pq.write_table(table.set_column(at, "year", pa.nulls(table.num_rows, pa.string())), first)  # an older run's
    assert main([*args, "--merge-only"]) == EXIT_OK
    assert pq.read_schema(ckpt / store.MERGED).field("year").type == pa.int64()
    capsys.readouterr()
    pq.write_table(table.set_column(at, "year", pa.array(["old"] * table.num_rows)), first)
    with pytest.raises(SystemExit) as exc:
        run_main(main, [*args, "--merge-only"], prog="batched_image_inference.py")
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USAGE and "Traceback" not in err
    [line] = [x for x in err.splitlines() if "year" in x]
    assert "string" in line and "int64" in line and str(first) in line


def test_a_hub_file_of_parts_of_two_types_gets_one_type(tmp_path):
    """hub_file_bytes joins a worker's consecutive parts into one Hub file: the same unification (a push raised)."""
    import io

    from vlm_caption.hub_files import hub_file_bytes, plan_hub_files

    ckpt = tmp_path / "ckpt"
    _typed_parts(ckpt, {"year": pa.nulls(3, pa.string())}, {"year": pa.array([1999, None, 2001], pa.int64())})
    pending = [(part, keys) for part, keys in store.read_keys(store.list_parts(ckpt))]
    [f] = plan_hub_files("0123456789ab", "d", pending)
    table = pq.read_table(io.BytesIO(hub_file_bytes(f)))
    assert table.schema.field("year").type == pa.int64() and table.column("year").to_pylist()[3:] == [1999, None, 2001]


def test_a_hub_file_reads_each_part_once(tmp_path, monkeypatch):
    """hub_file_bytes holds its parts' tables: parts_schema re-read every part's footer (and, for a column of two
    types, the column again) at each push; it now takes the tables read, with the same result."""
    import io

    from vlm_caption import hub_files, merge
    from vlm_caption.hub_files import hub_file_bytes, plan_hub_files

    ckpt = tmp_path / "ckpt"
    _typed_parts(ckpt, {"year": pa.nulls(3, pa.string()), "score": pa.array([1, 2, None], pa.int64())},
                 {"year": pa.array([1999, None, 2001], pa.int64()), "score": pa.array([0.5, None, 2.5])})
    pending = [(part, keys) for part, keys in store.read_keys(store.list_parts(ckpt))]
    [f] = plan_hub_files("0123456789ab", "d", pending)
    reads = []
    real_read_table = hub_files.pq.read_table

    def counted(what, real):
        def read(source, *args, **kwargs):
            if not isinstance(source, io.BytesIO):
                reads.append((what, str(source)))
            return real(source, *args, **kwargs)
        return read

    monkeypatch.setattr(pq, "read_table", counted("read_table", real_read_table))
    monkeypatch.setattr(pq, "read_schema", counted("read_schema", pq.read_schema))
    monkeypatch.setattr(pq, "read_metadata", counted("read_metadata", pq.read_metadata))
    table = real_read_table(io.BytesIO(hub_file_bytes(f)))
    assert sorted(reads) == sorted(("read_table", str(p.path)) for p in f.parts)  # once each, no footer again
    assert table.schema.field("year").type == pa.int64() and table.schema.field("score").type == pa.float64()
    assert table.column("score").to_pylist() == [1.0, 2.0, None, 0.5, None, 2.5]
    assert merge.parts_schema([p.path for p in f.parts]) == merge.parts_schema(
        [p.path for p in f.parts], [real_read_table(p.path).replace_schema_metadata(None) for p in f.parts])


def test_parts_typed_int64_before_the_fix_and_uint64_after_it_merge_without_refusing(tmp_path):
    """User impact: an earlier version's `--keep-columns phash` typed the column int64, so the parts written while every
    value stayed below 2**63 were int64 parts; the first part holding a larger value died with the OverflowError
    traceback. The user upgrades and resumes the same dir with the same flags: the new parts are uint64,
    holding values >= 2**63. At the end of the run (after all the captioning) the merge unifies int64 +
    uint64 as int64 (pyarrow's permissive promotion), cannot cast the large
    values, and refuses: "the parts disagree on column phash's type ... set aside the parts of one type (their
    keys are captioned again) and rerun" -- exit 2, and the advice costs re-captioning. The int64 parts hold only
    non-negative values, which uint64 holds unchanged.
    Expected: int64 parts whose values are all >= 0 and uint64 parts merge as uint64 (no value changes), as int
    and float already widen to float64 where no value changes (README --keep-columns). Severity low: it needs a
    column whose first parts held only values < 2**63."""
    old, new = tmp_path / "part-old.parquet", tmp_path / "part-new.parquet"
    pq.write_table(pa.table({"key": ["000001"], "phash": pa.array([5], pa.int64())}), old)
    pq.write_table(pa.table({"key": ["000002"], "phash": pa.array([2 ** 63 + 5], pa.uint64())}), new)
    schema = parts_schema([old, new])
    assert schema.field("phash").type == pa.uint64()
