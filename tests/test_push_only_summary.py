"""run_summary.json after README step 7 (`--push-only` once the Hub is back)."""
from __future__ import annotations

import json

from batched_image_inference import main
from dummy_runs import clear_launch_env
from vlm_caption import hub, hub_retry, store
from vlm_caption.atomic import atomic_write_json
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK

COMMIT = r"/api/datasets/.*/commit/"


def hub_args(data, ckpt, stub, *extra):
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", "tester/pushonly", "--hub-endpoint", stub.endpoint, "--min-push-interval", "0",
            "--batch-size", "4", "--checkpoint-every", "8", "--num-loader-workers", "1", "--max-tokens", "40", *extra]


def run_whose_pushes_failed(hub_stub, data, tmp_path, monkeypatch):
    """A run whose every commit the Hub refused (exit 3): its rows wait in the dir for --push-only."""
    clear_launch_env(monkeypatch)
    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    ckpt = tmp_path / "ckpt"
    hub_stub.create_repo_direct("tester/pushonly")
    hub_stub.inject("POST", COMMIT, "503", times=100_000)
    assert main(hub_args(data, ckpt, hub_stub)) == EXIT_ITEMS_FAILED
    return ckpt


def test_push_only_that_publishes_everything_updates_the_summarys_hub_state(hub_stub, sample_data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """User impact: a run whose Hub pushes failed ends with exit 3 and run_summary.json `"hub": {"pushed_all":
    false}`. The README's fix (step 7) is `--push-only`, which then prints "every row of the dir is on the Hub"
    and exits 0, but run_summary.json keeps saying pushed_all false: a monitor, a job script or the smoke test's
    own push check (smoke.check_push reads that field) that trusts the summary keeps reporting the dir as
    unpublished, and the operator pushes again or hunts for a problem that is gone. Expected: a --push-only that
    leaves nothing pending records that in run_summary.json (hub.pushed_all true), as the run's own end does."""
    ckpt = run_whose_pushes_failed(hub_stub, sample_data_dir, tmp_path, monkeypatch)
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


def test_push_only_does_not_put_back_a_summary_a_worker_of_the_dir_wrote_during_its_push(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, capsys):
    """User impact: README step 7's `--push-only` may run while a relaunched worker of the dir is still
    captioning (endings.push_only itself says "not while a worker of the dir runs: its end writes the file").
    But push_only reads run_summary.json *before* its snapshot, push and card (minutes for a backlog), and checks
    for live workers only at the very end: a worker that ends during the push writes its own summary (its
    this_run counts, the dir's merged counts, its hub state), releases its lock, and push_only then writes the
    copy it read minutes earlier over it. The finished run's counts, rates and flags are lost from
    run_summary.json (the monitor / smoke / the next --dry-run read a stale file) with no warning.
    Expected: the summary is read (or re-read) after the push, just before it is rewritten, so only the `hub`
    state changes and a summary written meanwhile keeps its counts."""
    ckpt = run_whose_pushes_failed(hub_stub, sample_data_dir, tmp_path, monkeypatch)
    hub_stub.clear_faults()
    capsys.readouterr()

    real_card = hub.HubClient.write_card

    def card_while_a_worker_ends(self, *args, **kwargs):
        real_card(self, *args, **kwargs)
        # a worker of the dir ends now (its lock released): its finish() writes the dir's summary
        newer = json.loads((ckpt / store.SUMMARY).read_text())
        newer["this_run"]["captioned"] = 7
        newer["this_run"]["wall_s"] = 12345.0
        atomic_write_json(ckpt / store.SUMMARY, newer)

    monkeypatch.setattr(hub.HubClient, "write_card", card_while_a_worker_ends)
    assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--push-only")) == EXIT_OK
    after = json.loads((ckpt / store.SUMMARY).read_text())
    assert after["hub"]["pushed_all"] is True
    assert (after["this_run"]["captioned"], after["this_run"]["wall_s"]) == (7, 12345.0), (
        "push_only wrote back the summary it read before its push, over the one written meanwhile: "
        f"this_run = {after['this_run']}")


def test_push_only_does_not_put_back_the_summary_over_the_one_the_last_worker_out_writes_as_it_merges(
        hub_stub, sample_data_dir, tmp_path, monkeypatch, capsys):
    """The last worker out lets go of its worker id, then holds the dir exclusively while it merges and writes
    run_summary.json. push_only's check for live workers looked at worker ids only: it read the old summary, the
    merger wrote its own, and push_only wrote the old one back over it (the finished run's counts lost)."""
    from vlm_caption import endings
    from vlm_caption.locks import DirLock

    ckpt = run_whose_pushes_failed(hub_stub, sample_data_dir, tmp_path, monkeypatch)
    hub_stub.clear_faults()
    merger = DirLock(ckpt, 0, 1)  # a relaunched worker of the dir, ending during the push
    assert merger.take_worker() is None and merger.take_run(exclusive=False)
    written = []

    def the_merger_writes_its_summary():
        newer = json.loads((ckpt / store.SUMMARY).read_text())
        newer["this_run"]["captioned"] = 7
        atomic_write_json(ckpt / store.SUMMARY, newer)
        written.append(1)

    real_card, real_read = hub.HubClient.write_card, endings.read_summary

    def card_then_the_worker_ends(self, *args, **kwargs):
        real_card(self, *args, **kwargs)
        assert merger.last_one_out()  # merging now: the dir held exclusively, its worker id let go

    def read_then_the_merger_writes(ckpt_, set_aside=True):
        found = real_read(ckpt_, set_aside)
        if not set_aside and not written:  # push_only's last read, before its write
            the_merger_writes_its_summary()
        return found

    monkeypatch.setattr(hub.HubClient, "write_card", card_then_the_worker_ends)
    monkeypatch.setattr(endings, "read_summary", read_then_the_merger_writes)
    try:
        assert main(hub_args(sample_data_dir, ckpt, hub_stub, "--push-only")) == EXIT_OK
        if not written:  # push_only left the file alone: the merger writes it when its merge ends
            the_merger_writes_its_summary()
    finally:
        merger.release()
    assert json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["captioned"] == 7
