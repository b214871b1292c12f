"""What the steps without a model read and hold, counted at small scale: the costs that grow with the data set's
size (benchmarks/bench_scale.py measures them at 400K rows)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hub_parts import REPO, ckpt, client, sleeps  # noqa: F401  (fixtures)

from vlm_caption import dataset
from vlm_caption.sample_data import write_sample
from vlm_caption.schema import IMAGE_PATH


def shard_layout_sample(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """A sample in img2dataset's layout without full_metadata.parquet (the shard parquets are read)."""
    data = write_sample(tmp_path / "data", n=6, broken=False, seed=3, shard_size=3)
    full = {r["key"]: r for r in pq.read_table(data / "full_metadata.parquet").to_pylist()}
    (data / "full_metadata.parquet").unlink()
    return data, full


def count_listings(monkeypatch, folder: Path) -> list[str]:
    """Every listing of a subfolder of `folder` (os.scandir or os.listdir) is recorded."""
    listed: list[str] = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def spy(path=".", _real=real):
            if Path(path).parent == folder:
                listed.append(str(path))
            return _real(path)

        monkeypatch.setattr(os, name, spy)
    return listed


def test_shard_rows_find_their_image_without_listing_the_shard_folder(tmp_path, monkeypatch):
    """img2dataset names each file {key}.jpg: one stat finds it. Listing every shard folder (10K-30K entries
    each) cost a relaunch with a few keys left ~6.7 s per worker at 400K rows."""
    data, full = shard_layout_sample(tmp_path)
    listed = count_listings(monkeypatch, data / "images")
    rows = list(dataset.iter_rows(data, set(full)))
    assert {r["key"]: r[IMAGE_PATH] for r in rows} == {k: data / r["file_name"] for k, r in full.items()}
    assert listed == []


def test_a_shard_image_of_another_suffix_is_still_found(tmp_path):
    data, full = shard_layout_sample(tmp_path)
    key = sorted(full)[1]
    jpg = data / full[key]["file_name"]
    png = jpg.with_suffix(".png")
    jpg.rename(png)
    rows = {r["key"]: r[IMAGE_PATH] for r in dataset.iter_rows(data, set(full))}
    assert rows[key] == png
    assert all(path.is_file() for path in rows.values())


def test_a_key_in_two_shards_is_read_from_the_selected_shard(tmp_path):
    """--shards 1 with a key also in shard 0: the plan takes it from shard 1, so must the read (it captioned
    shard 0's image, a shard the user did not select)."""
    data, _ = shard_layout_sample(tmp_path)
    first = pq.read_table(data / "images" / "00000.parquet")
    second = pq.read_table(data / "images" / "00001.parquet")
    repeated = first.column("key")[0].as_py()
    keys = [repeated, *second.column("key").to_pylist()[1:]]
    second = second.set_column(second.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))
    pq.write_table(second, data / "images" / "00001.parquet")
    plan = dataset.plan_work(data, shards=[1], max_images=None, worker=0, num_workers=1, done_keys=set(),
                             failed_keys=set())
    assert plan.todo_keys == set(keys)
    rows = {r["key"]: r[IMAGE_PATH] for r in plan.rows(data)}
    assert rows == {k: data / "images" / "00001" / f"{k}.jpg" for k in keys}


def test_a_small_hub_file_is_read_in_one_request(hub_stub, client, ckpt):  # noqa: F811
    """A fresh dir reads the keys of every file the run published. A run's periodic pushes make files of a few
    hundred rows (100-250 KB): reading the footer, then the key column, took two requests each (2,027 for
    1,000 files: on the Hub ~40% of the 5,000 requests it allows in 5 minutes); the whole file is one."""
    import random

    from hub_parts import RUN, Writer, data_files, make_rows

    from vlm_caption import hub
    from vlm_caption.hub_index import KEY_READ_BLOCK

    rng = random.Random(0)
    w = Writer(ckpt)
    for start in (0, 300, 600):
        rows = make_rows(start, 300)
        for r in rows:  # captions as long as real ones, incompressible: files of 64-256 KB
            r["vlm_caption"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(900))
        w.store.write_part(rows)
        client.push_pending(ckpt, RUN, 0)
    paths = data_files(hub_stub)
    sizes = [len(data) for path, data in hub_stub.repo_files(REPO).items() if path in paths]
    assert len(paths) == 3 and all(64 * 1024 < n <= KEY_READ_BLOCK for n in sizes), sizes
    hub_stub.downloads.clear()
    snap = hub.connect(REPO, endpoint=hub_stub.endpoint).snapshot(RUN)  # another machine: nothing cached
    assert len(snap.keys) == 900
    assert sorted(name for name, _, _ in hub_stub.downloads if name.startswith("data/")) == paths


def test_a_hub_file_is_built_holding_its_rows_about_once(tmp_path):
    """hub_file_bytes held a file's rows about four times over (filtered, sorted, de-duplicated copies of the
    whole table; up to 100K rows a file): a 50K-row file of 3,600-character captions took 735 MB of Arrow
    memory (now 435 MB). Arrow's allocations are counted, not timed: they are the same on every machine."""
    import random

    import pyarrow as pa
    from hub_parts import make_rows

    from vlm_caption.hub_files import HubFile, hub_file_bytes
    from vlm_caption.store import CheckpointStore, list_parts

    store, rng = CheckpointStore(tmp_path, 0), random.Random(0)
    for start in range(0, 24000, 3000):
        rows = make_rows(start, 3000)
        for r in rows:
            r["vlm_caption"] = rng.randbytes(500).hex()
        store.write_part(rows[::-1] + rows[:10])  # out of order, a few keys twice
    parts = list_parts(tmp_path)
    keys = [r["key"] for r in make_rows(0, 24000)][10:]  # a few published already
    rows_bytes = sum(pq.read_table(p.path).nbytes for p in parts)
    default = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default)  # counts what is allocated through it, at its peak
    pa.set_memory_pool(pool)
    try:
        data = hub_file_bytes(HubFile("data/x.parquet", 0, parts, keys))
    finally:
        pa.set_memory_pool(default)
    table = pq.read_table(pa.BufferReader(data))
    assert table.column("key").to_pylist() == sorted(keys)
    assert pool.max_memory() < 2.75 * rows_bytes, (pool.max_memory(), rows_bytes)
