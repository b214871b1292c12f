"""--dry-run of a pushing run plans from what the Hub already holds, as the real run that follows skips it."""
from __future__ import annotations

import json
import re
import time

from batched_image_inference import main
from dummy_runs import clear_launch_env
from vlm_caption import store
from vlm_caption.errors import EXIT_OK


def hub_args(data, ckpt, stub, *extra):
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", "tester/dryrun", "--hub-endpoint", stub.endpoint, "--min-push-interval", "0",
            "--batch-size", "4", "--checkpoint-every", "8", "--num-loader-workers", "1", "--max-tokens", "40", *extra]


def planned(out: str) -> tuple[int, int]:
    found = re.search(r"to do (\d+), already done (\d+)", out)
    return int(found.group(1)), int(found.group(2))


def test_a_fresh_dir_s_plan_counts_the_keys_the_hub_publishes(hub_stub, sample_data_dir, tmp_path, monkeypatch,
                                                              capsys):
    """A second machine, or a fresh dir after a trial: the plan said "to do 45, already done 0" and an
    estimate for 45 images, and the real run captioned none of them (the Hub held them)."""
    clear_launch_env(monkeypatch)
    assert main(hub_args(sample_data_dir, tmp_path / "first", hub_stub, "--max-images", "20")) == EXIT_OK
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    commits = hub_stub.commits_applied
    assert main(hub_args(sample_data_dir, fresh, hub_stub, "--dry-run")) == EXIT_OK
    out = capsys.readouterr().out
    assert not fresh.exists() and hub_stub.commits_applied == commits  # a plan writes nothing, here or there
    todo, done = planned(out)
    assert "on the Hub only" in out and "note:" not in out, out

    main(hub_args(sample_data_dir, fresh, hub_stub))
    this = json.loads((fresh / store.SUMMARY).read_text())["this_run"]
    assert todo == this["captioned"] + sum(this["failed_by_stage"].values()), out
    assert done == this["skipped_already_done"] > 0, out


def test_a_hub_that_cannot_be_read_leaves_a_note_not_a_false_plan(hub_stub, sample_data_dir, tmp_path, monkeypatch,
                                                                  capsys):
    clear_launch_env(monkeypatch)
    hub_stub.inject("GET", "/api/datasets/", "503", times=100)
    started = time.monotonic()
    assert main(hub_args(sample_data_dir, tmp_path / "fresh", hub_stub, "--dry-run")) == EXIT_OK
    out = capsys.readouterr().out
    assert "note: keys already on the Hub are not counted (the Hub could not be read" in out, out
    assert time.monotonic() - started < 60  # three tries, not a run's six with a minute's backoff


def test_a_repo_not_created_yet_and_no_push_read_nothing_more(hub_stub, sample_data_dir, tmp_path, monkeypatch,
                                                              capsys):
    clear_launch_env(monkeypatch)
    assert main(hub_args(sample_data_dir, tmp_path / "a", hub_stub, "--dry-run")) == EXIT_OK
    out = capsys.readouterr().out
    assert planned(out)[1] == 0 and "note:" not in out, out  # the first run creates the repo
    reads = len(hub_stub.requests)
    no_push = [a for a in hub_args(sample_data_dir, tmp_path / "b", hub_stub, "--dry-run")
               if a not in ("--hf-repo", "tester/dryrun", "--hub-endpoint", hub_stub.endpoint)]
    assert main([*no_push, "--no-push"]) == EXIT_OK
    assert len(hub_stub.requests) == reads and planned(capsys.readouterr().out)[1] == 0


def test_a_dry_run_plans_from_the_dirs_kept_hub_keys_reading_no_file_again_and_writing_none(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, capsys, caplog):
    """The dry run read every published file's key column from the Hub at each call (~200 files for 400K rows),
    though the dir keeps them (hub_key_cache.py). It reads what is kept, stores nothing, and an unreadable entry
    is warned about and left for the real run to set aside."""
    clear_launch_env(monkeypatch)
    ckpt = tmp_path / "ckpt"
    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--max-images", "20")) == EXIT_OK
    capsys.readouterr()

    def data_reads():
        return sum(name.startswith("data/") for name, _, _ in hub_stub.downloads)

    def listing(root):
        return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))

    files = data_reads()
    kept = listing(ckpt)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--dry-run")) == EXIT_OK
    assert planned(capsys.readouterr().out)[1] > 0 and data_reads() == files and listing(ckpt) == kept

    fresh = tmp_path / "fresh"  # no kept keys: read from the Hub, and still nothing written
    assert main(hub_args(sample_data_dir, fresh, hub_stub, "--dry-run")) == EXIT_OK
    assert planned(capsys.readouterr().out)[1] > 0 and data_reads() > files and not fresh.exists()

    entry = next((ckpt / "hub_keys").glob("*.parquet"))
    entry.write_bytes(b"not parquet")
    files, kept = data_reads(), listing(ckpt)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--dry-run")) == EXIT_OK
    assert planned(capsys.readouterr().out)[1] > 0 and data_reads() == files + 1 and listing(ckpt) == kept
    assert f"{entry} is an unreadable Hub key cache entry" in caplog.text
