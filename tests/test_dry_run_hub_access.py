"""--dry-run of a pushing run now reads the Hub (dry_run.published_keys): what it says when the repo is one this
machine's token cannot push to, or cannot see."""
from __future__ import annotations

import re

import pytest

from batched_image_inference import main
from dummy_runs import clear_launch_env
from vlm_caption.cli import run_main
from vlm_caption.errors import EXIT_OK, EXIT_USAGE


def hub_args(data, ckpt, stub, repo, *extra):
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", repo, "--hub-endpoint", stub.endpoint, "--min-push-interval", "0",
            "--batch-size", "4", "--checkpoint-every", "8", "--num-loader-workers", "1", "--max-tokens", "40", *extra]


def planned(out: str) -> tuple[int, int]:
    found = re.search(r"to do (\d+), already done (\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def exit_code(args) -> int:
    with pytest.raises(SystemExit) as exc:
        run_main(main, args, prog="batched_image_inference.py")
    return exc.value.code


def test_a_dry_run_against_a_repo_this_token_cannot_push_to_does_not_plan_as_if_the_run_would_skip_its_keys(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, capsys):
    """User impact: the default --hf-username is the original author's (config.hf_username = "somepago"), and a
    run id depends on the settings only, so a new user's `--dry-run` with default flags (or a colleague's repo
    named in --hf-repo) reads another user's repo, finds the run published there, and prints "to do 0, already
    done N (N of them on the Hub only)" with no note: the operator sizes no job (or a tiny one). The real run of
    the same flags is refused at once (hub._check_namespace: "the Hugging Face token of X cannot write to
    OTHER/...: pass --hf-username ..."), exit 2, and once pointed at their own repo it captions everything.
    The dry run says "what a real run of these flags would do": it plans from keys no run of these flags will
    ever skip, and does not say that the run would be refused.
    Expected: where this machine's token (when there is one) cannot write to the repo's namespace, the dry run
    says so in a note (as the real run's refusal does), rather than a silent plan of a run that cannot start."""
    clear_launch_env(monkeypatch)
    other_token = "hf_OTHERUSER" + "a" * 24
    hub_stub.tokens[other_token] = {"name": "someone", "role": "write", "orgs": []}
    repo = "someone/captions"
    monkeypatch.setenv("HF_TOKEN", other_token)  # the repo's owner published 20 keys of the run
    assert main(hub_args(sample_data_dir, tmp_path / "theirs", hub_stub, repo, "--max-images", "20")) == EXIT_OK
    capsys.readouterr()

    monkeypatch.setenv("HF_TOKEN", hub_stub.token)  # this user ("tester")
    mine = tmp_path / "mine"
    assert main(hub_args(sample_data_dir, mine, hub_stub, repo, "--dry-run")) == EXIT_OK
    dry = capsys.readouterr().out
    _, done = planned(dry)

    code = exit_code(hub_args(sample_data_dir, mine, hub_stub, repo))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "cannot write to" in err, (code, err)  # the real run of these flags: refused
    assert done == 0 and "note: a real run of these flags would stop at once: the Hugging Face token of tester " \
        f"cannot write to {repo}" in dry, dry


def test_a_dry_run_without_a_token_does_not_take_a_private_repo_for_one_not_created_yet(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, capsys):
    """User impact: the plan is typically made on a login node, the token being set in the job script (or the
    login node has no `hf auth login`). The run's repo is --private (README: `--private`). Without a token the
    Hub answers a private repo as not found, and dry_run.published_keys takes every "no dataset repo" answer for
    "no such repo yet (a first run creates it)" and drops it without a note: the plan says "to do 48, already
    done 0" while the real job (with its token) skips the 20 keys the Hub holds. hub.connect_reader's own message
    even says "(no token: run `hf auth login` or set HF_TOKEN for a private repo)", and the dry run drops it.
    Expected: without a token, a repo the Hub does not show is not silently taken as absent: a note says the
    Hub's keys could not be counted without a token (a private repo), as for any other unreadable Hub."""
    clear_launch_env(monkeypatch)
    repo = "tester/private-run"
    assert main(hub_args(sample_data_dir, tmp_path / "first", hub_stub, repo, "--private", "--max-images", "20")) \
        == EXIT_OK
    capsys.readouterr()

    monkeypatch.delenv("HF_TOKEN")  # the login node: no token
    assert main(hub_args(sample_data_dir, tmp_path / "fresh", hub_stub, repo, "--private", "--dry-run")) == EXIT_OK
    dry = capsys.readouterr().out
    todo, done = planned(dry)
    assert done == 0 and "note: keys already on the Hub are not counted: no dataset repo" in dry \
        and "(no token:" in dry and "a real run that pushes needs one" in dry, dry
