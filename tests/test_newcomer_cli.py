"""What a newcomer meets first, run as they would run it: --help of the shell scripts, the scripts started with
a Python that lacks the dependencies (outside the venv), and rough edges of batched_image_inference.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_exactly_once import cli, data, ok, one_line_error  # noqa: F401  (cli, data: fixtures)

from vlm_caption import store
from vlm_caption.cli import missing_dependency_line

REPO = Path(__file__).resolve().parent.parent
SETUP_HINT = "run ./setup.sh, then `source vlm-caption/bin/activate` (or use ./run_captioning.sh)"


def _run(cmd: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_setup_help_prints_usage_and_sets_up_nothing(tmp_path):
    shutil.copy(REPO / "setup.sh", tmp_path)
    shutil.copy(REPO / "requirements.txt", tmp_path)
    for flag in ("--help", "-h"):
        proc = _run(["bash", str(tmp_path / "setup.sh"), flag], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ./setup.sh") and "1-3 minutes" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.txt", "setup.sh"]  # no venv made
    bad = _run(["bash", str(tmp_path / "setup.sh"), "--bogus"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_setup_without_the_package_index_says_so_and_run_captioning_retries_it(tmp_path):
    """pip failing (no network here, PIP_INDEX_URL on a closed local port) ends setup.sh with its own line;
    run_captioning.sh then sees the venv's install unfinished (no stamp) and runs setup.sh again, instead of
    starting a script that dies on a missing module."""
    for name in ("setup.sh", "run_captioning.sh", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHON": sys.executable}
    first = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "setup.sh: error: pip could not install the requirements" in first.stderr
    assert (tmp_path / "vlm-caption" / "bin" / "python").is_file()  # half made: a venv without the packages
    again = subprocess.run(["bash", "run_captioning.sh", "--demo"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and "install is unfinished" in again.stderr
    assert "pip could not install the requirements" in again.stderr and "Traceback" not in again.stderr


def test_setup_shows_its_phases():
    text = (REPO / "setup.sh").read_text()
    assert "--quiet" not in text  # pip's own output shows progress during the minutes of the first install
    assert 'step 3 "installing requirements.txt into ./$VENV: about 1-3 minutes' in text


def test_run_captioning_help_lists_demo_even_without_a_venv(tmp_path):
    shutil.copy(REPO / "run_captioning.sh", tmp_path)  # no venv and no setup.sh next to it
    proc = _run(["bash", str(tmp_path / "run_captioning.sh"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--demo" in proc.stdout and "--demo-dir" in proc.stdout and "No venv yet" in proc.stdout
    assert not (tmp_path / "vlm-caption").exists()


@pytest.mark.parametrize("arg", ["--demo-dir", "--n=3"])
def test_a_demo_flag_without_demo_says_to_add_it_before_any_setup(tmp_path, arg):
    shutil.copy(REPO / "run_captioning.sh", tmp_path)  # no venv: nothing is installed for a mistake
    proc = _run(["bash", str(tmp_path / "run_captioning.sh"), arg, "x", "--max-images", "2"], cwd=tmp_path)
    flag = arg.split("=")[0]
    assert proc.returncode == 2 and proc.stderr == (f"run_captioning.sh: error: {flag} is a flag of --demo: add "
                                                    "--demo (see ./run_captioning.sh --help)\n"), proc.stderr
    assert not (tmp_path / "vlm-caption").exists()


@pytest.mark.skipif(not (REPO / "vlm-caption" / "bin" / "python").is_file(), reason="no ./vlm-caption venv here")
def test_run_captioning_help_lists_demo_and_the_script_flags(tmp_path):
    proc = _run(["bash", str(REPO / "run_captioning.sh"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--demo" in proc.stdout and "--max-images" in proc.stdout


@pytest.mark.parametrize("script, args", [
    ("batched_image_inference.py", ["--help"]),
    ("download_data.py", ["--source", "rows.csv", "--output", "OUT"]),
    ("test_pipeline.py", ["--help"]),
])
def test_scripts_without_the_dependencies_say_run_setup(script, args, tmp_path):
    """`python -S` leaves the venv's site-packages out: as if run with a system python3 lacking torch etc."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = _run([sys.executable, "-S", script, *args], cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"{script}: error: the package ") and SETUP_HINT in proc.stderr


@pytest.mark.parametrize("module", ["demo", "preview"])
def test_modules_run_with_python_m_without_the_dependencies_say_run_setup(module, tmp_path):
    proc = _run([sys.executable, "-S", "-m", f"vlm_caption.{module}", "ckpt"], cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"python -m vlm_caption.{module}: error: the package ") and SETUP_HINT in proc.stderr


def test_our_own_missing_module_keeps_its_traceback():
    assert missing_dependency_line(ModuleNotFoundError("x", name="vlm_caption.nope")) is None
    assert missing_dependency_line(ModuleNotFoundError("x", name="torch.cuda"), prog="p").startswith(
        "p: error: the package 'torch' is not installed")


# ---------------------------------------------------------------- newcomer rough edges met on the way


def test_shards_that_do_not_exist_are_a_usage_error(cli, tmp_path):
    line = one_line_error(cli.run("s", "--shards", "7-9", "--no-push"))
    assert "--shards 7-9: no such shard; the data dir has shard(s) 0-3" in line


def test_generation_errors_exit_3_decode_errors_exit_0(cli, data, tmp_path, monkeypatch):
    from vlm_caption import dummy_backend

    ok(cli.run("g", "--no-push"))  # clean data: 0
    # A backend whose generate fails for one key: a retryable failure, exit 3 until --retry-failed fixes it.
    boom = tmp_path / "boom.py"
    boom.write_text("import runpy, sys\nfrom vlm_caption import dummy_backend as d\nreal = d.DummyBackend._caption\n"
                    "def bad(self, key, stats):\n    if key == '000005': raise RuntimeError('kaputt')\n"
                    "    return real(self, key, stats)\nd.DummyBackend._caption = bad\n"
                    "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = cli.args("g2", "--no-push")
    proc = subprocess.run([args[0], str(boom), *args[1:]], env={**cli.env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    [record] = [r for f in store.list_failure_files(tmp_path / "g2") for r in pq.read_table(f.path).to_pylist()]
    assert record["stage"] == "generate" and "kaputt" in record["error"]
    assert cli.run("g2", "--no-push").returncode == 3  # recorded, skipped, still worth retrying
    ok(cli.run("g2", "--no-push", "--retry-failed"))  # retried and captioned: complete, 0
    assert dummy_backend  # the module the wrapper patches


def test_a_local_model_dir_typed_two_ways_is_one_run(cli, tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    ok(cli.run("p", "--no-push", "--model", "m", "--max-images", "4"))  # relative to the cwd (tmp_path)
    ok(cli.run("p", "--no-push", "--model", str(tmp_path / "m")))  # absolute: the same run, resumed
    assert json.loads((tmp_path / "p" / store.RUN_JSON).read_text())["model"] == str((tmp_path / "m").resolve())


def test_a_model_dir_without_a_model_is_one_line_before_any_work(cli, tiny_model_dir, tmp_path):
    """--model pointed at the model's parent dir (demo instead of demo/model): one line at once, no dir made,
    not transformers' "Unrecognized processing class" after the data scan."""
    (tmp_path / "demo").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "demo" / "model")
    line = one_line_error(cli.run("nm", "--no-push", "--model", "demo", "--backend", "transformers"))
    assert "--model demo is a directory without a config.json" in line and "demo/model" in line
    assert not (tmp_path / "nm").exists()
    # a typo beside it: said at once, not a Hub id tried after the run's dir was made
    line = one_line_error(cli.run("nm", "--no-push", "--model", "demo/modl", "--backend", "transformers"))
    assert "--model demo/modl is not a directory, and demo/ holds local models: demo/model" in line
    assert not (tmp_path / "nm").exists()


def test_output_piped_into_a_reader_that_stopped_is_no_traceback(cli, tmp_path):
    """`--dry-run | head -1`: the pipe closes under the script; it ends as head's writers do (141, SIGPIPE), silently,
    not with a BrokenPipeError traceback and exit 1. A run's work is on disk before its summary is printed."""
    import os

    for name, extra in (("bp", ("--dry-run",)), ("bp2", ("--max-images", "4"))):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write
        proc = subprocess.run(cli.args(name, "--no-push", *extra), env=cli.env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path)
        os.close(write_end)
        assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "bp2" / store.MERGED).is_file() and len(store.list_parts(tmp_path / "bp2")) == 1


def test_merge_only_of_one_dir_named_twice_is_one_line_not_every_key_duplicated(cli, tmp_path):
    ok(cli.run("m", "--no-push"))
    ok(cli.run("m", "--merge-only"))
    # (a glob and a name of one dir): before, every key counted as captioned twice, exit 4
    line = one_line_error(cli.run("m", "--merge-only", "--checkpoint-dir", "./m/"))  # cli gives tmp_path/m first
    assert "--checkpoint-dir m is given twice (or by another path): give each dir once" in line


def test_unreachable_hub_fails_fast_with_one_line(cli, tmp_path):
    env = {**cli.env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: refused at once
    args = cli.args("u", "--no-push", "--model", "google/gemma-3-4b-it", "--backend", "transformers")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr  # one probe, not from_pretrained's minutes of retries
    assert "loading model google/gemma-3-4b-it" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "unreachable" in errors[0] and "not in the local cache" in errors[0]


def test_checkpoint_dir_given_twice_keeps_both_and_bad_repo_names_fail_even_without_push(cli, tmp_path):
    line = one_line_error(cli.run("a", "--checkpoint-dir", str(tmp_path / "b"), "--no-push"))
    assert "only allowed with --merge-only" in line
    assert "invalid Hub repo id" in one_line_error(cli.run("a", "--no-push", repo="bad name!!"))


def test_dry_run_says_what_the_run_will_do_and_rates_leave_out_model_loading(cli, tmp_path):
    ckpt = tmp_path / "d"
    ok(cli.run("d", "--no-push", "--max-images", "8"))
    summary = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]
    assert summary["captioning_img_per_s"] > 0 and summary["img_per_s"] > 0  # steady rate reported on its own
    out = ok(cli.run("d", "--no-push", "--dry-run", "--max-tokens", "9"))  # other settings, the dir holds work
    assert "a real run needs --overwrite" in out and "img/s" in out
    assert "to do 40, already done 0" in out  # the plan of that run (it starts over), not the old run's counts
    out = ok(cli.run("d", "--no-push", "--dry-run", "--max-tokens", "9", "--overwrite"))  # not "needs --overwrite"
    assert "a real run with --overwrite moves it to superseded/ first" in out
    # a rerun that captions nothing keeps the measured rate for the estimate, said in seconds or minutes
    out = ok(cli.run("d", "--no-push", "--max-images", "8"))
    assert "captioned 0 images in" in out and "img/s" not in out.split("captioned 0 images")[1].split("\n")[0], out
    rate = json.loads((ckpt / store.SUMMARY).read_text())["last_measured_img_per_s"]
    assert rate == summary["captioning_img_per_s"]
    out = ok(cli.run("d", "--no-push", "--dry-run"))
    assert f"estimated time: {32 / rate:.0f} s at the last measured {rate:.2f} img/s" in out or (
        f"estimated time: {32 / rate / 60:.0f} min at the last measured" in out), out
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / store.RUN_JSON).write_text(json.dumps({"run_id": "0123456789ab", "model": "typo"}))  # a failed start
    out = ok(cli.run("e", "--no-push", "--dry-run"))
    assert "captioned nothing, so a real run replaces its settings" in out
    ok(cli.run("e", "--no-push", "--max-images", "2"))  # and it does


def test_download_takes_v_for_verbose_as_the_readme_and_the_other_scripts_do(tmp_path):
    from download_data import parse_args

    assert parse_args(["-v", "--output", str(tmp_path / "o")])[0].verbose


def test_help_says_max_tokens_is_bounded_by_the_context(capsys):
    from batched_image_inference import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "at most what the model's context leaves" in " ".join(capsys.readouterr().out.split())


def test_run_captioning_help_never_runs_setup(tmp_path):
    """A venv whose install looks unfinished (no stamp): --help still only prints (README: "without doing it")."""
    shutil.copy(REPO / "run_captioning.sh", tmp_path)
    (tmp_path / "setup.sh").write_text("#!/bin/sh\ntouch setup_ran\n")
    (tmp_path / "setup.sh").chmod(0o755)
    fake = tmp_path / "vlm-caption" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho \"python $*\"\n")
    fake.chmod(0o755)
    for flags in (["--help"], ["--demo", "--help"]):
        proc = _run(["bash", str(tmp_path / "run_captioning.sh"), *flags], cwd=tmp_path)
        assert proc.returncode == 0 and "--help" in proc.stdout, proc.stdout + proc.stderr
        assert not (tmp_path / "setup_ran").exists(), flags
    shutil.rmtree(tmp_path / "vlm-caption")  # no venv at all: the usage, nothing installed
    proc = _run(["bash", str(tmp_path / "run_captioning.sh"), "--demo", "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and "No venv yet" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "setup_ran").exists() and not (tmp_path / "vlm-caption").exists()


def test_preview_of_a_checkpoint_dir_that_does_not_exist_says_so(tmp_path):
    from vlm_caption.errors import UsageError
    from vlm_caption.preview import write_preview

    with pytest.raises(UsageError, match="checkpoints does not exist"):
        write_preview(tmp_path / "checkpoints", tmp_path / "preview.html")
    (tmp_path / "checkpoints").write_text("")  # a file there: not "does not exist"
    with pytest.raises(UsageError, match="checkpoints is a file, not a directory"):
        write_preview(tmp_path / "checkpoints", tmp_path / "preview.html")


def test_a_home_path_after_an_equals_sign_is_the_home_dir_and_flags_are_spelled_whole(tmp_path, monkeypatch,
                                                                                      capsys):
    """`--checkpoint-dir=~/ckpt` (no shell expands `~` there) made a literal ./~ dir for run.json beside parts
    that pyarrow wrote under the home dir, and every attempt failed at its first part; `--over` was taken for
    --overwrite, which sets a finished run aside."""
    from batched_image_inference import main
    from dummy_runs import clear_launch_env, dummy_args
    from vlm_caption.cli import run_main
    from vlm_caption.sample_data import write_sample

    clear_launch_env(monkeypatch)
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    write_sample(home / "data", n=8, broken=False, seed=2, shard_size=8)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    args = ["--model", "dummy-model", "--data-dir=~/data", "--checkpoint-dir=~/ckpt", *dummy_args(home, home)[6:]]
    assert "--checkpoint-dir=~/ckpt" in args and "--data-dir=~/data" in args
    assert main(args) == 0
    assert (home / "ckpt" / store.RUN_JSON).exists() and len(pq.read_table(home / "ckpt" / store.MERGED)) == 8
    assert not (work / "~").exists()
    with pytest.raises(SystemExit) as ended:
        run_main(main, [*args, "--over"], prog="caption")
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "unrecognized arguments: --over" in err, err
    assert (home / "ckpt" / store.RUN_JSON).exists() and not (home / "ckpt" / "superseded").exists()


def test_resume_of_a_dir_that_holds_no_run_says_so(tmp_path, monkeypatch, caplog):
    """--checkpoint-dir chekpoints --resume (a typo) started from scratch without a word."""
    from batched_image_inference import main
    from dummy_runs import clear_launch_env, dummy_args
    from vlm_caption.sample_data import write_sample

    clear_launch_env(monkeypatch)
    data = write_sample(tmp_path / "data", n=8, broken=False, seed=2, shard_size=8)
    assert main(dummy_args(data, tmp_path / "typo", "--resume")) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--resume:")]
    assert said == [f"--resume: {tmp_path / 'typo'} holds no run yet, so a new one starts there (a typo in "
                    "--checkpoint-dir?)"]
    caplog.clear()
    assert main(dummy_args(data, tmp_path / "typo", "--resume")) == 0  # now it does: nothing said
    assert not [r for r in caplog.records if r.getMessage().startswith("--resume:")]
