"""hub_key_cache.py: each published Hub file is read once per checkpoint dir, not once per process start."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hub_parts import REPO, RUN, Writer, data_files, make_rows  # noqa: F401

from vlm_caption import hub
from vlm_caption.hub_index import HubFileInfo
from vlm_caption.hub_key_cache import KEY_CACHE_DIR, KeyCache, upload_ids
from vlm_caption.store import QUARANTINE_DIR

RUNS = 4  # a run published as this many files, by this many workers of one dir


def connect(stub, ckpt=None):
    return hub.connect(REPO, endpoint=stub.endpoint, retry=hub.RetryPolicy(sleep=lambda s: None),
                       checkpoint_dir=ckpt)


def publish(stub, ckpt) -> set[str]:
    """RUNS files of one dir on the Hub (some captions flagged); returns their keys."""
    for w in range(RUNS):
        rows = make_rows(0, 5, worker=w)
        rows[0]["caption_flags"] = ["repetition"]
        writer = Writer(ckpt, worker=w)
        writer.store.write_part(rows)
    client = connect(stub, ckpt)
    client.push(ckpt, RUN)
    assert len(data_files(stub)) == RUNS
    return {r["key"] for w in range(RUNS) for r in make_rows(0, 5, worker=w)}


def data_reads(stub) -> Counter:
    """GETs of each data file so far (the key column is read by range requests)."""
    return Counter(name for name, _, _ in stub.downloads if name.startswith("data/"))


def test_files_pushed_by_the_dir_are_never_read_back_by_its_later_processes(hub_stub, tmp_path):
    ckpt = tmp_path / "ckpt"
    keys = publish(hub_stub, ckpt)
    before = data_reads(hub_stub)
    later = connect(hub_stub, ckpt)  # a relaunch, or another worker of the dir
    snap = later.snapshot(RUN)
    assert snap.keys == keys and not snap.unreadable
    assert later.index(RUN).flag_counts(snap) == {"repetition": RUNS}  # the card's counts come with the keys
    assert data_reads(hub_stub) == before  # nothing read from the Hub: the push left each file's keys


def test_another_dir_reads_each_file_once_then_never_again(hub_stub, tmp_path):
    keys = publish(hub_stub, tmp_path / "pushed")
    before = data_reads(hub_stub)
    other = tmp_path / "other"  # a fresh dir on another machine, say
    assert connect(hub_stub, other).snapshot(RUN).keys == keys
    once = data_reads(hub_stub) - before
    assert set(once) == set(data_files(hub_stub))
    for _ in range(2):
        assert connect(hub_stub, other).snapshot(RUN).keys == keys
    assert data_reads(hub_stub) - before == once
    no_dir = connect(hub_stub)  # without a dir a process keeps what it read to itself
    no_dir.snapshot(RUN)
    no_dir.snapshot(RUN)
    assert data_reads(hub_stub) - before == once + once


def test_workers_of_a_dir_starting_together_read_each_file_once(hub_stub, tmp_path):
    keys = publish(hub_stub, tmp_path / "pushed")
    alone = tmp_path / "alone"
    before = data_reads(hub_stub)
    connect(hub_stub, alone).snapshot(RUN)
    one_reader = data_reads(hub_stub) - before

    shared, workers = tmp_path / "shared", 8
    clients = [connect(hub_stub, shared) for _ in range(workers)]  # each its own cache object, as processes
    barrier, seen, errors = threading.Barrier(workers), [], []

    def start(client):
        barrier.wait()
        try:
            seen.append(client.snapshot(RUN).keys)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    before = data_reads(hub_stub)
    threads = [threading.Thread(target=start, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and seen == [keys] * workers
    assert data_reads(hub_stub) - before == one_reader  # not `workers` times as many


def test_an_unreadable_entry_is_quarantined_and_the_file_read_again(hub_stub, tmp_path, caplog):
    keys = publish(hub_stub, tmp_path / "pushed")
    other = tmp_path / "other"
    connect(hub_stub, other).snapshot(RUN)
    entry = sorted((other / KEY_CACHE_DIR).glob("*.parquet"))[0]
    entry.write_bytes(b"torn")
    before = data_reads(hub_stub)
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, other).snapshot(RUN).keys == keys
    assert sum((data_reads(hub_stub) - before).values()) >= 1
    assert [r for r in caplog.records if "unreadable Hub key cache entry" in r.getMessage()]
    assert len(list((other / QUARANTINE_DIR).iterdir())) == 1 and entry.is_file()  # set aside, then rewritten


def test_an_entry_another_worker_stored_again_since_this_one_found_it_torn_is_not_set_aside(tmp_path, caplog):
    """Workers starting together read the same torn entry without the lock; one set it aside, read the Hub file
    under the lock and stored it again; another then set that good entry aside too, with a false warning, and read
    the Hub file again (as did every worker after it)."""
    from vlm_caption import hub_key_cache
    from vlm_caption.hub_key_cache import FileEntry

    entry = FileEntry(["a", "b"], {}, pa.schema([("key", pa.string())]))
    path = tmp_path / KEY_CACHE_DIR / "git-1.parquet"
    path.parent.mkdir()
    path.write_bytes(b"torn")
    hub_reads, acted = [], []
    real_read_table = hub_key_cache.pq.read_table

    def read():
        hub_reads.append(1)
        return entry

    def the_other_worker_acts_after_this_read(*a, **kw):
        if acted:
            return real_read_table(*a, **kw)
        acted.append(1)
        try:
            return real_read_table(*a, **kw)  # this worker's read, without the lock, of the torn entry
        finally:  # the other worker, before this one's next step
            assert KeyCache(tmp_path).get_or_read("git-1", read) == entry

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(hub_key_cache.pq, "read_table", the_other_worker_acts_after_this_read)
        assert KeyCache(tmp_path).get_or_read("git-1", read) == entry
    assert len(hub_reads) == 1 and len(list((tmp_path / QUARANTINE_DIR).iterdir())) == 1
    assert len([r for r in caplog.records if "unreadable Hub key cache entry" in r.getMessage()]) == 1
    assert pq.read_table(path).column("key").to_pylist() == ["a", "b"]


def test_an_lfs_file_is_known_by_the_sha256_of_its_content():
    """huggingface.co stores parquet in LFS: its listing names the content's sha256, which an upload knows."""
    from huggingface_hub.hf_api import RepoFile

    table = pa.table({"key": ["a", "b"], "caption_flags": pa.array([["empty"], None], pa.list_(pa.string()))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    sha = hashlib.sha256(data).hexdigest()
    listed = RepoFile(path="data/x.parquet", size=len(data), oid="0" * 40,
                      lfs={"size": len(data), "oid": sha, "pointerSize": 134})
    cache = KeyCache()
    cache.put_upload(data)
    assert HubFileInfo.of(listed).content_id in upload_ids(data)
    entry = cache.get(HubFileInfo.of(listed).content_id)
    assert entry.keys == ["a", "b"] and entry.flags == {"caption_flags": {"empty": 1}}


def test_a_file_lock_held_by_a_stopped_worker_delays_the_others_but_never_stops_them(hub_stub, tmp_path,
                                                                                     monkeypatch, caplog):
    """A worker of the dir stopped while it reads a file (Ctrl-Z, a suspended job) keeps its lock: the others
    wait a while, then read that file themselves (a second read, never a hang)."""
    import fcntl
    import os

    keys = publish(hub_stub, tmp_path / "pushed")
    other = tmp_path / "other"
    connect(hub_stub, other).snapshot(RUN)
    for entry in (other / KEY_CACHE_DIR).glob("*.parquet"):
        entry.unlink()  # as if the stopped worker had not stored them yet
    held = [os.open(p, os.O_RDWR) for p in (other / KEY_CACHE_DIR).glob("*.lock")]
    for fd in held:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file, so it stops this process's reader too
    monkeypatch.setattr(KeyCache, "lock_wait_s", 0.2, raising=False)
    seen = []
    reader = threading.Thread(target=lambda: seen.append(connect(hub_stub, other).snapshot(RUN).keys), daemon=True)
    try:
        with caplog.at_level(logging.WARNING):
            reader.start()
            reader.join(timeout=30)
            assert not reader.is_alive(), "a held file lock stopped the dir's other workers"
    finally:
        for fd in held:
            os.close(fd)
        reader.join(timeout=30)
    assert seen == [keys] and len(held) == RUNS
    assert [r for r in caplog.records if "stayed locked" in r.getMessage()]


def _foreign_keys(entries):
    for entry in entries:
        pq.write_table(pa.table({"key": ["elsewhere-1", "elsewhere-2"]}), entry)  # any parquet with a key column


def _int_keys(entries):
    for entry in entries:
        table = pq.read_table(entry)
        pq.write_table(pa.table({"key": list(range(table.num_rows))}).replace_schema_metadata(table.schema.metadata),
                       entry)


def _another_files_entry(entries):
    datas = [e.read_bytes() for e in entries]
    for entry, data in zip(entries, datas[1:] + datas[:1]):  # renamed, or copied under the wrong name
        entry.write_bytes(data)


def _flag_counts_of_another_shape(entries):
    for entry in entries:
        table = pq.read_table(entry)
        meta = {k: (b'{"caption_flags": 3}' if k.endswith(b"flag_counts") else v)
                for k, v in table.schema.metadata.items()}
        pq.write_table(table.replace_schema_metadata(meta), entry)


def _dirs_in_their_place(entries):
    for entry in entries:
        entry.unlink()
        entry.mkdir()
        (entry / "x").write_text("x")


@pytest.mark.parametrize("spoil", [_foreign_keys, _int_keys, _another_files_entry, _flag_counts_of_another_shape,
                                   _dirs_in_their_place])
def test_an_entry_that_is_not_the_keys_of_its_file_is_quarantined_never_trusted(hub_stub, tmp_path, caplog, spoil):
    """A cache entry is trusted by its name: a parquet that is not what this cache wrote under that name (a
    foreign file, another file's entry, a hand edit of its shape) is set aside and the file read again."""
    keys = publish(hub_stub, tmp_path / "pushed")
    other = tmp_path / "other"
    connect(hub_stub, other).snapshot(RUN)
    spoil(sorted((other / KEY_CACHE_DIR).glob("*.parquet")))
    later = connect(hub_stub, other)
    with caplog.at_level(logging.WARNING):
        snap = later.snapshot(RUN)
    assert snap.keys == keys  # not one row more to push, nor one less
    assert later.index(RUN).flag_counts(snap) == {"repetition": RUNS}
    assert [r for r in caplog.records if "unreadable Hub key cache entry" in r.getMessage()]
    assert len(list((other / QUARANTINE_DIR).iterdir())) == RUNS


@pytest.mark.parametrize("column", [pa.array([1, 2]), pa.array([["a"], ["b"]]), pa.array([b"\xff", b"x"])])
def test_a_hub_file_whose_keys_are_not_text_is_unreadable_not_a_crash(hub_stub, tmp_path, column):
    """A parquet added by hand to the run's folder with a `key` column of ints (lists, bytes): its keys could
    not be cached as text, and every push and check of the run ended in a traceback."""
    import io

    from test_exactly_once_more import recommit

    keys = publish(hub_stub, tmp_path / "pushed")
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": column}), buf)
    foreign = f"data/{RUN}/by-hand.parquet"
    recommit(hub_stub, REPO, lambda tree: tree.update({foreign: hub_stub._put_blob(buf.getvalue())}))
    ckpt = tmp_path / "more"
    Writer(ckpt, worker=RUNS, dir_id="dirm00000000").parts(3)
    client = connect(hub_stub, ckpt)
    snap = client.snapshot(RUN)
    assert snap.keys == keys and snap.unreadable == [foreign]
    assert client.push(ckpt, RUN) == 3 and connect(hub_stub, ckpt).snapshot(RUN).unreadable == [foreign]


def test_a_snapshot_names_the_image_of_each_published_key_read_or_pushed(hub_stub, tmp_path):
    """What a run of another data set under the same keys is told apart by (image_match.py)."""
    keys = publish(hub_stub, tmp_path / "pushed")
    images = {r["key"]: r["sha256"] for w in range(RUNS) for r in make_rows(0, 5, worker=w)}
    assert set(images) == keys and all(images.values())
    assert connect(hub_stub, tmp_path / "pushed").snapshot(RUN).images() == images  # kept at the push
    assert connect(hub_stub, tmp_path / "other").snapshot(RUN).images() == images  # read from the Hub
    assert connect(hub_stub, tmp_path / "other").snapshot(RUN).images() == images  # from the dir's cache


def test_an_entry_an_older_version_kept_without_images_is_read_again(hub_stub, tmp_path, caplog):
    publish(hub_stub, tmp_path / "pushed")
    other = tmp_path / "other"
    images = connect(hub_stub, other).snapshot(RUN).images()
    for path in (other / KEY_CACHE_DIR).glob("*.parquet"):  # as the version before images were kept wrote it
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["sha256"]), path)
    before = data_reads(hub_stub)
    with caplog.at_level(logging.WARNING):
        assert connect(hub_stub, other).snapshot(RUN).images() == images
    assert set(data_reads(hub_stub) - before) == set(data_files(hub_stub))  # each file read once more
    assert not (other / QUARANTINE_DIR).exists() and not caplog.records  # an old entry, not a corrupt one


def test_the_tree_of_a_commit_is_listed_once_however_often_it_is_read(hub_stub, tmp_path):
    """Before: each snapshot listed the repo's tree anew (--push-only read the repo five times: five listings,
    each a page per 1,000 files on the Hub, 125 pages at 1,000 files in the stub's pages of 8). A commit's tree
    never changes: a snapshot of the same head lists nothing; one after a commit lists the new tree."""
    tree = r"/api/datasets/.*/tree/"
    ckpt = tmp_path / "ckpt"
    keys = publish(hub_stub, ckpt)
    client = connect(hub_stub, ckpt)
    first = client.snapshot(RUN)
    listed = hub_stub.count("GET", tree)
    assert first.keys == keys and listed >= 2  # data/ and the run's folder
    again = client.snapshot(RUN)
    assert hub_stub.count("GET", tree) == listed and again.files == first.files and again.head == first.head
    again.files.clear()  # a caller's snapshot is its own
    assert client.snapshot(RUN).files == first.files
    Writer(ckpt, worker=0).store.write_part(make_rows(100, 3, worker=0))
    assert client.push(ckpt, RUN) == 3
    after = client.snapshot(RUN)
    assert after.head != first.head and hub_stub.count("GET", tree) > listed
    assert after.keys == keys | {r["key"] for r in make_rows(100, 3, worker=0)} and len(after.files) == RUNS + 1
