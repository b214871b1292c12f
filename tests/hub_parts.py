"""What the Hub tests share: a test run's names, rows, a part writer, the client fixtures, and the check that a
repo holds exactly a checkpoint dir's rows (tests/hub_stub.py is the stub itself, conftest.py its fixture)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hub_stub import REPO_ROOT_HINT, HubStub

from vlm_caption import hub
from vlm_caption.atomic import atomic_write_json
from vlm_caption.store import LEDGER, OUTPUT_SCHEMA, RUN_JSON, CheckpointStore, list_parts

REPO = "tester/contrastyles-recap"
RUN = "0123456789ab"
DIR = "d1r0000000aa"
COMMIT = r"/api/datasets/.*/commit/"


def make_rows(start: int, n: int, worker: int = 0) -> list[dict]:
    return [{
        "key": f"{worker:02d}{i:07d}", "original_key": str(i), "url": f"https://img.example/{i}.jpg",
        "original_caption": f"alt text {i}", "vlm_caption": f"a painting, number {i}", "width": 64 + i,
        "height": 48, "original_width": 640, "original_height": 480, "sha256": f"{i:064x}", "md5": f"{i:032x}",
        "tags": "oil painting", "merged_tags": "oil painting,impressionism", "caption_model": "tiny",
        "caption_finish": "stop", "caption_tokens": 7,
    } for i in range(start, start + n)]


def hub_name(first: int, last: int, worker: int = 0, run: str = RUN, dir_id: str = DIR) -> str:
    """The Hub path of parts first..last without its content digest."""
    return f"data/{run}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}"


def names(paths: list[str]) -> list[str]:
    return [p.rsplit("-", 1)[0] for p in paths]


class Writer:
    """Writes parts for one worker of the test run (a dir holding run RUN), with keys that never repeat."""

    def __init__(self, ckpt: Path, worker: int = 0, run: str = RUN, dir_id: str = DIR, start: int = 0):
        if not (ckpt / RUN_JSON).exists():
            atomic_write_json(ckpt / RUN_JSON, {"run_id": run, "dir_id": dir_id, "model": "tiny"})
        self.store, self.worker, self.next = CheckpointStore(ckpt, worker), worker, start
        self.store.run_id, self.store.dir_id = run, dir_id

    def parts(self, *sizes: int) -> int:
        for n in sizes:
            self.store.write_part(make_rows(self.next, n, self.worker))
            self.next += n
        return sum(sizes)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(hub_stub, sleeps):
    return hub.connect(REPO, endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=sleeps.append))


def store_keys(parts):
    from vlm_caption.store import read_keys

    return list(read_keys(parts))


def ledger(ckpt: Path) -> list[dict]:
    path = ckpt / LEDGER
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def data_files(stub, repo=REPO) -> list[str]:
    return sorted(p for p in stub.repo_files(repo) if p.startswith("data/"))


def assert_hub_matches(stub: HubStub, repo_id: str, checkpoint_dir, run_id: str | None = None) -> list[dict]:
    """The Hub's data/ rows hold every key exactly once and equal the merged local parts (all workers)."""
    files = stub.repo_files(repo_id)
    hub_rows: list[dict] = []
    for path, data in sorted(files.items()):
        if not (path.startswith("data/") and path.endswith(".parquet")):
            continue
        if run_id is not None and not path.startswith((f"data/{run_id}/", f"data/{run_id}-")):
            continue
        table = pq.read_table(io.BytesIO(data))
        assert table.schema.equals(OUTPUT_SCHEMA), f"{path} has schema {table.schema}"
        hub_rows.extend(table.to_pylist())
    keys = [r["key"] for r in hub_rows]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    assert not dupes, f"{len(dupes)} keys are on the Hub more than once, e.g. {dupes[:5]}"
    local_rows: list[dict] = []
    for part in list_parts(checkpoint_dir):
        local_rows.extend(pq.read_table(part.path, schema=OUTPUT_SCHEMA).to_pylist())
    by_key = sorted(hub_rows, key=lambda r: r["key"])
    assert by_key == sorted(local_rows, key=lambda r: r["key"]), (
        f"Hub holds {len(hub_rows)} rows, the checkpoint dir {len(local_rows)}")
    return by_key


_PUSH_SCRIPT = """
import sys
from vlm_caption import hub
client = hub.connect(sys.argv[1], endpoint=sys.argv[2], checkpoint_dir=sys.argv[3] if sys.argv[5] == "1" else None)
client.push_pending(sys.argv[3], sys.argv[4], 0)
"""


def push_killed_after_commit(stub: HubStub, ckpt: Path, tmp_path: Path, *, key_cache: bool = False) -> int:
    """push_pending of `ckpt` in a child process, SIGKILLed once the Hub applied its commit and before the answer
    reached it (the commit hangs): what a kill between a commit and its local record leaves. Its return code."""
    stub.inject("POST", COMMIT, "hang")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": stub.token, "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": REPO_ROOT_HINT}
    proc = subprocess.Popen([sys.executable, "-c", _PUSH_SCRIPT, REPO, stub.endpoint, str(ckpt), RUN,
                             "1" if key_cache else "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert stub.wait_for(lambda: stub.commits_applied == 1, timeout=300), proc.stdout.read1()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode
