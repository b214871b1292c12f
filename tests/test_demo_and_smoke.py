"""The demo and test_pipeline.py (the user's smoke tests) end to end with the tiny model, offline.

Subprocesses only where the command line itself is under test (run_captioning.sh, the script's exit
code); the rest calls main() in-process, which is seconds cheaper per call.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parts import assert_hub_matches

from vlm_caption import demo as demo_module
from vlm_caption import store
from vlm_caption.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke():
    """test_pipeline.py as a module, under another name so pytest never mistakes it for a test module."""
    spec = importlib.util.spec_from_file_location("smoke_cli", REPO / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def lines_starting(out: str, word: str) -> list[str]:
    return [line.split(":")[0].split()[1] for line in out.splitlines() if line.startswith(word + " ")]


def part_stamps(ckpt: Path) -> dict[str, int]:
    return {p.path.name: p.path.stat().st_mtime_ns for p in store.list_parts(ckpt)}


# ---------------------------------------------------------------- the demo

def test_demo_end_to_end_then_rerun_resumes(tmp_path, capsys):
    # A relative --demo-dir from another cwd: run_captioning.sh must keep the user's working directory.
    proc = subprocess.run(["bash", str(REPO / "run_captioning.sh"), "--demo", "--demo-dir", "demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    demo = tmp_path / "demo"
    ckpt = demo / "checkpoints"
    for path in [demo / "model" / "config.json", demo / "data" / "full_metadata.parquet", ckpt / store.MERGED,
                 ckpt / store.SUMMARY, ckpt / store.RUN_JSON, demo / "preview.html"]:
        assert path.is_file(), path
    assert store.list_parts(ckpt)
    invalid = pq.read_table(demo / "data" / "invalid_images.parquet").num_rows
    meta_rows = pq.read_table(demo / "data" / "full_metadata.parquet").num_rows
    assert invalid > 0 and pq.read_table(ckpt / store.MERGED).num_rows == meta_rows - invalid
    out = proc.stdout
    assert "NOISE" in out and "random weights" in out
    assert "google/gemma-3-4b-it" in out and "hf auth login" in out
    assert f"{invalid} images failed as intended" in out
    assert "preview.html" in out and store.MERGED in out

    # Rerun in-process: everything is done, nothing is rewritten, and it still succeeds.

    before = part_stamps(ckpt)
    assert demo_module.main(["--dir", str(demo)]) == 0
    rerun = capsys.readouterr().out
    assert "reusing tiny model" in rerun and "reusing sample data" in rerun
    assert "captioned 0 images" in rerun
    assert part_stamps(ckpt) == before

    # --n of the sample it holds reuses it; another --n is one line, never a silent reuse or rebuild.
    rows = demo_module.DEFAULT_ROWS
    assert demo_module.main(["--dir", str(demo), "--n", str(rows)]) == 0
    assert "reusing sample data" in capsys.readouterr().out
    with pytest.raises(UsageError, match=f"holds the sample of {rows} rows, not --n {rows + 8}"):
        demo_module.main(["--dir", str(demo), "--n", str(rows + 8)])
    assert part_stamps(ckpt) == before


def test_demo_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad in ("afile", "afile/sub"):
        with pytest.raises(UsageError, match="is a file"):
            demo_module.main(["--dir", str(tmp_path / bad)])


def test_a_second_demo_on_a_busy_dir_is_refused_and_builds_nothing(tmp_path):
    """Two demos at once on one dir built into the same tmp dirs; the loser said "model exists but is incomplete
    (not built by the demo?); remove it", i.e. to delete what the other was building."""
    import os

    from vlm_caption import locks

    held = locks.hold_exclusive(tmp_path / "d" / "demo.lock", "the first demo")
    try:
        with pytest.raises(UsageError, match=r"--demo-dir .*/d is in use by another process \(pid "):
            demo_module.main(["--dir", str(tmp_path / "d")])
    finally:
        os.close(held)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["demo.lock"]


def test_run_captioning_passes_flags_through_from_another_cwd(tmp_path, sample_data_dir):
    (tmp_path / "data").symlink_to(sample_data_dir)
    proc = subprocess.run(["bash", str(REPO / "run_captioning.sh"), "--dry-run", "--data-dir", "data",
                           "--checkpoint-dir", "ckpt", "--no-push", "--max-images", "5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selected 5" in proc.stdout and "to do 5" in proc.stdout


# ---------------------------------------------------------------- test_pipeline.py

def test_smoke_skip_model(smoke, sample_data_dir, capsys):
    assert smoke.main(["--skip-model", "--data-dir", str(sample_data_dir)]) == 0
    out = capsys.readouterr().out
    assert lines_starting(out, "PASS") == ["data_dir_layout", "metadata_columns", "open_images", "output_schema"]
    assert not lines_starting(out, "FAIL")
    assert "vlm_caption" in out and "caption_finish" in out  # the schema is printed


def test_smoke_reads_shard_metadata_with_md5_as_source_md5(smoke, sample_data_dir, tmp_path, capsys):
    """Without full_metadata.parquet the captioner reads the shard parquets, where md5 is source_md5."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    (data / "full_metadata.parquet").unlink()
    assert smoke.main(["--skip-model", "--data-dir", str(data)]) == 0, capsys.readouterr().out
    assert "metadata_columns" in lines_starting(capsys.readouterr().out, "PASS")


def test_an_unreadable_metadata_file_is_one_line_in_the_smoke_test_and_the_preview(smoke, sample_data_dir, tmp_path,
                                                                                   capsys):
    """Both read the data dir's metadata as the captioner does: a corrupt file is a one-line failure there."""
    import shutil

    from vlm_caption.preview import write_preview

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    (data / "full_metadata.parquet").write_bytes(b"PAR1 cut short")
    assert smoke.main(["--skip-model", "--data-dir", str(data)]) != 0
    out = capsys.readouterr().out
    assert "FAIL metadata_columns: cannot read metadata" in out and "Traceback" not in out, out
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    pq.write_table(pa.table({"key": ["000000000"], "url": ["http://127.0.0.1/a.jpg"]}), ckpt / "all_captions.parquet")
    with pytest.raises(UsageError, match="cannot read metadata"):
        write_preview(ckpt, tmp_path / "p.html", data_dir=data)


def test_smoke_caption_with_tiny_model(smoke, sample_data_dir, capsys):
    assert smoke.main(["--num-images", "3", "--tiny", "--max-tokens", "8", "--data-dir", str(sample_data_dir)]) == 0
    out = capsys.readouterr().out
    assert {"tiny_model", "caption", "merged_output"} <= set(lines_starting(out, "PASS"))
    assert not lines_starting(out, "FAIL")


def test_smoke_full_push_to_local_hub(smoke, sample_data_dir, hub_stub, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"  # given, so it is kept and the Hub can be compared with it
    code = smoke.main(["--full", "--push", "--tiny", "--num-images", "5", "--max-tokens", "8",
                       "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(ckpt),
                       "--hub-endpoint", hub_stub.endpoint, "--hf-repo", "tester/smoke"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert {"hub_access", "caption", "merged_output", "resume", "push"} <= set(lines_starting(out, "PASS"))
    rows = assert_hub_matches(hub_stub, "tester/smoke", ckpt)
    assert rows and len(rows) == pq.read_table(ckpt / store.MERGED).num_rows
    assert "README.md" in hub_stub.repo_files("tester/smoke")


def test_smoke_missing_data_dir_fails_with_exit_1(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "test_pipeline.py"), "--skip-model", "--data-dir", "nope"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL data_dir_layout: nope does not exist" in proc.stdout
    assert "SKIP metadata_columns" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--push", "--tiny"], ["--skip-model", "--tiny"], ["--tiny", "--model", "x"],
                                  ["--num-images", "0"], ["--tiny", "--max-tokens", "0"],
                                  ["--tiny", "--checkpoint-dir", str(REPO / "README.md")],
                                  ["--tiny", "--checkpoint-dir", "/proc/self/ckpt"]])  # unwritable even to root
def test_smoke_usage_errors_exit_2(smoke, argv, capsys):
    with pytest.raises(SystemExit) as e:
        smoke.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_smoke_usage_errors_exit_2_before_any_check(smoke, tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")  # a kept dir: a second --tiny run was a FAIL naming --overwrite
    for argv in (["--tiny", "--checkpoint-dir", str(tmp_path)], ["--full", "--push", "--tiny", "--hf-repo", "a/b/c"]):
        with pytest.raises(SystemExit) as e:
            smoke.main(argv)
        out, err = capsys.readouterr()
        assert e.value.code == 2 and "error:" in err and "PASS" not in out, (argv, out, err)


def test_another_n_on_a_demo_dir_names_the_flag_run_captioning_takes(tmp_path):
    """`./run_captioning.sh --demo --n 30` on a dir of 24 rows said "pass another --dir": run_captioning.sh
    documents --demo-dir (--dir is only the module's alias)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / demo_module.DATA_DONE_MARKER).write_text('{"rows_in": 24}')
    with pytest.raises(UsageError, match=r"24 rows, not --n 30: .*another --demo-dir\)"):
        demo_module.ensure_data(tmp_path, 30)


def test_the_resume_check_counts_one_image_in_the_singular(tmp_path, monkeypatch):
    """`test_pipeline.py --full --num-images 2` on a sample with one broken image said 'rerun skipped 1 done images'."""
    import json
    from types import SimpleNamespace

    from vlm_caption import smoke

    monkeypatch.setattr(smoke, "run_captioning", lambda ctx, resume: None)
    (tmp_path / store.SUMMARY).write_text(json.dumps({"this_run": {"captioned": 0, "skipped_already_done": 1}}))
    assert smoke.check_resume(SimpleNamespace(ckpt=tmp_path)) == "rerun skipped 1 done image, wrote nothing"


def test_smoke_says_the_failures_it_named_were_in_its_removed_temp_dir(smoke, sample_data_dir, capsys):
    """The run's end says "reasons in <tmp>/checkpoints/failures; --retry-failed tries them again", then the smoke
    test removed that dir: the summary says so, and how to keep it."""
    assert smoke.main(["--num-images", "40", "--tiny", "--max-tokens", "4", "--data-dir", str(sample_data_dir)]) == 0
    out = capsys.readouterr().out
    assert "reasons in " in out, out[-2000:]  # the sample data holds broken images: some were recorded as failed
    named = out.split("reasons in ", 1)[1].split(")", 1)[0]
    assert not Path(named).exists() and "now removed (--checkpoint-dir DIR keeps them)" in out
