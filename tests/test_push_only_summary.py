"""run_summary.json after README step 7 (`--push-only` once the Hub is back)."""
from __future__ import annotations

import json

from batched_image_inference import main
from dummy_runs import clear_launch_env
from vlm_caption import hub, hub_retry, store
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK

COMMIT = r"/api/datasets/.*/commit/"


def hub_args(data, ckpt, stub, *extra):
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", "tester/pushonly", "--hub-endpoint", stub.endpoint, "--min-push-interval", "0",
            "--batch-size", "4", "--checkpoint-every", "8", "--num-loader-workers", "1", "--max-tokens", "40", *extra]


def test_push_only_that_publishes_everything_updates_the_summarys_hub_state(hub_stub, sample_data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """User impact: a run whose Hub pushes failed ends with exit 3 and run_summary.json `"hub": {"pushed_all":
    false}`. The README's fix (step 7) is `--push-only`, which then prints "every row of the dir is on the Hub"
    and exits 0, but run_summary.json keeps saying pushed_all false: a monitor, a job script or the smoke test's
    own push check (smoke.check_push reads that field) that trusts the summary keeps reporting the dir as
    unpublished, and the operator pushes again or hunts for a problem that is gone. Expected: a --push-only that
    leaves nothing pending records that in run_summary.json (hub.pushed_all true), as the run's own end does."""
    clear_launch_env(monkeypatch)
    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    ckpt = tmp_path / "ckpt"
    hub_stub.create_repo_direct("tester/pushonly")
    hub_stub.inject("POST", COMMIT, "503", times=100_000)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub)) == EXIT_ITEMS_FAILED
    assert json.loads((ckpt / store.SUMMARY).read_text())["hub"]["pushed_all"] is False
    hub_stub.clear_faults()
    capsys.readouterr()

    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--push-only")) == EXIT_OK
    assert "every row of the dir is on the Hub" in capsys.readouterr().out
    hub_state = json.loads((ckpt / store.SUMMARY).read_text())["hub"]
    assert hub_state["pushed_all"] is True, hub_state


def test_a_card_that_could_not_be_written_is_recorded_in_the_summary_until_push_only_writes_it(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, caplog):
    """card_written false was set after run_summary.json was written: the file never said so."""
    from vlm_caption.errors import FatalError

    clear_launch_env(monkeypatch)
    ckpt = tmp_path / "ckpt"
    real = hub.HubClient.write_card

    def refused(self, *args, **kwargs):
        raise FatalError("the Hub refused the card")

    monkeypatch.setattr(hub.HubClient, "write_card", refused)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub)) == EXIT_ITEMS_FAILED  # the card is work left
    assert "some parts could not be pushed" not in caplog.text
    assert json.loads((ckpt / store.SUMMARY).read_text())["hub"] == {"pushed_all": True, "card_written": False}
    monkeypatch.setattr(hub.HubClient, "write_card", real)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--push-only")) == EXIT_OK
    assert json.loads((ckpt / store.SUMMARY).read_text())["hub"] == {"pushed_all": True, "card_written": True}
    assert "README.md" in hub_stub.repo_files("tester/pushonly")
