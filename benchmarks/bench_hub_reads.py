#!/usr/bin/env python3
"""Hub requests made when many workers of one checkpoint dir start together against a published run.

Every worker reads which keys the repo holds before captioning (hub_index.py): the key column of every file of
the run. Publishes --files files of --rows rows to the local Hub stub (tests/hub_stub.py, driven by the real
huggingface_hub client), then starts --workers clients at once (threads, each its own client and cache, as
processes have) three ways:

    no_dir     each keeps what it read to itself (how every process worked before hub_key_cache.py)
    fresh_dir  all share one new checkpoint dir: one of them reads each file, the others wait for it
    relaunch   the same dir again: every file is known already

    python benchmarks/bench_hub_reads.py --files 200 --workers 64

Prints one JSON line per way: {"way", "workers", "files", "requests", "data_file_gets", "wall_s"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

REPO, RUN, DIR = "tester/bench-hub-reads", "0123456789ab", "d1r0000000aa"


def publish(stub, work: Path, files: int, rows: int) -> None:
    from hub_parts import Writer

    from vlm_caption import hub

    ckpt = work / "publisher"
    for w in range(files):
        Writer(ckpt, worker=w, run=RUN, dir_id=DIR).parts(rows)
    hub.connect(REPO, endpoint=stub.endpoint, checkpoint_dir=ckpt).push(ckpt, RUN)


def start_together(stub, workers: int, ckpt: Path | None) -> dict:
    from vlm_caption import hub

    clients = [hub.connect(REPO, endpoint=stub.endpoint, checkpoint_dir=ckpt) for _ in range(workers)]
    barrier, keys, errors = threading.Barrier(workers), [], []

    def start(client) -> None:
        barrier.wait()
        try:
            keys.append(len(client.snapshot(RUN).keys))
        except Exception as e:  # noqa: BLE001 - printed below
            errors.append(repr(e))

    requests, gets = len(stub.requests), len(stub.downloads)
    threads = [threading.Thread(target=start, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors or len(set(keys)) != 1:
        raise SystemExit(f"workers disagreed or failed: {set(keys)} {errors[:3]}")
    return {"requests": len(stub.requests) - requests,
            "data_file_gets": sum(1 for name, _, _ in stub.downloads[gets:] if name.startswith("data/")),
            "wall_s": round(wall, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--rows", type=int, default=20, help="rows per published file")
    p.add_argument("--workers", type=int, default=64)
    args = p.parse_args()
    os.environ.update({"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"})
    from hub_stub import HubStub

    work = Path(tempfile.mkdtemp(prefix="bench_hub_reads_"))
    os.environ["HF_HOME"] = str(work / "hf_home")  # never a developer's login or cache
    stub = HubStub(work / "stub").start()
    os.environ["HF_TOKEN"] = stub.token
    try:
        publish(stub, work, args.files, args.rows)
        shared = work / "shared"
        for way, ckpt in (("no_dir", None), ("fresh_dir", shared), ("relaunch", shared)):
            print(json.dumps({"way": way, "workers": args.workers, "files": args.files,
                              **start_together(stub, args.workers, ckpt)}), flush=True)
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
