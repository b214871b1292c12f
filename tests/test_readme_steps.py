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


def test_the_end_of_run_rates_say_what_each_one_counts(capsys):
    """The demo ended "captioned 18 images in 2.8 s (6.39 img/s with model loading, 5.43 img/s captioning)": the
    second is the rate after the first batch (a short run's last, partial batch drags it below the first), so
    "captioning" read as a contradiction of the first."""
    from pathlib import Path

    from vlm_caption.endings import print_summary

    this = {"captioned": 18, "wall_s": 2.8, "img_per_s": 6.39, "captioning_img_per_s": 5.43, "tokens_per_s": 409,
            "failed_by_stage": {}, "skipped_already_done": 0}
    print_summary({"this_run": this}, Path("ckpt"), 0)
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert "6.39 img/s with model loading, 5.43 img/s after the first batch" in first, first
