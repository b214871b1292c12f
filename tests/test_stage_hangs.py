"""Stages that wait on another stage or on the network: each wait ends, and what ended it is said (README "Exit
codes"), instead of a run that holds its GPU until the job's time limit. Dummy backend, local Hub stub."""
from __future__ import annotations

import os
import signal
import threading

import pytest
from dummy_runs import clear_launch_env, dummy_args
from hub_parts import assert_hub_matches

from vlm_caption import hub, hub_retry, store
from vlm_caption.errors import EXIT_OK
from vlm_caption.interrupts import Interrupted

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


def test_a_sigterm_during_the_last_part_write_keeps_that_part(sample_data_dir, tmp_path, monkeypatch):
    """The last part (the rows captioned since the previous one) is written on the generate thread once the loop
    is done, and that write ran outside the graceful stop: a SIGTERM landing in it (Slurm's time limit as the run
    ends) raised at once, inside the write, and its rows, already out of the buffer, were lost: exit 143 with up
    to --checkpoint-every finished captions captioned again by the next job. The write now finishes first."""
    from batched_image_inference import main

    clear_launch_env(monkeypatch)
    real_write = store.CheckpointStore.write_part

    def sigterm_in_the_last_write(self, rows):
        if threading.current_thread() is threading.main_thread():  # (the writer thread writes the others)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_write(self, rows)

    monkeypatch.setattr(store.CheckpointStore, "write_part", sigterm_in_the_last_write)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted) as stopped:
        main(dummy_args(sample_data_dir, ckpt, "--max-images", "12"))
    assert stopped.value.signum == signal.SIGTERM
    written = [k for _, keys in store.read_keys(store.list_parts(ckpt)) for k in keys]
    failed = [k for _, keys in store.read_keys(store.list_failure_files(ckpt)) for k in keys]
    assert len(set(written + failed)) == 12, (written, failed)  # the resume has nothing left to caption
