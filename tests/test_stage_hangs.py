"""Stages that wait on another stage or on the network: each wait ends, and what ended it is said (README "Exit
codes"), instead of a run that holds its GPU until the job's time limit. Dummy backend, local Hub stub."""
from __future__ import annotations

import threading

from dummy_runs import clear_launch_env
from hub_parts import assert_hub_matches

from vlm_caption import hub, hub_retry
from vlm_caption.errors import EXIT_OK

COMMIT = r"/api/datasets/.*/commit/"
REPO = "tester/hangs"


def hub_run_args(data, ckpt, stub, *extra):
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", REPO, "--hub-endpoint", stub.endpoint, "--min-push-interval", "0", "--batch-size", "4",
            "--checkpoint-every", "8", "--num-loader-workers", "1", "--max-tokens", "40", *extra]


def run_in_thread(args: list[str], limit_s: float):
    """main(args) on a daemon thread: (its exit code or exception, True when it ended within limit_s)."""
    from batched_image_inference import main

    got: dict = {}

    def target():
        try:
            got["code"] = main(args)
        except BaseException as e:  # noqa: BLE001  handed to the test
            got["code"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    return got.get("code"), not thread.is_alive()


def test_a_commit_whose_answer_never_comes_does_not_hold_the_run_s_end(hub_stub, sample_data_dir, tmp_path,
                                                                       monkeypatch):
    """huggingface_hub's HTTP client waits without limit (timeout=None): a commit whose answer never came (a
    connection black-holed mid-request) held the pusher thread, and the run's end waits for its final push
    without limit. The run captioned everything, then hung until the job's time limit, GPU held. Every Hub request
    now gives up after hub_retry.HUB_REQUEST_TIMEOUT_S without an answer and is retried as a dropped connection
    is: the retry reads the repo first, finds the commit applied, and the run ends with every row on the Hub once
    (a Hub that stays silent: HubUnavailable after the retries, exit 3, as a Hub that is down)."""
    clear_launch_env(monkeypatch)
    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    monkeypatch.setattr(hub_retry, "HUB_REQUEST_TIMEOUT_S", 1.0)
    hub_stub.create_repo_direct(REPO)
    hub_stub.hang_seconds = 3600.0
    hub_stub.inject("POST", COMMIT, "hang", times=1000)
    ckpt = tmp_path / "ckpt"
    try:
        code, ended = run_in_thread(hub_run_args(sample_data_dir, ckpt, hub_stub, "--max-images", "8"), 60)
    finally:
        hub_stub._release.set()  # the held answers go out: the stub stops
    assert ended, "the run still waits for the Hub's answer to its commit"
    assert code == EXIT_OK, code
    assert len(assert_hub_matches(hub_stub, REPO, ckpt)) == 7  # (one of the 8 images is broken)
