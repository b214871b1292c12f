"""What the captioner reads of the data dir's metadata: --keep-columns with their own types, sizes of shard rows."""
from __future__ import annotations

import pytest

from batched_image_inference import main
from vlm_caption import store
from vlm_caption.cli import run_main
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE


def test_keep_columns_carries_a_metadata_column_with_its_type(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = pq.read_table(data / "full_metadata.parquet")
    scores = pa.array([i / 10 for i in range(meta.num_rows)], pa.float64())
    pq.write_table(meta.append_column("aesthetic", scores), data / "full_metadata.parquet")
    ckpt = tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--backend", "dummy", "--max-tokens", "8"]
    with pytest.raises(SystemExit) as exc:
        run_main(main, [*args, "--keep-columns", "aesthetic,nope"], prog="batched_image_inference.py")
    assert exc.value.code == EXIT_USAGE and not ckpt.exists()  # before any work
    err = capsys.readouterr().err
    assert "--keep-columns nope: no such column" in err and "aesthetic" in err and "Traceback" not in err
    assert main([*args, "--keep-columns", "aesthetic"]) in (EXIT_OK, EXIT_ITEMS_FAILED)
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.schema.field("aesthetic").type == pa.float64()
    by_key = dict(zip(meta.column("key").to_pylist(), scores.to_pylist()))
    assert all(by_key[k] == v for k, v in zip(merged.column("key").to_pylist(), merged.column("aesthetic").to_pylist()))


def test_a_metadata_column_named_image_path_is_refused_in_one_line(sample_data_dir, tmp_path, capsys):
    """Each row's image file travels as `image_path`: a metadata column of that name was overwritten by it
    (a template rendered the local path) or, kept, made every part write fail with a traceback."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dummy_runs import assert_one_line_usage_errors

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = pq.read_table(data / "full_metadata.parquet")
    pq.write_table(meta.append_column("image_path", pa.array(["x"] * meta.num_rows)), data / "full_metadata.parquet")
    cases = ((["--keep-columns", "image_path"], "--keep-columns image_path: that column is already"),
             (["--prompt", "Describe {image_path}"], "{image_path} is the pipeline's own name"))
    assert_one_line_usage_errors(data, tmp_path / "ckpt", cases, capsys)


def test_keep_columns_types_come_from_every_shard_not_only_the_first(tiny_model_dir, tmp_path, capsys):
    """Without full_metadata.parquet the shards are read: a column all null in the first shard and double in
    the next gave parts typed null, then a traceback at every relaunch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=4)
    (data / "full_metadata.parquet").unlink()
    first, second = sorted((data / "images").glob("*.parquet"))
    for path, values in ((first, pa.nulls(4)), (second, pa.array([0.5, 0.25, None, 1.0]))):
        table = pq.read_table(path)
        pq.write_table(table.append_column("aesthetic", values.slice(0, table.num_rows)), path)
    ckpt = tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--backend", "dummy", "--max-tokens", "8", "--keep-columns", "aesthetic"]
    assert main(args) == EXIT_OK
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.num_rows == 8 and merged.schema.field("aesthetic").type == pa.float64()
    assert sorted(v for v in merged.column("aesthetic").to_pylist() if v is not None) == [0.25, 0.5, 1.0]
    table = pq.read_table(first)  # text in one shard, numbers in another: one line, before any work
    pq.write_table(table.set_column(table.column_names.index("aesthetic"), "aesthetic",
                                    pa.array(["high"] * table.num_rows)), first)
    with pytest.raises(SystemExit) as exc:
        run_main(main, [*args[:5], str(tmp_path / "ckpt2"), *args[6:]], prog="batched_image_inference.py")
    assert exc.value.code == EXIT_USAGE and "disagree on a column's type" in capsys.readouterr().err


def test_rows_read_from_the_shard_parquets_get_the_measured_sizes(tmp_path):
    """Without full_metadata.parquet the captioner reads img2dataset's shard parquets, whose sizes are null
    (nothing re-encoded): the sizes PIL measured at validation (decode_checks/) fill them."""
    import pyarrow.parquet as pq

    from vlm_caption import dataset
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=6, broken=False, seed=3, shard_size=3)
    full = {r["key"]: r for r in pq.read_table(data / "full_metadata.parquet").to_pylist()}
    (data / "full_metadata.parquet").unlink()
    rows = list(dataset.iter_rows(data, set(full)))
    assert len(rows) == 6
    for row in rows:
        want = full[row["key"]]
        assert (row["width"], row["height"], row["original_width"]) == (want["width"], want["height"], want["width"])
        assert row["width"] > 0


def test_a_binary_column_kept_keeps_its_bytes():
    """Decoded as text with errors replaced, then stored in the binary column: b"\\xff\\xfe" became U+FFFD twice."""
    import pyarrow as pa

    from vlm_caption import dataset

    row = dataset.clean_row({"blob": b"\xff\xfe", "caption": b"caf\xc3\xa9 \xff"}, {"blob": pa.binary()})
    assert row == {"blob": b"\xff\xfe", "caption": "caf\u00e9 \ufffd"}


def test_a_kept_column_all_null_so_far_has_the_sources_type_in_every_hub_file(hub_stub, tmp_path):
    """Captioning while the download goes on: the finished shard holds only nulls in `score`, which the next one
    fills with numbers. The first launch typed it text, the relaunch after that shard int64: the run's Hub files
    disagreed (load_dataset read the numbers as text), and the merge raised a traceback before the card was
    written (its row count stale). urls.parquet has the source's type from the start."""
    import io
    import shutil

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=4)
    (data / "full_metadata.parquet").unlink()
    urls = pq.read_table(data / "urls.parquet")
    pq.write_table(urls.append_column("score", pa.array(range(urls.num_rows), pa.int64())), data / "urls.parquet")
    first, second = sorted((data / "images").glob("*.parquet"))
    for path, values in ((first, pa.nulls(4)), (second, pa.array([1, 2, 3, 4], pa.int64()))):
        table = pq.read_table(path)
        pq.write_table(table.append_column("score", values.slice(0, table.num_rows)), path)
    stats = data / "images" / f"{second.stem}_stats.json"
    shutil.move(stats, tmp_path / "stats")  # the second shard is still downloading
    args = ["--backend", "dummy", "--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--keep-columns", "score", "--hf-repo", "tester/scores", "--hub-endpoint", hub_stub.endpoint]
    assert main(args) == EXIT_ITEMS_FAILED  # the unfinished shard's images are not captioned yet
    shutil.move(tmp_path / "stats", stats)
    assert main(args) == EXIT_OK
    files = {p: pq.read_table(io.BytesIO(b)) for p, b in hub_stub.repo_files("tester/scores").items()
             if p.endswith(".parquet")}
    assert len(files) == 2 and {t.schema.field("score").type for t in files.values()} == {pa.int64()}
    snapshot = tmp_path / "snapshot"
    for path, blob in hub_stub.repo_files("tester/scores").items():
        (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / path).write_bytes(blob)
    ds = datasets.load_dataset(str(snapshot), split="train", cache_dir=str(tmp_path / "ds_cache"))
    assert ds.num_rows == 8 and sorted(v for v in ds["score"] if v is not None) == [1, 2, 3, 4]


def test_shards_read_before_the_download_ends_type_kept_columns_as_full_metadata_will(tmp_path):
    """urls.parquet's types for the source's further columns, text for one null in every source row: what
    validate writes into full_metadata.parquet at the end, so a run's columns keep their type across the two."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption import dataset
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=4, broken=False, seed=3)
    (data / "full_metadata.parquet").unlink()
    urls = pq.read_table(data / "urls.parquet")
    urls = urls.append_column("score", pa.array([1] * urls.num_rows, pa.int32()))
    pq.write_table(urls.append_column("note", pa.nulls(urls.num_rows)), data / "urls.parquet")
    (shard,) = (data / "images").glob("*.parquet")
    table = pq.read_table(shard)
    pq.write_table(table.append_column("score", pa.nulls(4)).append_column("note", pa.nulls(4)), shard)
    schema = dataset.metadata_schema(data)
    assert (schema.field("score").type, schema.field("note").type) == (pa.int32(), pa.string())


def test_a_text_column_holding_lists_reads_comma_separated(tmp_path, monkeypatch, capsys):
    """A data dir made by hand whose tags are lists: the prompt and every output row held Python's
    "['ink', 'wash']"; a list column the output does not carry already read "ink, wash"."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dummy_runs import clear_launch_env, dummy_args, merged_rows

    from vlm_caption.sample_data import write_sample

    clear_launch_env(monkeypatch)
    data = write_sample(tmp_path / "data", n=4, seed=2)
    meta = pq.read_table(data / "full_metadata.parquet")
    meta = meta.set_column(meta.column_names.index("tags"), "tags", pa.array([["ink", "wash"]] * meta.num_rows))
    meta = meta.append_column("styles", pa.array([["ink", "wash"]] * meta.num_rows))
    pq.write_table(meta, data / "full_metadata.parquet")
    prompt = "Describe. Tags: {tags}. Styles: {styles}."
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(data, ckpt, "--prompt", prompt, "--dry-run")) == 0
    shown = capsys.readouterr().out
    assert "Styles: ink, wash." in shown  # a list column the output does not carry: comma-separated
    assert "Tags: ink, wash." in shown, shown[-400:]
    assert main(dummy_args(data, ckpt, "--prompt", prompt)) == 0
    assert {r["tags"] for r in merged_rows(ckpt)} == {"ink, wash"}
