"""Published exactly once in workflows the other exactly-once tests do not drive: dirs that share keys pushing
at once, --push-only while the dir's workers push, failed key reads of a snapshot, a kill between a commit and
its local record followed by a fresh dir, --push-only and a relaunch, one dir pushing to two repos in turn, a
repo whose files someone else deletes or renames between runs, and --overwrite there and back."""
from __future__ import annotations

import os
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from hub_parts import REPO, RUN, Writer, ckpt, data_files, ledger, push_killed_after_commit  # noqa: F401
from test_exactly_once import cli, data, hub_keys, ok, run_id_of, source_keys  # noqa: F401  (fixtures)

from vlm_caption import hub, hub_index
from vlm_caption.store import LEDGER


def connect(stub, ckpt, repo=REPO):
    return hub.connect(repo, endpoint=stub.endpoint, checkpoint_dir=ckpt,
                       retry=hub.RetryPolicy(sleep=lambda s: None))


def once(stub, repo=REPO) -> set[str]:
    """The repo's keys, each asserted to be there exactly once."""
    counts = Counter(r["key"] for r in stub.read_rows(repo))
    twice = [k for k, n in counts.items() if n > 1]
    assert not twice, f"keys on {repo} more than once: {twice[:5]}"
    return set(counts)


def keys(n: int, start: int = 0) -> set[str]:
    return {f"00{i:07d}" for i in range(start, start + n)}


def recommit(stub, repo: str, change) -> None:
    """Someone else commits to the repo: change(tree) edits {path: blob} of its head."""
    r = stub.repos[("dataset", repo)]
    with stub._lock:
        tree = dict(r.commits[r.branches["main"]])
        change(tree)
        oid = os.urandom(20).hex()
        r.commits[oid], r.branches["main"] = tree, oid


def test_fresh_dirs_sharing_keys_with_a_published_dir_push_at_once(hub_stub, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    Writer(a, dir_id="dira00000000").parts(10, 10)
    assert connect(hub_stub, a).push(a, RUN, 0) == 20
    Writer(b, dir_id="dirb00000000").parts(15, 15, 10)  # keys 0-39: half of them published by a
    Writer(c, dir_id="dirc00000000", start=10).parts(20, 20)  # keys 10-49
    clients, go, errors = {d: connect(hub_stub, d) for d in (b, c)}, threading.Barrier(2), []

    def push(d):
        go.wait()
        try:
            clients[d].push(d, RUN, 0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=push, args=(d,)) for d in (b, c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and once(hub_stub) == keys(50)
    for d in (a, b, c):  # and nothing more from any of them, by the dir's own worker or by --push-only
        assert connect(hub_stub, d).push(d, RUN, 0) == connect(hub_stub, d).push(d, RUN, None) == 0
    assert once(hub_stub) == keys(50)


def test_push_only_while_the_dirs_live_workers_push_the_same_parts(hub_stub, ckpt):  # noqa: F811
    """--push-only takes no lock on the dir: it pushes every worker's parts while those workers push their own."""
    writers = [Writer(ckpt, w) for w in range(2)]
    total = 0
    for _ in range(3):
        total += sum(wr.parts(4, 3) for wr in writers)
        go, errors = threading.Barrier(3), []

        def push(worker):
            go.wait()
            try:
                connect(hub_stub, ckpt).push(ckpt, RUN, worker)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=push, args=(w,)) for w in (0, 1, None)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(once(hub_stub)) == total
    assert total == 42 and connect(hub_stub, ckpt).push(ckpt, RUN, None) == 0


@pytest.mark.parametrize("kind", ["500", "429", "drop"])
@pytest.mark.parametrize("block", [hub_index.KEY_READ_BLOCK, 512])  # a file read whole, or by range reads
def test_faults_while_reading_another_dirs_keys_never_republish_them(hub_stub, tmp_path, monkeypatch, kind, block):
    """The key reads of a snapshot fail (more often than huggingface_hub retries them itself): the push waits
    for them, it never takes an unread file for one publishing nothing."""
    monkeypatch.setattr(hub_index, "KEY_READ_BLOCK", block)
    a, b = tmp_path / "a", tmp_path / "b"
    Writer(a, dir_id="dira00000000").parts(30)
    assert connect(hub_stub, a).push(a, RUN, 0) == 30
    Writer(b, dir_id="dirb00000000").parts(30, 5)
    hub_stub.inject("GET", r"/resolve/.*\.parquet$", kind, times=8)
    assert connect(hub_stub, b).push_pending(b, RUN, 0) == 5
    assert once(hub_stub) == keys(35) and hub_stub.count("GET", r"/resolve/.*\.parquet$") > 8


def test_a_kill_between_commit_and_ledger_then_fresh_dir_push_only_and_relaunch(hub_stub, tmp_path):
    a, fresh = tmp_path / "a", tmp_path / "fresh"
    w = Writer(a, dir_id="dira00000000")
    w.parts(10, 10)
    push_killed_after_commit(hub_stub, a, tmp_path, key_cache=True)  # the commit applied, its answer held
    assert not (a / LEDGER).exists() and not list((a / "hub_keys").glob("*.parquet"))  # no local record at all
    Writer(fresh, dir_id="dirf00000000").parts(25)  # keys 0-24: 0-19 published by the killed push
    assert connect(hub_stub, fresh).push(fresh, RUN, 0) == 5
    assert connect(hub_stub, a).push(a, RUN, None) == 0  # --push-only of the killed dir
    w.parts(10)  # its relaunch captions keys 20-29: 20-24 came from the fresh dir
    assert connect(hub_stub, a).push(a, RUN, 0) == 5
    assert once(hub_stub) == keys(30) and hub_stub.commits_applied == 3
    assert [e.get("recovered", False) for e in ledger(a)] == [True, False]


def test_one_dir_pushing_to_two_repos_in_turn(hub_stub, ckpt):  # noqa: F811
    other = "tester/other"
    w = Writer(ckpt)
    w.parts(10)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    w.parts(10, 10)
    assert connect(hub_stub, ckpt, other).push(ckpt, RUN, 0) == 30  # every row, those already on the first too
    w.parts(5)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, None) == 25  # back to the first: only what it lacks
    assert connect(hub_stub, ckpt, other).push(ckpt, RUN, 0) == 5
    assert once(hub_stub) == once(hub_stub, other) == keys(35)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == connect(hub_stub, ckpt, other).push(ckpt, RUN, 0) == 0
    assert {e["repo"] for e in ledger(ckpt)} == {REPO, other}


def test_a_copied_dir_pushes_after_its_original_pushed_parts_it_lacks(hub_stub, tmp_path):
    """`cp -r a b`: both dirs have one dir_id. A file a pushed later, of parts b does not have, was recorded in
    b's ledger with no local part: IndexError, at every push of b (--push-only a traceback)."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    wa = Writer(a)
    wa.parts(10)
    assert connect(hub_stub, a).push(a, RUN, 0) == 10
    shutil.copytree(a, b)
    wa.parts(10, 10)
    assert connect(hub_stub, a).push(a, RUN, 0) == 20
    assert connect(hub_stub, b).push(b, RUN, None) == 0
    Writer(b, start=30).parts(5)  # b's own next part: keys a never had
    assert connect(hub_stub, b).push(b, RUN, 0) == 5
    assert once(hub_stub) == keys(30) | keys(5, 30)
    assert [(e["first"], e["last"], e["parts"]) for e in ledger(b) if e.get("recovered")] == [(1, 2, [])]


def test_files_deleted_or_renamed_by_someone_else_between_runs(hub_stub, ckpt, caplog):  # noqa: F811
    w = Writer(ckpt)
    w.parts(10)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    w.parts(10)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    first, second = data_files(hub_stub)
    recommit(hub_stub, REPO, lambda t: t.pop(first))  # deleted: its rows are published again, once
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 10
    assert once(hub_stub) == keys(20) and "no longer holds" in caplog.text
    renamed = second.rsplit("/", 1)[0] + "/moved-by-hand.parquet"
    recommit(hub_stub, REPO, lambda t: t.update({renamed: t.pop(second)}))  # renamed: still published, named
    w.parts(5)
    assert connect(hub_stub, ckpt).push(ckpt, RUN, 0) == 5 and renamed in caplog.text
    fresh = ckpt.parent / "fresh"
    Writer(fresh, dir_id="dirf00000000").parts(25)  # a fresh dir with the same keys finds them all published
    assert connect(hub_stub, fresh).push(fresh, RUN, None) == 0
    assert once(hub_stub) == keys(25) and renamed in data_files(hub_stub)


# ---------------------------------------------------------------- the command line: --overwrite, --hf-repo

def test_relaunch_of_a_dir_with_another_hf_repo_then_back(cli, hub_stub, source_keys, tmp_path):  # noqa: F811
    other = "tester/other"
    ok(cli.run("a", "--max-images", "10"))
    assert len(hub_keys(hub_stub)) == 10
    ok(cli.run("a", repo=other))  # the relaunch captions the rest and pushes every row to the other repo
    assert hub_keys(hub_stub, other) == source_keys and len(hub_keys(hub_stub)) == 10
    out = ok(cli.run("a"))  # back to the first: only the 30 rows it lacks
    assert hub_keys(hub_stub) == source_keys and sum(map(int, re.findall(r"Hub: pushed (\d+) rows", out))) == 30
    assert "pushed 0 rows" in ok(cli.run("a", "--push-only")) and hub_keys(hub_stub) == source_keys
    assert "pushed 0 rows" in ok(cli.run("a", "--push-only", repo=other)) and hub_keys(hub_stub, other) == source_keys


def test_overwrite_there_and_back_on_a_dir_whose_rows_are_published(cli, hub_stub, source_keys, tmp_path):  # noqa: F811
    ok(cli.run("d"))
    first = run_id_of(tmp_path / "d")
    ok(cli.run("d", "--max-tokens", "5", "--overwrite"))  # another run: its own folder
    second = run_id_of(tmp_path / "d")
    assert second != first and hub_keys(hub_stub, run_id=second) == source_keys
    out = ok(cli.run("d", "--overwrite"))  # the first settings again, in a new dir id: all on the Hub already
    assert run_id_of(tmp_path / "d") == first and "40 of them on the Hub only" in out
    assert hub_keys(hub_stub, run_id=first) == hub_keys(hub_stub, run_id=second) == source_keys
    assert "pushed 0 rows" in ok(cli.run("d", "--push-only"))
    assert hub_keys(hub_stub, run_id=first) == source_keys


def test_overwrite_of_an_unpushed_run_says_how_to_publish_it(cli, hub_stub, tmp_path):  # noqa: F811
    ok(cli.run("d", "--max-images", "10", "--no-push"))
    first = run_id_of(tmp_path / "d")
    out = ok(cli.run("d", "--max-tokens", "5", "--overwrite", "--no-push"))
    moved = re.search(r"--push-only --checkpoint-dir (\S+)\)", out)
    assert moved and run_id_of(Path(moved[1])) == first, out
    assert "Hub: pushed 10 rows" in ok(cli.run(moved[1], "--push-only"))
    assert len(hub_keys(hub_stub, run_id=first)) == 10


def test_a_run_whose_data_was_deleted_by_hand_gets_no_config_on_the_next_card(hub_stub, tmp_path):
    """runs/{run}.json keeps its rows: the newest run, its folder deleted, stayed the default config, whose
    data_files match nothing, and load_dataset(repo) failed for every run."""
    from huggingface_hub import DatasetCard
    from test_hub import RUN_INFO

    old, new = tmp_path / "old", tmp_path / "new"
    Writer(old, run="fedcba987654", dir_id="dirold000000").parts(5)
    Writer(new, dir_id="dirnew000000").parts(5)
    for ckpt, run, created in ((old, "fedcba987654", "2026-01-01T00:00:00Z"), (new, RUN, "2026-02-01T00:00:00Z")):
        client = connect(hub_stub, ckpt)
        client.push(ckpt, run)
        client.write_card({**RUN_INFO, "run_id": run, "created": created}, {})
    recommit(hub_stub, REPO, lambda tree: [tree.pop(p) for p in list(tree) if p.startswith(f"data/{RUN}/")])
    Writer(old, run="fedcba987654", dir_id="dirold000000", start=5).parts(5)
    client = connect(hub_stub, old)
    client.push(old, "fedcba987654")
    card = DatasetCard(client.write_card({**RUN_INFO, "run_id": "fedcba987654", "created": "2026-01-01T00:00:00Z"}, {}))
    assert [(c["config_name"], c.get("default")) for c in card.data.configs] == [("fedcba987654", True)]


def test_push_only_counts_the_rows_it_committed_not_those_another_pusher_committed(hub_stub, ckpt, capsys):
    """--push-only said "pushed 30 rows" when a concurrent pusher had committed those rows between its first
    look and its commit (its commit lost the race, and the rows were on the Hub at its next look): push()
    returned the rows pending at the first look. It counts what this process committed now."""
    from vlm_caption import endings
    from vlm_caption.config import RunConfig

    Writer(ckpt).parts(10, 10, 10)
    mine, other = connect(hub_stub, ckpt), connect(hub_stub, ckpt)
    real = mine.api.create_commit
    raced = []

    def another_pusher_first(*args, **kwargs):
        if not raced:
            raced.append(other.push(ckpt, RUN, None))  # the worker's own pusher commits the same rows first
        return real(*args, **kwargs)

    mine.api.create_commit = another_pusher_first
    code = endings.push_only(RunConfig(checkpoint_dirs=[str(ckpt)]), {"run_id": RUN}, hub_client=mine)
    out = capsys.readouterr().out
    assert raced == [30] and code == 0, out
    assert "pushed 0 rows" in out and "30 rows were pushed meanwhile by another process" in out, out
    assert len(once(hub_stub)) == 30
    Writer(ckpt, start=30).parts(5)
    assert mine.push(ckpt, RUN, None) == 5  # no race: what it committed, as before
