"""hub.py when the Hub fails: 5xx, dropped and lost answers, conflicts, 429, client errors, an outage, a kill
between a commit and the ledger; every key ends on the Hub once (tests/hub_stub.py injects the faults)."""
from __future__ import annotations

import logging
import signal

import pytest
from hub_parts import (assert_hub_matches, COMMIT, DIR, REPO, RUN, Writer, ckpt, client, ledger,  # noqa: F401
                       push_killed_after_commit, sleeps)  # (fixtures)

from vlm_caption import hub
from vlm_caption.errors import FatalError
from vlm_caption.store import LEDGER, list_parts


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["500", "503", "drop", "lost_response", "409", "412"])
def test_commit_faults_end_with_every_key_once(hub_stub, client, ckpt, sleeps, kind):  # noqa: F811
    w = Writer(ckpt)
    w.parts(10, 10)
    hub_stub.inject("POST", COMMIT, kind)
    assert client.push_pending(ckpt, RUN, 0) == 20
    assert len(sleeps) == 1
    assert hub_stub.commits_applied == 1  # lost_response: applied once, found by the re-list, not re-sent
    assert_hub_matches(hub_stub, REPO, ckpt)
    [line] = ledger(ckpt)
    assert line.get("recovered", False) is (kind == "lost_response")
    w.parts(5)  # and the next push carries on normally
    assert client.push_pending(ckpt, RUN, 0) == 5
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_429_waits_for_retry_after(hub_stub, client, ckpt, sleeps):  # noqa: F811
    Writer(ckpt).parts(10)
    hub_stub.inject("POST", COMMIT, "429", retry_after=7)
    assert client.push_pending(ckpt, RUN, 0) == 10
    assert len(sleeps) == 1 and sleeps[0] >= 7
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_backoff_doubles_with_jitter_and_is_capped():
    policy = hub.RetryPolicy(base=1.0, cap=5.0)
    err = RuntimeError()
    for attempt, full in [(1, 1), (2, 2), (3, 4), (4, 5), (5, 5)]:
        assert full / 2 <= policy.wait(attempt, err) <= full


@pytest.mark.parametrize("status", ["400", "401", "403", "404"])
def test_client_errors_are_not_retried(hub_stub, client, ckpt, sleeps, status):  # noqa: F811
    Writer(ckpt).parts(10)
    hub_stub.inject("POST", COMMIT, status)
    with pytest.raises(FatalError, match=f"HTTP {status}") as e:
        client.push_pending(ckpt, RUN, 0)
    assert "\n" not in str(e.value)
    assert hub_stub.count("POST", COMMIT) == 1 and sleeps == []
    assert not (ckpt / LEDGER).exists()
    assert client.push_pending(ckpt, RUN, 0) == 10  # a later push goes through
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_hub_down_for_good_keeps_parts_pending(hub_stub, client, ckpt, sleeps, caplog):  # noqa: F811
    Writer(ckpt).parts(10, 10)
    client.snapshot(RUN)  # read while the Hub was up
    for method in ("GET", "POST", "HEAD"):
        hub_stub.inject(method, ".*", "503", times=10_000)
    with caplog.at_level(logging.WARNING, logger="vlm_caption.hub"):
        assert client.push_pending(ckpt, RUN, 0) == 0
    assert len(sleeps) == 5 and "Hub unavailable" in caplog.text
    assert hub_stub.commits_applied == 0 and not (ckpt / LEDGER).exists()
    hub_stub.clear_faults()
    assert client.pending_rows(ckpt, RUN, 0) == 20
    assert client.push_pending(ckpt, RUN, 0) == 20
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_applied_commit_with_every_answer_lost_is_recovered_next_push(hub_stub, client, ckpt, sleeps, monkeypatch):  # noqa: F811
    # The commit lands, then every retry (and re-list) fails: the push gives up, the next one must not re-push.
    Writer(ckpt).parts(10)
    hub_stub.inject("POST", COMMIT, "lost_response")
    real_snapshot = hub.HubIndex.snapshot

    armed = [True]

    def hub_down_once_committed(index):  # every look at the repo after the lost answer fails
        if hub_stub.commits_applied and armed:
            hub_stub.inject("GET", "/tree/", "503", times=10_000)
            armed.clear()
        return real_snapshot(index)

    monkeypatch.setattr(hub.HubIndex, "snapshot", hub_down_once_committed)
    assert client.push_pending(ckpt, RUN, 0) == 0
    assert hub_stub.commits_applied == 1 and len(sleeps) == 5
    hub_stub.clear_faults()
    assert client.push_pending(ckpt, RUN, 0) == 0
    assert hub_stub.commits_applied == 1
    [line] = ledger(ckpt)
    assert line["recovered"] is True and line["commit"] is None and line["rows"] == 10
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_sigkill_between_commit_and_ledger(hub_stub, ckpt, tmp_path):  # noqa: F811
    w = Writer(ckpt)
    w.parts(10, 10, 10)
    returncode = push_killed_after_commit(hub_stub, ckpt, tmp_path)
    assert returncode == -signal.SIGKILL and not (ckpt / LEDGER).exists()
    client = hub.connect(REPO, endpoint=hub_stub.endpoint)
    assert client.push_pending(ckpt, RUN, 0) == 0
    assert hub_stub.commits_applied == 1
    [line] = ledger(ckpt)
    assert line["recovered"] is True and line["parts"] == [p.path.name for p in list_parts(ckpt)]
    w.parts(4)
    assert client.push_pending(ckpt, RUN, 0) == 4
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_a_worker_checks_only_its_own_ledger_lines_against_its_snapshot(hub_stub, client, ckpt, sleeps, caplog):  # noqa: F811
    """Another live worker may commit and write its ledger line between this worker's snapshot and its read
    of the ledger: that line is not a file "the repo no longer holds" (it warned so on every shared-dir run)."""
    from hub_parts import hub_name

    Writer(ckpt).parts(4)
    Writer(ckpt, worker=1, start=100).parts(4)
    # Worker 1's commit as worker 0's older snapshot sees it: in the ledger, not (yet) in the repo.
    hub.append_ledger(ckpt, [{"repo": REPO, "run_id": RUN, "hub_path": hub_name(0, 0, worker=1), "worker": 1,
                              "first": 0, "last": 0, "parts": [], "rows": 4, "commit": "abc"}])
    with caplog.at_level(logging.INFO, logger="vlm_caption"):
        assert client.push_pending(ckpt, RUN, 0) == 4
    assert "no longer holds" not in caplog.text and "recovered" not in caplog.text
    # The last one out (every worker's parts, nobody else live) still checks every line.
    assert client.push_pending(ckpt, RUN, None) == 4
    assert "records 1 file(s) pushed to" in caplog.text
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_ledger_check_lists_the_parts_once(hub_stub, client, ckpt, monkeypatch):  # noqa: F811
    """Files found on the Hub but not in the ledger are matched to parts listed once, not once per file
    (2,016 files took 40 s)."""
    w = Writer(ckpt)
    for _ in range(4):  # four commits, four files, then the ledger is lost
        w.parts(3)
        client.push_pending(ckpt, RUN, 0)
    (ckpt / LEDGER).unlink()
    calls = []
    monkeypatch.setattr(hub, "list_parts", lambda d: calls.append(d) or list_parts(d))
    client._check_ledger(ckpt, RUN, DIR, client.snapshot(RUN), 0)
    assert len(calls) == 1
    assert [line["recovered"] for line in ledger(ckpt)] == [True] * 4
