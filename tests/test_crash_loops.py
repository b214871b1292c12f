"""Reliability: SIGKILL the real CLI again and again, rerun, and count.

One checkpoint dir and one Hub repo (the local stub) live through eleven runs of batched_image_inference.py:
ten are killed at chosen moments (mid-generation, mid part write, a Hub commit applied but not answered, the
ledger write, the failures write, the end-of-run merge, the summary, the dataset card), one of them meets
transient Hub faults (500, 429 + Retry-After, a dropped connection), and the last runs to the end. Then every
key of full_metadata must be captioned or failed exactly once, the Hub must hold exactly all_captions.parquet,
no tmp file may remain, and the (canary) token must appear in no output, file or Hub copy.

The moments are picked by events, not by luck: the number of parts, a stub counter, or a tmp file that exists
only while it is written. To hold a write open long enough to be seen, the run gets a stalling disk: its os.fsync
stalls for files whose path matches a pattern (the launcher below wraps os.fsync, then runs the CLI unchanged).
Seeded random delays vary where in generation the first kill lands, reproducibly (CRASH_LOOP_SEED picks others).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hub_parts import assert_hub_matches
from hub_stub import REPO_ROOT_HINT, HubStub

from batched_image_inference import main
from vlm_caption import hub, store
from vlm_caption.errors import EXIT_OK

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "batched_image_inference.py"
REPO_ID = "tester/crash-loop"
COMMIT = r"/api/datasets/.*/commit/"
SEED = int(os.environ.get("CRASH_LOOP_SEED", "1234"))  # another seed: other moments, as reproducibly
TOKENS = "16"  # --max-tokens = --min-tokens: every caption costs the same, so runs last long enough to be hit
KILLED = -signal.SIGKILL

# Runs the CLI as `python batched_image_inference.py ...` would, on a disk that stalls: the n-th fsync of a file
# whose path matches $TEST_HOLD_FSYNC waits until the file $TEST_GATE_DIR/n exists (no gate dir: forever).
# The test sees the file being written and kills the run there, or lets writes through one at a time.
LAUNCHER = r"""
import os, re, runpy, sys, time
hold, gate = os.environ.pop("TEST_HOLD_FSYNC", ""), os.environ.pop("TEST_GATE_DIR", "")
if hold:
    real_fsync, held = os.fsync, [0]
    def fsync(fd):
        if re.search(hold, os.readlink(f"/proc/self/fd/{fd}")):
            n, held[0] = held[0], held[0] + 1
            while not (gate and os.path.exists(os.path.join(gate, str(n)))):
                time.sleep(0.01)
        real_fsync(fd)
    os.fsync = fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parquet_keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def hub_data_paths(stub: HubStub) -> set[str]:
    return {p for p in stub.repo_files(REPO_ID) if p.startswith("data/")}


def ledger_paths(ckpt: Path) -> set[str]:
    return {e["hub_path"] for e in hub.read_ledger(ckpt)}


def hang_count(stub: HubStub) -> int:
    return sum(1 for _, _, outcome in list(stub.requests) if outcome == "hang")


def tmp_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.rglob(".*.tmp-*"))


@dataclass
class Kill:
    label: str
    returncode: int
    parts: int  # parts in the checkpoint dir after the kill
    seconds: float  # from launch to kill
    evidence: dict = field(default_factory=dict)


class CrashLoop:
    """Launches the CLI against one checkpoint dir and stub, kills it at an event, keeps every output."""

    def __init__(self, stub: HubStub, model: Path, data: Path, work: Path):
        self.stub, self.work = stub, work
        self.ckpt = work / "ckpt"
        self.logs: list[Path] = []
        self.kills: list[Kill] = []
        self.args = ["--model", str(model), "--data-dir", str(data), "--checkpoint-dir", str(self.ckpt),
                     "--hf-repo", REPO_ID, "--hub-endpoint", stub.endpoint, "--batch-size", "4",
                     "--checkpoint-every", "8", "--push-every", "16", "--min-push-interval", "0",
                     "--hub-commits-per-hour", "100000",
                     "--max-tokens", TOKENS, "--min-tokens", TOKENS, "--num-loader-workers", "2"]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": stub.token, "HF_ENDPOINT": stub.endpoint,
                    "HF_HOME": str(work / "hf_home"), "PYTHONPATH": REPO_ROOT_HINT,
                    # One torch thread: two cores are shared with the test process and other work, and OpenMP
                    # threads spinning against each other made a run 10x slower.
                    "OMP_NUM_THREADS": "1"}

    def parts(self) -> int:
        return len(store.list_parts(self.ckpt))

    def has_tmp(self, pattern: str) -> bool:
        return any(re.search(pattern, str(p)) for p in tmp_files(self.ckpt)) if self.ckpt.is_dir() else False

    def launch(self, label: str, hold: str | None = None, gate: Path | None = None,
               extra: tuple[str, ...] = ()) -> subprocess.Popen:
        n = len(self.logs) // 2
        out, err = self.work / f"run{n:02d}-{label}.out", self.work / f"run{n:02d}-{label}.err"
        self.logs += [out, err]
        env = dict(self.env)
        if hold:
            env["TEST_HOLD_FSYNC"] = hold
        if gate:
            env["TEST_GATE_DIR"] = str(gate)
        with open(out, "wb") as o, open(err, "wb") as e:
            return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(CLI), *self.args, *extra], cwd=self.work,
                                    env=env, stdout=o, stderr=e)

    def tail(self) -> str:
        return "".join(p.read_text(errors="replace")[-3000:] for p in self.logs[-2:])

    def kill_when(self, label: str, trigger, *, hold: str | None = None, gate: Path | None = None,
                  delay: float = 0.0, during=None, extra: tuple[str, ...] = (), timeout: float = 120.0) -> Kill:
        """Launch, wait for trigger() (calling during() meanwhile), wait `delay` more, SIGKILL."""
        proc = self.launch(label, hold, gate, extra)
        started = time.monotonic()
        deadline = started + timeout
        try:
            while not trigger():
                if during is not None:
                    during()
                assert proc.poll() is None, f"{label}: the run ended (exit {proc.returncode}) before its kill " \
                                            f"moment:\n{self.tail()}"
                assert time.monotonic() < deadline, f"{label}: no kill moment in {timeout} s:\n{self.tail()}"
                time.sleep(0.005)
            time.sleep(delay)
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
        kill = Kill(label, proc.returncode, self.parts(), round(time.monotonic() - started, 2))
        self.kills.append(kill)
        return kill

    def run_to_end(self, label: str, timeout: float = 120.0) -> int:
        proc = self.launch(label)
        try:
            return proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class OneFaultPerPush:
    """Transient commit faults, one per push, with the run's part writes held at the gate: each fault goes in with
    two more parts let through (push_every rows), the next once the fault was answered and its retry committed."""

    def __init__(self, stub: HubStub, gate: Path, faults: list[tuple[str, float | None]]):
        self.stub, self.gate, self.todo = stub, gate, list(faults)
        self.base, self.injected, self.hit_at, self.released = self._hits(), 0, None, 0
        self._next()

    def _hits(self) -> int:
        return sum(1 for m, p, outcome in list(self.stub.requests)
                   if m == "POST" and re.search(COMMIT, p) and outcome not in ("ok", "hang"))

    def _next(self) -> None:
        kind, retry_after = self.todo.pop(0)
        self.stub.inject("POST", COMMIT, kind, retry_after=retry_after)
        self.injected, self.hit_at = self.injected + 1, None
        for _ in range(2):
            (self.gate / str(self.released)).touch()
            self.released += 1

    def step(self) -> None:
        if self.hit_at is None and self._hits() - self.base == self.injected:
            self.hit_at = self.stub.commits_applied  # the fault was answered; its retry comes next
        if self.todo and self.hit_at is not None and self.stub.commits_applied > self.hit_at:
            self._next()

    def done(self) -> bool:
        return not self.todo and self.hit_at is not None and self.stub.commits_applied > self.hit_at


def run_crash_loop(loop: CrashLoop, rng: random.Random) -> int:
    """Ten kills, then a run to the end; returns its exit code. Each kill records what it left behind."""
    stub, ckpt = loop.stub, loop.ckpt

    # 1. Mid-generation, a seeded moment after the first part.
    k = loop.kill_when("generation", lambda: loop.parts() >= 1, delay=rng.uniform(0.05, 0.4))
    k.evidence["parts"] = loop.parts()

    # 2. A Hub commit applied whose answer never comes (the first push of the run, a resume backlog or a
    #    periodic one): killed between commit and ledger.
    applied = stub.commits_applied
    stub.inject("POST", COMMIT, "hang")
    k = loop.kill_when("push-unanswered", lambda: stub.commits_applied > applied)
    k.evidence["unledgered_on_hub"] = sorted(hub_data_paths(stub) - ledger_paths(ckpt))

    # 3. Inside the run's first part write (tmp written, not yet renamed).
    k = loop.kill_when("part-write", lambda: loop.has_tmp(r"/parts/\.captions-"), hold=r"/parts/\.captions-")
    k.evidence["stale_part_tmp"] = [p.name for p in tmp_files(ckpt) if p.parent.name == store.PARTS_DIR]

    # 4. Transient faults, one per push: 500, 429 + Retry-After 1, a dropped connection. Part writes wait at a
    #    gate, so generation cannot run ahead of the pushes; killed once every fault was retried through.
    #    Verbose: the debug logs of every library must keep the token out too.
    gate = loop.work / "gate"
    gate.mkdir()
    faults = OneFaultPerPush(stub, gate, [("500", None), ("429", 1), ("drop", None)])
    k = loop.kill_when("faults-then-generation", faults.done, during=faults.step, hold=r"/parts/\.captions-",
                       gate=gate, delay=rng.uniform(0.0, 0.2), extra=("--verbose",))
    k.evidence["faults_answered"] = sorted(o for m, p, o in stub.requests if o in ("500", "429", "drop"))

    # 5. A periodic push during generation, applied but unanswered: the run's second commit (the first is the
    #    backlog of run 4, or a periodic push). The pusher commits one at a time, so once the hang was taken
    #    every earlier commit has its answer; the delay lets the stub apply the held one.
    first, unledgered, hangs = stub.commits_applied, hub_data_paths(stub) - ledger_paths(ckpt), hang_count(stub)
    injected = []

    def hang_second_commit():
        if not injected and stub.commits_applied > first:
            stub.inject("POST", COMMIT, "hang")
            injected.append(True)

    k = loop.kill_when("periodic-push-unanswered", lambda: hang_count(stub) > hangs, during=hang_second_commit,
                       delay=0.3)
    k.evidence["unledgered_on_hub"] = sorted(hub_data_paths(stub) - ledger_paths(ckpt) - unledgered)

    # 6. While a ledger line is written (not yet fsynced): at resume, the line that records the push of run 5
    #    found on the Hub.
    lines = len(hub.read_ledger(ckpt))
    k = loop.kill_when("ledger-write", lambda: len(hub.read_ledger(ckpt)) > lines, hold=r"hub_ledger\.jsonl$")
    k.evidence["new_lines"] = hub.read_ledger(ckpt)[lines:]

    # 7. Inside the failures write at the end of generation: every image is through, failures not yet saved.
    k = loop.kill_when("failures-write", lambda: loop.has_tmp(r"/failures/\.failures-"),
                       hold=r"/failures/\.failures-")
    k.evidence["stale_failures_tmp"] = [p.name for p in tmp_files(ckpt) if p.parent.name == store.FAILURES_DIR]

    # 8. Inside the end-of-run merge (all_captions tmp written, not renamed).
    k = loop.kill_when("merge", lambda: loop.has_tmp(r"/\.all_captions\.parquet\.tmp-"),
                       hold=r"/\.all_captions\.parquet\.tmp-")
    k.evidence["stale_merge_tmp"] = [p.name for p in tmp_files(ckpt) if p.name.startswith(".all_captions")]

    # 9. Inside the run_summary.json write.
    k = loop.kill_when("summary-write", lambda: loop.has_tmp(r"/\.run_summary\.json\.tmp-"),
                       hold=r"/\.run_summary\.json\.tmp-")
    k.evidence["stale_summary_tmp"] = [p.name for p in tmp_files(ckpt) if p.name.startswith(".run_summary")]

    # 10. The dataset card commit applied, its answer never comes.
    applied = stub.commits_applied
    stub.inject("POST", COMMIT, "hang")
    k = loop.kill_when("card-unanswered", lambda: stub.commits_applied > applied)
    k.evidence["card_on_hub"] = "README.md" in stub.repo_files(REPO_ID)
    stub.clear_faults()

    return loop.run_to_end("final")


@dataclass
class LoopResult:
    loop: CrashLoop
    final_code: int  # exit code of the run to the end
    merge_code: int  # exit code of --merge-only's coverage check afterwards


@pytest.fixture(scope="module")
def crash_loop(tiny_model_dir, tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    work = tmp_path_factory.mktemp("crash_loop")
    data = write_sample(work / "data", n=240, broken=True, seed=5, include_broken_in_metadata=True)
    stub = HubStub(work / "hub_stub").start()
    loop = CrashLoop(stub, tiny_model_dir, data, work)
    try:
        code = run_crash_loop(loop, random.Random(SEED))
        merge_code = main(["--merge-only", "--checkpoint-dir", str(loop.ckpt), "--data-dir", str(data)])
        yield LoopResult(loop, code, merge_code)
    finally:
        stub.stop()


def test_every_kill_landed_where_it_was_aimed(crash_loop):
    kills = {k.label: k for k in crash_loop.loop.kills}
    timeline = [(k.label, k.returncode, k.parts, k.seconds) for k in kills.values()]
    assert len(kills) == 10 and all(k.returncode == KILLED for k in kills.values()), timeline
    assert kills["generation"].evidence["parts"] >= 1
    assert kills["push-unanswered"].evidence["unledgered_on_hub"]
    assert kills["part-write"].evidence["stale_part_tmp"]
    assert kills["faults-then-generation"].evidence["faults_answered"] == ["429", "500", "drop"]
    held_push = kills["periodic-push-unanswered"].evidence["unledgered_on_hub"]
    assert held_push
    new_lines = kills["ledger-write"].evidence["new_lines"]  # the held push, found on the Hub at resume
    assert new_lines and all(line.get("recovered") for line in new_lines)
    assert {line["hub_path"] for line in new_lines} >= set(held_push)
    assert kills["failures-write"].evidence["stale_failures_tmp"]
    assert kills["merge"].evidence["stale_merge_tmp"]
    assert kills["summary-write"].evidence["stale_summary_tmp"]
    assert kills["card-unanswered"].evidence["card_on_hub"]


def test_every_key_captioned_or_failed_exactly_once(crash_loop):
    loop = crash_loop.loop
    ckpt, data = loop.ckpt, Path(loop.args[loop.args.index("--data-dir") + 1])
    # The sample's broken images failed: recorded permanent data failures, so the finished run exits 0.
    assert crash_loop.final_code == EXIT_OK, loop.tail()
    expected = parquet_keys(data / "full_metadata.parquet")
    part_keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    assert len(part_keys) == len(set(part_keys)), "a key was captioned twice"
    failed = [k for _, ks in store.read_keys(store.list_failure_files(ckpt)) for k in ks]
    assert failed and len(failed) == len(set(failed)), "a failure was recorded twice"
    merged = parquet_keys(ckpt / store.MERGED)
    assert merged == sorted(part_keys)
    assert not set(merged) & set(failed)
    assert sorted(merged + failed) == sorted(expected)
    summary = json.loads((ckpt / store.SUMMARY).read_text())["checkpoint_dir"]
    assert (summary["captioned"], summary["failed"], summary["duplicate_keys"]) == (len(merged), len(failed), 0)
    # The coverage check of --merge-only agrees.
    assert crash_loop.merge_code == EXIT_OK
    coverage = json.loads((ckpt / "coverage.json").read_text())
    assert (coverage["missing"], coverage["duplicated"], coverage["unexpected_keys"]) == (0, 0, 0)


def test_hub_holds_exactly_the_merged_output(crash_loop):
    loop = crash_loop.loop
    stub, ckpt = loop.stub, loop.ckpt
    hub_rows = assert_hub_matches(stub, REPO_ID, ckpt)  # no key twice, equal to the parts
    assert hub_rows == pq.read_table(ckpt / store.MERGED).to_pylist()
    card = stub.repo_files(REPO_ID)["README.md"].decode()
    stages = Counter(stage for f in store.list_failure_files(ckpt)
                     for stage in pq.read_table(f.path).column("stage").to_pylist())
    by_stage = ", ".join(f"{stage}: {n}" for stage, n in sorted(stages.items()))
    assert f"Rows (captioned images): {len(hub_rows)}; images without a caption, by stage: {by_stage}\n" in card
    # Exactly once, not just "the same bytes twice": no data file was ever committed again.
    repo = stub.repos[("dataset", REPO_ID)]
    committed: dict[str, int] = {}
    previous: dict[str, str] = {}
    for tree in repo.commits.values():
        for path, sha in tree.items():
            if path.startswith("data/") and previous.get(path) != sha:
                committed[path] = committed.get(path, 0) + 1
        previous = tree
    assert committed and all(n == 1 for n in committed.values()), committed
    ledger = hub.read_ledger(ckpt)
    assert {e["hub_path"] for e in ledger} == set(committed)
    assert sum(1 for e in ledger if e.get("recovered")) >= 2  # the two unanswered pushes, found on the Hub
    ledgered_parts = [name for e in ledger for name in e["parts"]]
    assert sorted(ledgered_parts) == sorted(p.path.name for p in store.list_parts(ckpt))


def test_no_tmp_file_remains(crash_loop):
    assert tmp_files(crash_loop.loop.ckpt) == []


def test_token_never_printed_or_written(crash_loop):
    loop = crash_loop.loop
    token = loop.stub.token
    secrets = [token.encode(), token[len("hf_CANARY"):].encode()]  # the whole token, and its random part
    assert token.startswith("hf_CANARY")
    places = {str(p): p.read_bytes() for p in loop.logs}
    places.update({str(p): p.read_bytes() for p in loop.ckpt.rglob("*") if p.is_file()})
    places.update({f"hub:{path}": data for path, data in loop.stub.repo_files(REPO_ID).items()})
    for name in (store.RUN_JSON, store.SUMMARY, store.LEDGER, "coverage.json", store.MERGED):
        assert str(loop.ckpt / name) in places, name
    assert "hub:README.md" in places
    leaks = [name for name, data in places.items() if any(s in data for s in secrets)]
    assert leaks == []


def test_final_run_is_quiet(crash_loop):
    # Nothing to do but merge and rewrite an unchanged card: no library notes (they used to come twice).
    err = crash_loop.loop.logs[-1].read_text()
    assert "huggingface_hub" not in err and "empty commit" not in err, err
