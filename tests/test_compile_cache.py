"""--compile-cache: a relaunch, or another machine given the dir, loads torch.compile's graphs instead of
compiling them again; the environment is put back; a bad path is one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_caption import compile_cache, store
from vlm_caption.errors import UsageError

from test_captioning import all_keys, caption_args

ROOT = Path(__file__).resolve().parent.parent


def test_auto_is_the_checkpoint_dir_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    assert compile_cache.choose("auto", tmp_path) == tmp_path / compile_cache.COMPILE_CACHE_DIR
    assert compile_cache.choose("none", tmp_path) is None  # torch's own default
    assert compile_cache.choose(str(tmp_path / "shared"), tmp_path) == tmp_path / "shared"
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, str(tmp_path / "theirs"))
    assert compile_cache.choose("auto", tmp_path) is None  # left where the user put it
    assert (tmp_path / "shared").is_dir()  # a named dir is made at once
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        compile_cache.choose(str(tmp_path / "a_file"), tmp_path)
    with pytest.raises(UsageError, match="cannot create it"):  # was a traceback at the first compile
        compile_cache.choose(str(tmp_path / "a_file" / "below"), tmp_path)


def test_the_environment_is_put_back(tmp_path, monkeypatch):
    """Inductor writes TRITON_CACHE_DIR into the environment at its first kernel; after the block both are as
    they were, so that a second run in the same process does not write into the first one's dir."""
    monkeypatch.setenv(compile_cache.INDUCTOR_ENV, "/elsewhere")
    monkeypatch.delenv(compile_cache.TRITON_ENV, raising=False)
    with compile_cache.using(tmp_path / "cache") as use:
        assert os.environ[compile_cache.INDUCTOR_ENV] == str((tmp_path / "cache").resolve())
        os.environ[compile_cache.TRITON_ENV] = str(tmp_path / "cache" / "triton")  # as inductor does
        assert use.report() is None  # nothing compiled in the block
    assert os.environ[compile_cache.INDUCTOR_ENV] == "/elsewhere"
    assert compile_cache.TRITON_ENV not in os.environ
    with compile_cache.using(None):
        assert os.environ[compile_cache.INDUCTOR_ENV] == "/elsewhere"


def test_a_file_as_the_cache_is_refused_before_anything_is_written(sample_data_dir, tmp_path):
    from batched_image_inference import main

    (tmp_path / "cache").write_text("not a dir")
    with pytest.raises(UsageError, match="is a file, not a directory"):  # run_main prints it as one line, exit 2
        main(caption_args(Path("unused"), sample_data_dir, tmp_path / "ckpt", "--backend", "dummy",
                          "--compile-cache", str(tmp_path / "cache")))
    assert not (tmp_path / "ckpt").exists()
    # A mode that captions nothing makes no cache dir.
    main(caption_args(Path("unused"), sample_data_dir, tmp_path / "ckpt", "--backend", "dummy", "--dry-run",
                      "--compile-cache", str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()


def _launch(model: Path, data: Path, ckpt: Path, *extra: str) -> dict:
    """A fresh process, as a relaunch or another machine is: run_summary's compile_cache."""
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.INDUCTOR_ENV, compile_cache.TRITON_ENV)}
    env["PYTHONPATH"] = str(ROOT)
    # No second tries: their batches of other sizes would double the graphs each launch compiles cold (their
    # own tests: test_retry_pool.py), for nothing this test checks.
    args = caption_args(model, data, ckpt, "--compile", "on", "--decode-loop", "graph", "--retry-repetition-penalty",
                        "0", *extra)
    proc = subprocess.run([sys.executable, str(ROOT / "batched_image_inference.py"), *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["compile_cache"]


def test_a_relaunch_on_another_machine_loads_the_compiled_graphs(tiny_model_dir, sample_data_dir, tmp_path):
    """Inductor on the CPU, as a GPU compiles: the first launch compiles into the checkpoint dir's
    compile_cache/; the dir copied to another path (another machine's mount) and relaunched there for the
    rest of the images compiles nothing; every key is captioned once."""
    ckpt = tmp_path / "ckpt"
    first = _launch(tiny_model_dir, sample_data_dir, ckpt, "--max-images", "8")
    assert first["dir"] == str((ckpt / compile_cache.COMPILE_CACHE_DIR).resolve())
    assert first["graphs_compiled"] >= 1 and first["graphs_loaded"] == 0

    moved = shutil.copytree(ckpt, tmp_path / "elsewhere" / "ckpt")
    shutil.rmtree(ckpt)
    relaunch = _launch(tiny_model_dir, sample_data_dir, moved, "--max-images", "16")
    assert relaunch["dir"] == str((moved / compile_cache.COMPILE_CACHE_DIR).resolve())
    assert relaunch["graphs_loaded"] >= 1 and relaunch["graphs_compiled"] == 0, (first, relaunch)
    keys = all_keys(moved)
    assert len(keys) == len(set(keys)) > 8  # the other 8 selected: captioned or recorded failed, once


def test_a_second_run_in_the_process_gets_its_own_dir(tmp_path, monkeypatch):
    """Inductor writes its default dir into TORCHINDUCTOR_CACHE_DIR at its first compile and memoizes paths
    under the dir: after a `none` run an `auto` one took torch's /tmp for the user's choice, and a second dir
    kept the first one's local cache."""
    from torch._inductor.codecache import CacheBase
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    with compile_cache.using(compile_cache.choose("none", tmp_path / "a")) as use:
        cache_dir()  # what inductor calls at a compile
    assert compile_cache.INDUCTOR_ENV not in os.environ and use.where  # the default torch used, for the report
    assert compile_cache.choose("auto", tmp_path / "b") == tmp_path / "b" / compile_cache.COMPILE_CACHE_DIR
    for ckpt in ("c", "d"):
        directory = compile_cache.choose("auto", tmp_path / ckpt)
        with compile_cache.using(directory):
            assert CacheBase.get_local_cache_path().is_relative_to(directory.resolve())


def test_an_empty_compile_cache_is_refused(tmp_path):
    with pytest.raises(UsageError, match="--compile-cache is empty"):  # not the working directory
        compile_cache.choose("", tmp_path)


@pytest.mark.parametrize("choice", ["off", "auto"])
def test_a_run_that_compiles_nothing_says_the_cache_was_not_used(choice, tiny_model_dir, sample_data_dir, tmp_path,
                                                                 caplog, monkeypatch):
    """On the CPU --compile auto and off compile nothing: --compile-cache went unused without a word, and
    run_summary must not name a dir that was never read or written."""
    from batched_image_inference import main

    monkeypatch.delenv(compile_cache.INDUCTOR_ENV, raising=False)
    caplog.set_level("INFO", logger="vlm_caption.compile_cache")
    main(caption_args(tiny_model_dir, sample_data_dir, tmp_path / "ckpt", "--max-images", "4", "--compile", choice,
                      "--compile-cache", str(tmp_path / "cache")))
    said = [r for r in caplog.records if "compile cache not used" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"
    entry = json.loads((tmp_path / "ckpt" / store.SUMMARY).read_text())["this_run"]["compile_cache"]
    assert entry["used"] is False and "dir" not in entry
    assert "--compile " + choice in entry["why"]
