"""img2dataset's worker tracebacks (traceback.print_exc() in its sample and shard loops) go to a log file: a disk
that filled up mid-download printed a screen of identical ENOSPC tracebacks above the one line saying what to do.
A write failing for want of space prints nothing more than img2dataset's own line; any other error still prints
its last line and the log's path, so it stays visible. The end-to-end runs: test_download_disk.py (a full tmpfs)
and test_download_exit_codes.py (a file size limit)."""
from __future__ import annotations

import errno
import os

from vlm_caption.download_workers import ENTRY_MARK, ErrorLogs, WorkerErrors


def _raise_and_report(errors: WorkerErrors, exc: BaseException) -> None:
    try:
        raise exc
    except type(exc):
        errors.print_exc()


def test_a_write_failing_for_want_of_space_goes_to_the_log_alone(tmp_path, capsys):
    log = tmp_path / "download_errors.log"
    _raise_and_report(WorkerErrors((str(log),)), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    text = log.read_text()
    assert text.startswith(ENTRY_MARK) and "Traceback (most recent call last):" in text
    assert "OSError: [Errno 28] No space left on device" in text


def test_an_unexpected_error_prints_its_last_line_and_the_log(tmp_path, capsys):
    log = tmp_path / "download_errors.log"
    _raise_and_report(WorkerErrors((str(log),)), ValueError("a bug in a worker"))
    err = capsys.readouterr().err
    assert err == f"img2dataset worker error: ValueError: a bug in a worker (traceback in {log})\n"
    assert "Traceback (most recent call last):" in log.read_text()


def test_a_log_that_cannot_be_written_falls_back_and_then_says_so(tmp_path, capsys):
    unwritable = tmp_path / "a_dir"
    unwritable.mkdir()  # os.open of a directory for writing fails
    fallback = tmp_path / "fallback.log"
    _raise_and_report(WorkerErrors((str(unwritable), str(fallback))), KeyError("k"))
    assert f"(traceback in {fallback})" in capsys.readouterr().err
    assert "KeyError: 'k'" in fallback.read_text()
    _raise_and_report(WorkerErrors((str(unwritable),)), KeyError("k"))
    assert capsys.readouterr().err == "img2dataset worker error: KeyError: 'k' (its traceback could not be saved)\n"


def test_the_note_counts_this_run_s_entries_and_an_empty_log_is_not_left(tmp_path):
    (tmp_path / "download_errors.log").write_text(f"{ENTRY_MARK} (an earlier run)\nTraceback ...\n")
    logs = ErrorLogs(tmp_path)
    assert logs.note() is None  # the earlier run's entry is not this run's
    _raise_and_report(logs.workers, OSError(errno.ENOSPC, "full"))
    _raise_and_report(logs.workers, OSError(errno.ENOSPC, "full"))
    assert logs.note() == (f"the tracebacks of img2dataset's 2 worker errors are in {tmp_path / 'download_errors.log'}")

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    logs = ErrorLogs(fresh)
    (fresh / "download_errors.log").touch()  # what a worker whose write failed leaves
    assert logs.note() is None and not (fresh / "download_errors.log").exists()


def test_img2dataset_s_own_shard_error_goes_through_the_log(tmp_path, capsys, monkeypatch):
    """The hook as img2dataset's worker runs it: its Downloader catches the shard's error, prints its own line
    (stdout) and calls print_exc, which now writes the log instead of the terminal."""
    from img2dataset import downloader as i2d

    from vlm_caption.download_client import BoundedDownloader

    monkeypatch.setattr(i2d, "traceback", i2d.traceback)  # the call swaps both in this process: restored after
    monkeypatch.setattr(i2d, "download_image", i2d.download_image)
    shard = tmp_path / "shard.feather"
    shard.write_bytes(b"not an arrow file")
    log = tmp_path / "download_errors.log"
    downloader = BoundedDownloader(*[None] * 14, user_agent_token=None, disallowed_header_directives=None,
                                   max_bytes=1 << 20, errors=WorkerErrors((str(log),)))
    assert downloader((0, str(shard))) == (False, (0, str(shard)))
    captured = capsys.readouterr()
    assert "shard 0 failed with error" in captured.out  # img2dataset's own line stays
    assert "Traceback" not in captured.err
    [line] = captured.err.splitlines()
    assert line.startswith("img2dataset worker error: pyarrow.lib.ArrowInvalid: ") and line.endswith(
        f"(traceback in {log})")
    assert "in download_shard" in log.read_text()


def test_without_a_log_img2dataset_prints_its_tracebacks_as_before(tmp_path, capsys, monkeypatch):
    from img2dataset import downloader as i2d

    from vlm_caption.download_client import BoundedDownloader

    monkeypatch.setattr(i2d, "traceback", i2d.traceback)
    monkeypatch.setattr(i2d, "download_image", i2d.download_image)
    shard = tmp_path / "shard.feather"
    shard.write_bytes(b"not an arrow file")
    BoundedDownloader(*[None] * 14, user_agent_token=None, disallowed_header_directives=None, max_bytes=1,
                      errors=None)((0, str(shard)))
    assert "Traceback (most recent call last):" in capsys.readouterr().err


def test_a_data_dir_log_full_from_earlier_runs_is_rotated_not_bypassed(tmp_path, monkeypatch):
    """The cap was on the file forever: once earlier runs had filled download_errors.log, every later run put its
    tracebacks in a new file of the system temp dir (up to the cap each, never removed). A full log is kept as .1
    and this run's entries go to the data dir again."""
    import tempfile

    from vlm_caption.download_workers import LOG_CAP

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "data"
    out.mkdir()
    with open(out / "download_errors.log", "wb") as f:
        f.truncate(LOG_CAP)  # sparse: earlier runs' entries
    logs = ErrorLogs(out)
    _raise_and_report(logs.workers, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing in the temp dir
    assert (out / "download_errors.log").read_text().startswith(ENTRY_MARK)
    assert (out / "download_errors.log.1").stat().st_size == LOG_CAP
    assert logs.note() == f"the tracebacks of img2dataset's 1 worker error are in {out / 'download_errors.log'}"


def test_a_close_that_fails_does_not_replace_the_error_being_reported(tmp_path, monkeypatch, capsys):
    """NFS may report a delayed EIO at close(): raised from print_exc, it replaced the error img2dataset's except
    block was reporting (and could end the worker)."""
    from vlm_caption import download_workers

    real_close = os.close

    class FailingClose:  # the module's `os`, whose close() reports EIO after closing
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def close(fd):
            real_close(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    log = tmp_path / "download_errors.log"
    monkeypatch.setattr(download_workers, "os", FailingClose())
    _raise_and_report(WorkerErrors((str(log),)), ValueError("the error being reported"))
    monkeypatch.undo()
    assert "ValueError: the error being reported" in log.read_text()
    assert "the error being reported" in capsys.readouterr().err


def test_an_empty_fallback_log_is_not_left_in_the_temp_dir(tmp_path):
    """The data dir and the temp dir on one full disk: the worker's open() of the fallback made an empty file, the
    write failed, and the file stayed in the system temp dir after every such run."""
    logs = ErrorLogs(tmp_path)
    logs.fallback.touch()  # what a worker whose write failed there leaves
    try:
        assert logs.note() is None and not logs.fallback.exists()
    finally:
        logs.fallback.unlink(missing_ok=True)


def test_past_ten_shards_the_line_says_how_many_more_and_where_they_are_listed(tmp_path):
    """With more than 10 such shards (an outage over part of a 40-shard download) the line named 10 and "...":
    the operator deleted those, reran, and the rest were never fetched again (exit 3 until they dug in the json)."""
    from vlm_caption.download_summary import stats_files

    line = stats_files(tmp_path, list(range(12)))
    assert line.count("_stats.json") == 10 and line.startswith(str(tmp_path / "images" / "00000_stats.json"))
    assert line.endswith(f" and 2 more (shards_with_retryable in {tmp_path / 'download_summary.json'})"), line
    assert " more" not in stats_files(tmp_path, list(range(10)))
