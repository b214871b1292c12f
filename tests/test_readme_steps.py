"""README's "Real use" steps typed as written, where they meet a problem: the one line says what to do next."""
from __future__ import annotations

import functools

import pytest

from dummy_runs import dummy_args


def test_a_hub_unreachable_at_the_start_of_a_pushing_run_says_what_to_do(hub_stub, sample_data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """Step 5 (`./run_captioning.sh ... --hf-repo ... --hf-username ...`) with the Hub down or no network said only
    "the Hub at URL is unreachable: Hub token check failed 6 times, last: ...", exit 1, and nothing about the
    --no-push / --push-only way round it."""
    from batched_image_inference import main as cli_main

    from vlm_caption import hub, hub_retry
    from vlm_caption.cli import run_main

    monkeypatch.setattr(hub, "RetryPolicy", functools.partial(hub_retry.RetryPolicy, sleep=lambda s: None))
    hub_stub.inject("GET", "/api/whoami-v2", "503", times=100)
    ckpt = tmp_path / "ckpt"
    argv = [a for a in dummy_args(sample_data_dir, ckpt) if a != "--no-push"]
    with pytest.raises(SystemExit) as e:
        run_main(cli_main, [*argv, "--hf-repo", "tester/r", "--hub-endpoint", hub_stub.endpoint],
                 prog="batched_image_inference.py")
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert e.value.code == 1 and len(err) == 1, err
    assert "unreachable" in err[0] and "--no-push" in err[0] and "--push-only" in err[0]


def test_push_only_without_a_run_says_which_dir_and_what_to_give(tmp_path, monkeypatch, capsys):
    """README step 7 as typed (`--push-only --hf-repo ...`, no --checkpoint-dir) where ./checkpoints does not
    exist said "checkpoints holds no run.json: nothing to push": not that the dir is missing, nor what to do."""
    from batched_image_inference import main as cli_main

    from vlm_caption.cli import run_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    cases = (([], "--checkpoint-dir checkpoints holds no run.json (no such dir)"),
             (["--checkpoint-dir", "empty"], "--checkpoint-dir empty holds no run.json:"))
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            run_main(cli_main, ["--push-only", "--hf-repo", "me/r", *argv], prog="batched_image_inference.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
        assert "give the --checkpoint-dir of the run" in err[0]
    assert not (tmp_path / "checkpoints").exists()
