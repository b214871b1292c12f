"""Files in a run's Hub folder that this tool did not write for the run: one uploaded by hand or by another tool,
one named like ours whose rows are not those its name says (fewer, none, other keys). What the folder holds is
what the run's dataset config loads, so their rows count as published (pushing their keys again would publish
them twice); a warning and --check-hub name the files. A file lacking one of our columns is unreadable instead:
the config's files would not share one schema."""
from __future__ import annotations

import io
import logging
from pathlib import Path

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


def loaded_keys(stub, tmp_path) -> list[str]:
    """The keys `datasets` loads for the run's config pattern (it skips hidden files), from a download of the repo."""
    import datasets
    from huggingface_hub import snapshot_download

    local = snapshot_download(REPO, repo_type="dataset", endpoint=stub.endpoint, token=stub.token,
                              cache_dir=tmp_path / "download")
    return datasets.load_dataset("parquet", data_files=str(Path(local) / "data" / RUN / "*.parquet"), split="train",
                                 cache_dir=str(tmp_path / "datasets"))["key"]


def test_a_file_renamed_to_a_hidden_name_is_not_counted_and_its_rows_are_pushed_again(hub_stub, tmp_path, caplog):
    """`datasets` does not load data/{run}/.NAME.parquet for the config's data/{run}/*.parquet: counted, its keys
    were published for the tool and --check-hub, and missing from the dataset."""
    a, fresh = tmp_path / "a", tmp_path / "fresh"
    Writer(a, dir_id="dira00000000").parts(10)
    assert connect(hub_stub, a).push(a, RUN, 0) == 10
    [first] = data_files(hub_stub)
    hidden = f"data/{RUN}/.{first.rsplit('/', 1)[1]}"
    recommit(hub_stub, REPO, lambda tree: tree.update({hidden: tree.pop(first)}))  # renamed by hand
    Writer(fresh, dir_id="dirf00000000").parts(10, 5)  # the same 10 keys and 5 more
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, fresh).push(fresh, RUN, None) == 15
    assert hidden in caplog.text and "hidden names" in caplog.text
    snap = connect(hub_stub, fresh).snapshot(RUN)
    assert snap.hidden == [hidden] and hidden not in snap.files and snap.keys == keys(15)
    loaded = loaded_keys(hub_stub, tmp_path)
    assert sorted(loaded) == sorted(keys(15))  # each once


def test_rows_of_an_own_file_made_unreadable_are_pushed_again_under_its_name(hub_stub, ckpt, caplog):  # noqa: F811
    """Its bytes replaced by hand under its name: none of its keys count, and the push that planned the same file
    dropped it as "that name is on the Hub" and returned without an error, so a run's last push said all was
    pushed. The file is replaced with the rows its name says."""
    Writer(ckpt).parts(10)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    [path] = data_files(hub_stub)
    put(hub_stub, path, b"PAR1 not a parquet file PAR1")
    client = connect(hub_stub, ckpt)
    assert client.pending_rows(ckpt, RUN) == 10
    with caplog.at_level(logging.WARNING):
        assert client.push(ckpt, RUN, None) == 10
    assert f"replacing {path}, unreadable" in caplog.text
    assert client.pending_rows(ckpt, RUN) == 0 and data_files(hub_stub) == [path] and once(hub_stub) == keys(10)


def test_an_unreadable_file_of_the_old_flat_layout_stays_and_the_push_goes_on(hub_stub, ckpt, caplog):  # noqa: F811
    """A push moves 0.1's flat files into the run's folder, reading them whole: an unreadable one was an
    ArrowInvalid traceback at every push. It stays where it is, named, and its rows are not counted."""
    Writer(ckpt).parts(10)
    legacy = f"data/{RUN}-w000-000000-000000.parquet"  # what version 0.1 pushed
    put(hub_stub, legacy, b"PAR1 not a parquet file PAR1")
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    assert legacy in caplog.text and "not a readable captions file" in caplog.text
    assert legacy in data_files(hub_stub) and connect(hub_stub, ckpt).snapshot(RUN).unreadable == [legacy]
