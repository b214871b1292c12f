"""What a checkpoint dir trusts: a truncated part or one of another run is set aside, never counted as done;
a Hub file's name stands for its exact rows."""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from hub_parts import RUN, Writer

from vlm_caption import store
from vlm_caption.hub_files import hub_path


def test_a_truncated_part_is_quarantined_and_its_keys_are_not_done(tmp_path):
    w = Writer(tmp_path)
    w.parts(4, 4)
    first, second = store.list_parts(tmp_path)
    first.path.write_bytes(first.path.read_bytes()[:100])
    assert w.store.done_keys() == {f"00{i:07d}" for i in range(4, 8)}  # only the second part's keys
    assert [p.name.split(".parquet")[0] for p in (tmp_path / store.QUARANTINE_DIR).iterdir()] == [first.path.stem]
    assert [p.path for p in store.list_parts(tmp_path)] == [second.path]


def test_a_part_of_another_run_is_quarantined_and_its_keys_captioned_again(tmp_path):
    other = tmp_path / "other"
    Writer(other, run="ba9876543210", start=100).parts(3)
    mine = tmp_path / "mine"
    w = Writer(mine)
    w.parts(2)
    stray = store.list_parts(other)[0].path
    shutil.copy(stray, mine / "parts" / "captions-w009-000000.parquet")  # copied in by hand, say
    assert w.store.run_id == RUN
    assert w.store.done_keys() == {"000000000", "000000001"}  # not the other run's keys 100..102
    [moved] = (mine / store.QUARANTINE_DIR).iterdir()
    assert moved.name.startswith("captions-w009-000000.parquet")


def test_a_hub_file_name_changes_with_its_keys():
    """Same worker and part range, other rows (a part re-captioned after a quarantine): another file."""
    a = hub_path(RUN, "d1", 0, 1, 3, ["k1", "k2"])
    assert a == hub_path(RUN, "d1", 0, 1, 3, ["k2", "k1"])  # the same rows, in any order: the same name
    assert a != hub_path(RUN, "d1", 0, 1, 3, ["k1", "k3"]) and a != hub_path(RUN, "d1", 0, 1, 3, ["k1"])


def test_a_bad_file_another_worker_set_aside_first_is_not_an_error(tmp_path, caplog):
    """Two workers starting together see the same bad part; the second one's move found it gone: a traceback."""
    import logging

    with caplog.at_level(logging.INFO):
        store.quarantine(tmp_path, tmp_path / "parts" / "captions-w000-000001.parquet", "unreadable")
    assert "set aside by another process" in caplog.text
    assert not list((tmp_path / store.QUARANTINE_DIR).glob("*.parquet*"))


def test_a_tmp_file_renamed_while_it_is_looked_at_is_not_an_error(tmp_path, monkeypatch):
    from pathlib import Path

    from vlm_caption import atomic

    tmp = tmp_path / ".part.parquet.tmp-otherhost-123"
    tmp.write_bytes(b"x")
    stat = Path.stat

    def renamed_meanwhile(self, *args, **kwargs):
        if self.name == tmp.name:
            raise FileNotFoundError(self)
        return stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", renamed_meanwhile)
    assert atomic.remove_stale_tmp(tmp_path) == 0


def test_threads_of_one_process_writing_one_file_at_once_each_write_it_whole(tmp_path):
    """Two pushers of one process (a --push-only's threads) storing one key-cache entry: one tmp file each,
    not one per process (the second's fsync found the first's tmp renamed away: FileNotFoundError)."""
    import os
    import socket
    import threading

    from vlm_caption import atomic

    path, errors, go = tmp_path / "entry.json", [], threading.Barrier(4)

    def write(n):
        go.wait()
        try:
            for _ in range(50):
                atomic.atomic_write_json(path, {"writer": n, "pad": "x" * 10_000})
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_text().count("x") == 10_000 and not list(tmp_path.glob(".*.tmp-*"))
    live = tmp_path / f".entry.json.tmp-{socket.gethostname()}-{os.getpid()}.7"
    live.write_bytes(b"x")  # this process's thread 7 is writing it: not a leftover
    assert atomic.remove_stale_tmp(tmp_path) == 0 and live.exists()


def failure(key: str, stage: str, error: str = "broken") -> dict:
    return {"key": key, "original_key": None, "url": None, "stage": stage, "error": error}


def test_every_reader_of_failures_sees_the_latest_record_and_a_bad_file_is_never_fatal(tmp_path, caplog):
    """failures/ has one reader (store.failure_records): a key recorded twice (a --retry-failed run failed it
    again) is its later record for the preview's cards as for the card's counts and the run's skip; a truncated
    file is warned about by a look that changes nothing (the preview) and set aside by a run."""
    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption import endings, preview

    w = Writer(tmp_path)
    w.store.write_failures([failure("k1", "decode"), failure("k2", "generate", "first try")])
    w.store.write_failures([failure("k2", "generate", "second try")])
    w.store.write_failures([failure("k3", "load")])
    bad = store.list_failure_files(tmp_path)[-1].path
    bad.write_bytes(bad.read_bytes()[:100])
    pq.write_table(pa.table({"key": pa.array(["k1"], pa.string())}), tmp_path / store.MERGED)  # k1 captioned since

    with caplog.at_level(logging.WARNING):
        cards, total = preview.read_failures(tmp_path, pq.ParquetFile(tmp_path / store.MERGED), 10)
    assert [(c["key"], c["error"]) for c in cards] == [("k2", "second try")] and total == 1
    assert bad.exists() and f"{bad} is unreadable" in caplog.text
    assert {k: r["error"] for k, r in endings.still_failed([tmp_path], {"k1"}).items()} == {"k2": "second try"}
    assert not bad.exists() and len(list((tmp_path / store.QUARANTINE_DIR).iterdir())) == 1
    assert w.store.failed_stages() == {"k1": "decode", "k2": "generate"}


def test_a_bad_files_reason_is_one_line_cut_at_a_word(tmp_path):
    """The reason goes into a warning line: the first line of the error, never cut mid-word ("Parquet magi",
    seen when pyarrow's message carried a long path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.errors import brief

    bad = tmp_path / ("x" * 150) / "captions-w000-000000.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1" + b"x" * 5000)
    with pytest.raises(pa.ArrowException) as e:
        pq.read_table(bad)
    full = str(e.value)
    said = brief(full, 120)
    assert len(full) > 120 and len(said) <= 120 and said.endswith(" ...") and "\n" not in said
    kept = said.removesuffix(" ...")
    assert full.startswith(kept) and full[len(kept)] == " "
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    assert store.check_file(foreign, store.OUTPUT_SCHEMA).problem == "of a foreign schema (columns x)"


def test_two_files_of_one_name_set_aside_in_one_second_are_both_kept(tmp_path):
    for content in ("first", "second", "third"):
        (tmp_path / store.SUMMARY).write_text(content)
        store.quarantine(tmp_path, tmp_path / store.SUMMARY, "unreadable")
    kept = sorted(p.read_text() for p in (tmp_path / store.QUARANTINE_DIR).iterdir())
    assert kept == ["first", "second", "third"]


def test_a_file_where_quarantine_belongs_is_kept_and_bad_files_still_go_aside(tmp_path, caplog):
    """A regular file named quarantine (made by hand): mkdir raised FileExistsError, a traceback mid-run."""
    w = Writer(tmp_path)
    w.parts(2, 2)
    (tmp_path / store.QUARANTINE_DIR).write_text("notes")
    first, second = store.list_parts(tmp_path)
    first.path.write_bytes(first.path.read_bytes()[:100])
    assert w.store.done_keys() == {"000000002", "000000003"}
    assert (tmp_path / store.QUARANTINE_DIR).read_text() == "notes"
    [moved] = (tmp_path / f"{store.QUARANTINE_DIR}-1").iterdir()
    assert moved.name.startswith(first.path.name) and "is not a folder" in caplog.text


def test_a_folder_another_worker_makes_while_it_is_looked_for_is_taken_not_read_as_a_file(tmp_path, monkeypatch,
                                                                                          caplog):
    """Workers of a dir starting together: one made hub_keys/ between another's two questions ("a folder?" no,
    "exists?" yes), which took it for a file in the way and cached its keys in hub_keys-1 (flaky in CI)."""
    from vlm_caption import set_aside

    real_lexists = set_aside.os.path.lexists

    def another_worker_first(path):
        (tmp_path / "hub_keys").mkdir(exist_ok=True)  # the other worker, between this one's two questions
        return real_lexists(path)

    monkeypatch.setattr(set_aside.os.path, "lexists", another_worker_first)
    assert store.aside_folder(tmp_path, "hub_keys", "the keys") == tmp_path / "hub_keys"
    assert "is not a folder" not in caplog.text and sorted(p.name for p in tmp_path.iterdir()) == ["hub_keys"]


def test_two_workers_setting_files_of_one_name_aside_in_one_second_keep_both(tmp_path, monkeypatch):
    """Both chose the same free name in quarantine/ (nothing there yet); the other worker's rename landed first
    and this one's os.rename silently replaced it: a set-aside file lost. Here the other worker set the bad file
    aside, and a new one took its place (a key-cache entry written again) before this worker's rename."""
    from vlm_caption import set_aside

    monkeypatch.setattr(set_aside.time, "strftime", lambda *a: "20260101T000000")  # one second
    path = tmp_path / store.SUMMARY
    path.write_text("first")
    real_rename = set_aside.os.rename

    def the_other_worker_first(src, dest):
        if path.read_text() == "first":  # this worker's rename: the other one acts between its name and its move
            monkeypatch.setattr(set_aside.os, "rename", real_rename)
            store.quarantine(tmp_path, path, "unreadable")
            path.write_text("second")
        real_rename(src, dest)

    monkeypatch.setattr(set_aside.os, "rename", the_other_worker_first)
    store.quarantine(tmp_path, path, "unreadable")
    assert sorted(p.read_text() for p in (tmp_path / store.QUARANTINE_DIR).iterdir()) == ["first", "second"]


def test_a_part_with_null_keys_or_a_column_of_another_type_is_set_aside_not_a_traceback_at_the_merge(tmp_path):
    """A part-named file of the right columns but a null key or a column of another type (made by hand): the merge
    at the end of the run compared None with str, or could not unify the schemas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.merge import merge_parts

    w = Writer(tmp_path)
    w.parts(3)
    table = pq.read_table(store.list_parts(tmp_path)[0].path)
    nulls = table.set_column(0, "key", pa.array([None] * 3, pa.string()))
    other = table.set_column(table.schema.get_field_index("width"), "width", pa.array(["wide"] * 3))
    for seq, bad in enumerate((nulls, other)):
        pq.write_table(bad, tmp_path / "parts" / f"captions-w005-{seq:06d}.parquet")
    report = merge_parts([tmp_path], tmp_path / store.MERGED)
    assert report.keys == {"000000000", "000000001", "000000002"} and not report.duplicate_keys
    assert len(list((tmp_path / store.QUARANTINE_DIR).iterdir())) == 2


def test_a_key_in_several_parts_keeps_the_first_dir_then_worker_then_part(tmp_path):
    """The rule README states for merging: first --checkpoint-dir given, then lowest worker, then earliest part."""
    from hub_parts import make_rows

    from vlm_caption.merge import merge_parts

    def write(ckpt, worker, caption):
        Writer(ckpt, worker).store.write_part([{**make_rows(0, 1)[0], "vlm_caption": caption}])

    first, second = tmp_path / "a", tmp_path / "b"
    for ckpt, worker, caption in ((first, 1, "a w1"), (first, 0, "a w0 part 0"), (first, 0, "a w0 part 1"),
                                  (second, 0, "b w0")):
        write(ckpt, worker, caption)
    for dirs, kept in (([first, second], "a w0 part 0"), ([second, first], "b w0")):
        report = merge_parts(dirs, tmp_path / "merged.parquet")
        assert report.duplicate_keys == ["000000000"]
        assert pq.read_table(tmp_path / "merged.parquet").column("vlm_caption").to_pylist() == [kept]


def test_one_run_set_aside_twice_in_one_second_by_overwrite_keeps_both(tmp_path, monkeypatch):
    """A, B --overwrite, A --overwrite, B --overwrite within a second: superseded/A-TIME existed (FileExistsError)."""
    monkeypatch.setattr(store.time, "strftime", lambda fmt: "20260101T000000")
    w = Writer(tmp_path)
    for n in (1, 2):
        w.parts(n)
        w.store._set_aside(RUN)
        (tmp_path / store.RUN_JSON).write_text("{}")
    kept = sorted(p.name for p in (tmp_path / "superseded").iterdir())
    assert kept == [f"{RUN}-20260101T000000", f"{RUN}-20260101T000000-1"]
    assert [len(list((tmp_path / "superseded" / k / "parts").iterdir())) for k in kept] == [1, 1]


def test_overwrite_sets_the_old_runs_coverage_aside_with_its_parts(tmp_path):
    """Its coverage.json (--merge-only) stayed, counting the old run's keys as this run's."""
    w = Writer(tmp_path)
    w.parts(2)
    for name in ("coverage.json", "hub_coverage.json"):
        (tmp_path / name).write_text('{"captioned": 2}')
    w.store._set_aside(RUN)
    [old] = (tmp_path / "superseded").iterdir()
    assert not (tmp_path / "coverage.json").exists() and not (tmp_path / "hub_coverage.json").exists()
    assert (old / "coverage.json").exists() and (old / "hub_coverage.json").exists()


def test_a_file_where_superseded_belongs_is_kept_and_overwrite_still_sets_the_old_run_aside(tmp_path, caplog):
    """A regular file named superseded (made by hand): mkdir raised mid --overwrite, a traceback."""
    w = Writer(tmp_path)
    w.parts(2)
    (tmp_path / "superseded").write_text("notes")
    w.store._set_aside(RUN)
    assert (tmp_path / "superseded").read_text() == "notes" and not store.list_parts(tmp_path)
    [old] = (tmp_path / "superseded-1").iterdir()
    assert len(list((old / "parts").iterdir())) == 1 and "is not a folder" in caplog.text


def test_a_quarantine_folder_that_refuses_new_names_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """The free name is claimed with a new empty file before the move (two workers in one second): a read-only or
    full quarantine/ failed that claim with a bare OSError, where a failed move is one line naming the way out."""
    import errno

    from vlm_caption import set_aside
    from vlm_caption.errors import FatalError

    real_open = set_aside.os.open

    def refused(path, flags, *args):
        if store.QUARANTINE_DIR in str(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(set_aside.os, "open", refused)
    path = tmp_path / store.SUMMARY
    path.write_text("garbage")
    with pytest.raises(FatalError, match="make that folder writable") as e:
        store.quarantine(tmp_path, path, "unreadable")
    assert "\n" not in str(e.value) and path.read_text() == "garbage"
