"""Local state broken by a crash or a hand (garbage bytes, another JSON type, a directory in a file's place):
each reader warns and sets it aside or goes on without it, never a traceback and never a lost caption."""
from __future__ import annotations

import json
import logging

from hub_parts import make_rows

from vlm_caption import hub_ledger, store

SETTINGS = {"model": "tiny", "prompt": "Describe.", "max_tokens": 8}


def a_run_of_three_rows(ckpt):
    """(its settings, the store that wrote it, its run id): a dir holding one part of 3 rows, its lock let go."""
    first = store.CheckpointStore(ckpt, 0)
    run_id = first.open_run(SETTINGS, overwrite=False)
    first.write_part(make_rows(0, 3))
    first.lock.release()
    return SETTINGS, first, run_id


def test_a_ledger_with_garbage_bytes_other_json_or_a_dir_in_its_place_is_warned_about_not_fatal(tmp_path, caplog):
    good = {"repo": "r", "run_id": "x", "hub_path": "data/x/a.parquet", "worker": 0}
    path = tmp_path / store.LEDGER
    path.write_bytes(json.dumps(good).encode() + b"\n\xb7\xff\x00garbage\n[1, 2]\n\"text\"\n{\"repo\": \"r\"}\n")
    with caplog.at_level(logging.WARNING):
        assert hub_ledger.read_ledger(tmp_path) == [good]
    assert [r.getMessage().split(" line ")[1] for r in caplog.records] == [f"{n} is unreadable; ignoring it"
                                                                           for n in (2, 3, 4, 5)]
    path.unlink()
    path.mkdir()
    (path / "x").write_text("x")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert hub_ledger.read_ledger(tmp_path) == []
    assert "not a file: moved to" in caplog.text
    assert [p.name.split(".")[0] for p in (tmp_path / store.QUARANTINE_DIR).iterdir()] == ["hub_ledger"]
    hub_ledger.append_ledger(tmp_path, [good])  # a new ledger is started
    assert hub_ledger.read_ledger(tmp_path) == [good]


def test_a_preview_of_a_dir_whose_run_summary_is_garbage_or_a_list_warns_and_goes_on(tmp_path, caplog):
    from vlm_caption.preview import read_run_summary

    path = tmp_path / store.SUMMARY
    for content in (b"\xb4\xff\x00garbage", b"[1, 2, 3]", b'{"captioned": 1'):
        path.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert read_run_summary(tmp_path) == {}
        assert "run_summary.json is unreadable" in caplog.text, content
        assert path.read_bytes() == content  # a preview changes nothing in the dir


def test_an_unreadable_run_json_or_a_dir_in_its_place_is_set_aside_when_the_parts_are_re_adopted(tmp_path, caplog):
    settings, first, run_id = a_run_of_three_rows(tmp_path)
    path = tmp_path / store.RUN_JSON
    for n, broken in enumerate((b"\xb4\xff\x00garbage", None), 1):
        path.unlink()
        if broken is None:
            path.mkdir()
            (path / "x").write_text("x")
        else:
            path.write_bytes(broken)
        again = store.CheckpointStore(tmp_path, 0)
        with caplog.at_level(logging.WARNING):
            assert again.open_run(settings, overwrite=False) == run_id
        again.lock.release()
        assert again.done_keys() == {"000000000", "000000001", "000000002"}
        assert json.loads(path.read_text())["run_id"] == run_id
        assert len(list((tmp_path / store.QUARANTINE_DIR).iterdir())) == n  # the broken one kept, not overwritten
        assert "re-adopted the parts" in caplog.text


def test_a_directory_in_place_of_a_file_to_write_is_one_line_error_and_left_as_it_is(tmp_path):
    import pytest

    from vlm_caption.atomic import atomic_write_json
    from vlm_caption.errors import UsageError

    path = tmp_path / store.MERGED
    path.mkdir()
    (path / "x").write_text("kept")
    with pytest.raises(UsageError, match=r"all_captions.parquet is a directory, not a file: move it aside"):
        atomic_write_json(path, {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == [store.MERGED] and (path / "x").read_text() == "kept"


def test_a_run_json_whose_dir_id_is_edited_into_a_number_is_set_aside_and_the_parts_re_adopted(tmp_path):
    """Its dir_id went into every part's metadata: 'int' object has no attribute 'encode' at the first part."""
    settings, first, run_id = a_run_of_three_rows(tmp_path)
    path = tmp_path / store.RUN_JSON
    path.write_text(json.dumps({**json.loads(path.read_text()), "dir_id": 5}))
    again = store.CheckpointStore(tmp_path, 0)
    assert again.open_run(settings, overwrite=False) == run_id
    again.write_part(make_rows(3, 2))
    again.lock.release()
    assert again.dir_id == first.dir_id == json.loads(path.read_text())["dir_id"]
    assert len(list((tmp_path / store.QUARANTINE_DIR).iterdir())) == 1


def test_a_file_in_place_of_the_locks_dir_is_one_line_error_and_left_as_it_is(tmp_path):
    """open_lock's mkdir raised FileExistsError: a traceback before the model loaded."""
    import pytest

    from vlm_caption.errors import UsageError

    (tmp_path / "locks").write_text("x")
    with pytest.raises(UsageError, match="locks is a file, not a directory"):
        store.CheckpointStore(tmp_path, 0).open_run({"model": "tiny", "prompt": "Describe."}, overwrite=False)
    assert (tmp_path / "locks").read_text() == "x"


def test_a_run_json_whose_prompts_are_edited_into_other_types_is_set_aside_not_a_traceback_at_the_end(
        sample_data_dir, tmp_path):
    """prompts / prompt_order / json_fields of another type: run_specs raised at the end of every run (after the
    captioning), at each --merge-only and each preview. Now it reads as unreadable: the run re-adopts its parts."""
    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.errors import EXIT_OK

    args = dummy_args(sample_data_dir, tmp_path / "c", "--max-images", "4")
    assert main(args) in (EXIT_OK, 3)
    path = tmp_path / "c" / store.RUN_JSON
    good = json.loads(path.read_text())
    edits = ({"prompts": 5}, {"prompts": {"a": 3}}, {"prompt_order": "ab"}, {"json_fields": 7}, {"prompt": ["x"]},
             {"template_value_chars": "5"})
    for edit in edits:
        path.write_text(json.dumps({**good, **edit}))
        assert store.read_run_json_safe(path.parent)[1] == "unreadable (not a run description)", edit
    for n, edit in enumerate(edits[::3], 1):  # a run heals it (two of them: each run costs seconds)
        path.write_text(json.dumps({**good, **edit}))
        assert main(args) in (EXIT_OK, 3)  # (sample_data_dir holds broken images: their failures are exit 0 or 3)
        assert json.loads(path.read_text()) == {**good, "created": json.loads(path.read_text())["created"]}
        assert len(list((path.parent / store.QUARANTINE_DIR).glob("run.json.*"))) == n


def test_overwrite_on_a_dir_that_lost_run_json_re_adopts_its_own_runs_parts(tmp_path):
    """With run.json there, --overwrite of the same settings keeps the parts; with it lost, it set them aside and
    captioned every key again. Parts of another run are still set aside."""
    settings, first, run_id = a_run_of_three_rows(tmp_path)
    (tmp_path / store.RUN_JSON).unlink()
    again = store.CheckpointStore(tmp_path, 0)
    assert again.open_run(settings, overwrite=True) == run_id
    again.lock.release()
    assert again.done_keys() == {"000000000", "000000001", "000000002"} and not (tmp_path / "superseded").exists()
    (tmp_path / store.RUN_JSON).unlink()
    other = store.CheckpointStore(tmp_path, 0)
    assert other.open_run({**settings, "prompt": "Name the colours."}, overwrite=True) != run_id
    other.lock.release()
    assert other.done_keys() == set() and len(list((tmp_path / "superseded").iterdir())) == 1


def test_a_file_in_place_of_a_state_dir_is_one_line_before_any_work(tmp_path):
    """parts/ or failures/ a file: every image was captioned, then the first write failed (exit 1, the work
    lost); locks/ a file: a FileExistsError traceback."""
    import pytest

    from vlm_caption.errors import UsageError

    for name in (store.PARTS_DIR, store.FAILURES_DIR, "locks"):
        ckpt = tmp_path / name
        ckpt.mkdir()
        (ckpt / name).write_text("by hand")
        with pytest.raises(UsageError, match=f"{name} is a file, not a directory: move it aside"):
            store.CheckpointStore(ckpt, 0)
        assert (ckpt / name).read_text() == "by hand"


def test_a_full_disk_at_the_merge_is_one_line_and_keeps_the_parts(tmp_path, monkeypatch):
    """Parts fit, the merge did not: the run ended in a pyarrow OSError traceback."""
    import pyarrow.parquet as pq
    import pytest

    from vlm_caption.errors import FatalError
    from vlm_caption.merge import merge_parts

    writer = store.CheckpointStore(tmp_path, 0)
    writer.write_part([{"key": "000000001", "vlm_caption": "a"}])

    def full(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(FatalError, match="could not write .*all_captions.parquet: .*File too large; every caption"):
        merge_parts([tmp_path], tmp_path / store.MERGED)
    assert not (tmp_path / store.MERGED).exists() and len(store.list_parts(tmp_path)) == 1
