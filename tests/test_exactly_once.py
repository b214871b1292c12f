"""Published rows exactly once in every workflow: the commands run as users run them (subprocesses), against the
local Hub stub, and every source key must end exactly once on the Hub and locally."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from signalled_runs import signal_when_ready, with_final_push_bound
from vlm_caption import store
from vlm_caption.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
REPO_ID = "tester/recap"
# The tiny model at ~0.5 s an image: a run stays live long enough to be signalled. Other tests need no model.
SLOW = ("--max-tokens", "300", "--min-tokens", "300", "--batch-size", "1", "--backend", "transformers")
# Long enough to be signalled after its first caption; the rerun that finishes the dir costs a third of SLOW's.
SIGNALLED = ("--max-tokens", "100", "--min-tokens", "100", "--batch-size", "1", "--backend", "transformers")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 clean images in 4 img2dataset shards of 10."""
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("once") / "data", n=40, broken=False, seed=5, shard_size=10)


@pytest.fixture(scope="module")
def source_keys(data) -> list[str]:
    return sorted(pq.read_table(data / "full_metadata.parquet", columns=["key"]).column("key").to_pylist())


class Cli:
    """batched_image_inference.py in a subprocess, pointed at the stub with its write token."""

    def __init__(self, stub, model: Path, data: Path, tmp: Path):
        self.stub, self.model, self.data, self.tmp = stub, model, data, tmp
        self.env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": stub.token, "HF_HOME": str(tmp / "hf_home"),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def args(self, ckpt: str, *extra: str, repo: str = REPO_ID) -> list[str]:
        return [sys.executable, str(ROOT / "batched_image_inference.py"), "--model", str(self.model),
                "--data-dir", str(self.data), "--checkpoint-dir", str(self.tmp / ckpt), "--hf-repo", repo,
                "--hub-endpoint", self.stub.endpoint, "--max-tokens", "6", "--batch-size", "4",
                "--checkpoint-every", "8", "--num-loader-workers", "1", "--min-push-interval", "0",
                "--hub-commits-per-hour", "100000", "--backend", "dummy", *extra]

    def run(self, ckpt: str, *extra: str, repo: str = REPO_ID, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(ckpt, *extra, repo=repo), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.tmp)

    def start(self, ckpt: str, *extra: str, final_push_s: float | None = None) -> subprocess.Popen:
        """The CLI as a user starts it; final_push_s: the bound on the push after a signal (20 s), shorter."""
        args = self.args(ckpt, *extra)
        if final_push_s is not None:
            args = with_final_push_bound(args, final_push_s)
        return subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=self.tmp)


@pytest.fixture
def cli(hub_stub, tiny_model_dir, data, tmp_path):
    return Cli(hub_stub, tiny_model_dir, data, tmp_path)


def hub_keys(stub, repo: str = REPO_ID, run_id: str | None = None) -> list[str]:
    keys = []
    for path, blob in stub.repo_files(repo).items():
        if path.startswith("data/") and path.endswith(".parquet") and (run_id is None or f"/{run_id}/" in f"/{path}"):
            keys += pq.read_table(io.BytesIO(blob), columns=["key"]).column("key").to_pylist()
    return sorted(keys)


def local_keys(*ckpts: Path) -> list[str]:
    return sorted(k for c in ckpts for _, ks in store.read_keys(store.list_parts(c)) for k in ks)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def run_id_of(ckpt: Path) -> str:
    return json.loads((ckpt / store.RUN_JSON).read_text())["run_id"]


# ---------------------------------------------------------------- 1, 5: other repos, several runs in one repo


def test_push_only_to_another_or_recreated_repo_pushes_every_row(cli, hub_stub, source_keys, tmp_path):
    ok(cli.run("a"))
    assert hub_keys(hub_stub) == source_keys
    out = ok(cli.run("a", "--push-only", repo="tester/other"))
    assert "pushed 40 rows" in out and hub_keys(hub_stub, "tester/other") == source_keys
    assert "Rows (captioned images): 40" in hub_stub.repo_files("tester/other")["README.md"].decode()
    hub_stub.repos.pop(("dataset", "tester/other"))  # deleted and created again
    hub_stub.create_repo_direct("tester/other")
    out = ok(cli.run("a", "--push-only", repo="tester/other"))
    assert "pushed 40 rows" in out and "no longer holds" in out and hub_keys(hub_stub, "tester/other") == source_keys
    assert "pushed 0 rows" in ok(cli.run("a", "--push-only", repo="tester/other"))  # nothing twice


def test_a_second_run_in_the_same_repo_gets_its_own_folder_and_config(cli, hub_stub, source_keys, tmp_path):
    import yaml

    ok(cli.run("first"))
    out = ok(cli.run("second", "--max-tokens", "5"))
    first, second = run_id_of(tmp_path / "first"), run_id_of(tmp_path / "second")
    assert f"1 other run(s) ({first})" in out  # said in one line at start, not refused
    assert hub_keys(hub_stub, run_id=first) == hub_keys(hub_stub, run_id=second) == source_keys
    card = hub_stub.repo_files(REPO_ID)["README.md"].decode()
    configs = yaml.safe_load(card.split("---\n")[1])["configs"]
    assert {c["config_name"] for c in configs} == {first, second}
    assert [c["config_name"] for c in configs if c.get("default")] == [second]
    assert "max_tokens=6" in card and "max_tokens=5" in card


# ---------------------------------------------------------------- 2, 6: several dirs, machines, worker counts


def test_two_machines_with_own_dirs_into_one_repo(cli, hub_stub, source_keys, tmp_path):
    ok(cli.run("m0", "--shards", "0-1"))
    ok(cli.run("m1", "--shards", "2-3"))
    assert hub_keys(hub_stub) == source_keys
    assert local_keys(tmp_path / "m0", tmp_path / "m1") == source_keys


def test_trial_then_full_run_in_a_fresh_dir(cli, hub_stub, source_keys, tmp_path):
    ok(cli.run("trial", "--max-images", "10"))
    out = ok(cli.run("full"))
    assert "10 of them on the Hub only" in out  # not captioned again
    assert hub_keys(hub_stub) == source_keys
    assert local_keys(tmp_path / "trial", tmp_path / "full") == source_keys


def test_rerun_with_another_worker_count_in_new_dirs(cli, hub_stub, source_keys, tmp_path):
    for w in range(2):
        ok(cli.run(f"two-{w}", "--num-workers", "2", "--worker-index", str(w), "--max-images", "30"))
    hub_only = []
    for w in range(3):
        out = ok(cli.run(f"three-{w}", "--num-workers", "3", "--worker-index", str(w)))
        hub_only += [int(n) for n in re.findall(r"(\d+) of them on the Hub only", out)]
    assert sum(hub_only) == 30  # each worker counts its own share of the keys, not every worker's
    assert hub_keys(hub_stub) == source_keys
    dirs = [tmp_path / f"two-{w}" for w in range(2)] + [tmp_path / f"three-{w}" for w in range(3)]
    assert local_keys(*dirs) == source_keys


def test_parts_a_worker_left_unpushed_are_pushed_by_the_last_one_out(cli, hub_stub, source_keys, tmp_path):
    """Worker 1 of 2 ran with --no-push (or was killed before its push), and the relaunch has one worker:
    nobody is worker 1 again, so the last process out of the dir pushes its parts."""
    ok(cli.run("w", "--num-workers", "2", "--worker-index", "0"))
    ok(cli.run("w", "--num-workers", "2", "--worker-index", "1", "--no-push"))
    assert len(hub_keys(hub_stub)) < len(source_keys)
    out = ok(cli.run("w"))  # nothing left to caption: it only ends the run
    assert "other workers of" in out and "left unpushed" in out
    assert hub_keys(hub_stub) == source_keys == local_keys(tmp_path / "w")


def test_push_only_with_the_hub_down_exits_3_and_a_broken_summary_is_set_aside(cli, hub_stub, source_keys,
                                                                               tmp_path, monkeypatch, capsys):
    ok(cli.run("p", "--no-push"))
    (tmp_path / "p" / store.SUMMARY).write_text('{"this_run": {"captioned"')  # cut short
    dry = cli.run("p", "--dry-run")
    assert dry.returncode == 0 and "unreadable" in dry.stderr and "Traceback" not in dry.stderr, dry.stderr
    assert (tmp_path / "p" / store.SUMMARY).exists()  # --dry-run changes nothing
    # In this process, so that the retries' waits can be skipped (the CLI would wait ~30 s of backoff).
    from batched_image_inference import main
    from vlm_caption import hub, hub_retry

    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    hub_stub.inject("POST", r"/api/datasets/.*/commit/", "503", times=1000)
    assert main(cli.args("p", "--push-only")[2:]) == 3
    out = capsys.readouterr().out
    assert "pushed 0 rows" in out and "--push-only when the Hub is reachable" in out
    hub_stub.clear_faults()
    up = ok(cli.run("p", "--push-only"))
    assert "every row of the dir is on the Hub" in up and "going on without its counts" in up
    assert hub_keys(hub_stub) == source_keys
    assert list((tmp_path / "p" / store.QUARANTINE_DIR).glob(store.SUMMARY + ".*"))


# ---------------------------------------------------------------- 3, 4: a live dir, a lost run.json


def test_second_launch_on_a_live_dir_is_refused_before_the_model_loads(cli, hub_stub, tmp_path):
    # A part after the first image (not the 8th): the dir is live and in use from then on.
    two = ("--num-workers", "2", "--checkpoint-every", "1")
    slow = cli.start("live", *SLOW, *two, "--worker-index", "0", "--no-push")
    try:
        assert hub_stub.wait_for(lambda: store.list_parts(tmp_path / "live"), timeout=600), "no part written"
        before = (tmp_path / "live" / store.RUN_JSON).read_text()
        same_worker = one_line_error(cli.run("live", *SLOW, *two, "--worker-index", "0", "--no-push"))
        assert f"pid {slow.pid}" in same_worker and "in use by" in same_worker
        other = one_line_error(cli.run("live", "--max-tokens", "8", *two, "--worker-index", "1", "--no-push"))
        assert f"pid {slow.pid}" in other and "other settings" in other
        # Same settings, another worker count (a single-GPU run still alive when torchrun starts): the two
        # would split the keys differently and caption some twice.
        split = one_line_error(cli.run("live", *SLOW, "--num-workers", "3", "--worker-index", "2", "--checkpoint-every",
                                       "1", "--no-push"))
        assert f"pid {slow.pid}" in split and "worker 0 of 2" in split and "split the keys" in split, split
        assert (tmp_path / "live" / store.RUN_JSON).read_text() == before  # never replaced under a live process
        assert slow.poll() is None  # it was live all along
    finally:
        slow.kill()
        slow.wait()


def test_a_dir_locked_by_a_merge_that_outlasts_the_wait_is_one_line(tmp_path, monkeypatch):
    """The last worker holds run.lock alone while it merges and writes the card (minutes, if the Hub makes it
    wait): a relaunch that waits longer than share_wait_s says so in one line, not a TimeoutError traceback."""
    from vlm_caption.errors import UsageError
    from vlm_caption.locks import DirLock

    settings = RunConfig(model="m").run_settings()
    first = store.CheckpointStore(tmp_path / "d", 0, num_workers=2)
    first.open_run(settings, overwrite=False)
    assert first.lock.last_one_out()  # now held exclusively, as during the end-of-run merge
    monkeypatch.setattr(DirLock, "share_wait_s", 0.3)
    with pytest.raises(UsageError, match=r"stayed locked by pid .* \(the last worker of a run merges the dir"):
        store.CheckpointStore(tmp_path / "d", 1, num_workers=2).open_run(settings, overwrite=False)
    first.lock.release()
    again = store.CheckpointStore(tmp_path / "d", 1, num_workers=2)
    assert again.open_run(settings, overwrite=False) == first.run_id
    again.lock.release()


def test_lost_run_json_never_adopts_parts_of_other_settings(cli, hub_stub, source_keys, tmp_path):
    ok(cli.run("d", "--no-push", "--max-images", "16"))
    ckpt = tmp_path / "d"
    (ckpt / store.RUN_JSON).unlink()
    line = one_line_error(cli.run("d", "--no-push", "--max-tokens", "9"))
    assert "--overwrite" in line and "re-adopt" in line
    out = ok(cli.run("d", "--no-push"))  # the settings that made the parts: re-adopted, nothing captioned twice
    assert "re-adopted" in out and local_keys(ckpt) == source_keys
    (ckpt / store.RUN_JSON).write_text("null")
    assert "unreadable" in one_line_error(cli.run("d", "--no-push", "--temperature", "0.5"))
    ok(cli.run("d", "--no-push", "--temperature", "0.5", "--overwrite"))  # the way out works
    assert local_keys(ckpt) == source_keys and list((ckpt / "superseded").iterdir())


# ---------------------------------------------------------------- 7: signals


def test_sigterm_flushes_finished_captions_and_exits_quickly(cli, hub_stub, source_keys, tmp_path):
    ckpt = tmp_path / "t"

    def ready(output: list[str]) -> None:  # some captions made (the progress bar says so), nothing written yet
        made = re.compile(r"captioning: [^\r\n]*\| *[1-9]\d*/\d+ \[")
        assert hub_stub.wait_for(lambda: made.search("".join(output)), timeout=600), "".join(output)[-2000:]
        assert not store.list_parts(ckpt)

    code, out, _ = signal_when_ready(cli.start("t", *SIGNALLED, "--checkpoint-every", "1000"), ready, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    written = local_keys(ckpt)
    assert written and len(written) < len(source_keys) and "SIGTERM" in out  # stopped early, what was made kept
    assert hub_keys(hub_stub) == written  # the final push went out
    ok(cli.run("t", *SIGNALLED, "--batch-size", "8"))
    assert local_keys(ckpt) == hub_keys(hub_stub) == source_keys


def test_ctrl_c_with_the_hub_down_exits_within_the_push_bound(cli, hub_stub, tmp_path):
    def ready(output: list[str]) -> None:
        assert hub_stub.wait_for(lambda: store.list_parts(tmp_path / "h"), timeout=600), "".join(output)[-2000:]
        for method in ("GET", "POST", "HEAD"):
            hub_stub.inject(method, ".*", "503", times=100_000)

    code, out, _ = signal_when_ready(cli.start("h", *SIGNALLED, final_push_s=2), ready, signal.SIGINT)
    assert code == 130, out[-2000:]
    assert "stays pending" in out or "stay pending" in out  # the bounded final push gave up; rows kept


# ---------------------------------------------------------------- 8: corrupt state


def test_corrupt_and_foreign_files_are_quarantined_and_redone(cli, hub_stub, source_keys, tmp_path):
    ckpt = tmp_path / "c"
    ok(cli.run("c", "--no-push"))
    parts = store.list_parts(ckpt)
    lost = pq.read_table(parts[0].path, columns=["key"]).column("key").to_pylist()
    parts[0].path.write_bytes(parts[0].path.read_bytes()[:100])  # truncated
    pq.write_table(pa.table({"x": [1, 2]}), ckpt / "parts" / "captions-w007-000000.parquet")  # foreign schema
    dry = cli.run("c", "--no-push", "--dry-run")  # says what a real run does, moves nothing
    assert dry.returncode == 0 and "a real run sets it aside" in dry.stderr and "Traceback" not in dry.stderr
    merge = cli.run("c", "--no-push", "--merge-only")  # the lost keys are missing: coverage exit 4, no traceback
    assert merge.returncode == 4 and "quarantine" in merge.stderr and "Traceback" not in merge.stderr
    ok(cli.run("c", "--no-push"))
    assert local_keys(ckpt) == source_keys and len(lost) > 0
    assert pq.read_table(ckpt / store.MERGED, columns=["key"]).column("key").to_pylist() == source_keys
    assert len(list((ckpt / store.QUARANTINE_DIR).iterdir())) == 2


def test_null_key_is_a_failure_and_a_removed_shard_leaves_the_merge(cli, hub_stub, data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    meta = pq.read_table(copy / "full_metadata.parquet")
    keys = meta.column("key").to_pylist()
    keys[3] = None
    pq.write_table(meta.set_column(meta.schema.get_field_index("key"), "key", pa.array(keys, pa.string())),
                   copy / "full_metadata.parquet")
    cli.data = copy
    proc = cli.run("n", "--no-push")
    assert proc.returncode in (0, 3) and "Traceback" not in proc.stderr
    failures = [r for f in store.list_failure_files(tmp_path / "n") for r in pq.read_table(f.path).to_pylist()]
    assert [r["error"] for r in failures if r["key"].startswith("no-key:")] == [
        "the metadata row has no key (null or empty): it cannot be captioned"]
    assert "None" not in local_keys(tmp_path / "n")
    kept = [k for k in keys if k is not None and not k.startswith("00000")]  # drop shard 0 from the data
    meta = pq.read_table(copy / "full_metadata.parquet")
    pq.write_table(meta.filter(pa.compute.is_in(meta.column("key"), pa.array(kept))), copy / "full_metadata.parquet")
    out = cli.run("n", "--no-push")
    assert "no longer in the data dir" in out.stdout + out.stderr
    merged = pq.read_table(tmp_path / "n" / store.MERGED, columns=["key"]).column("key").to_pylist()
    assert merged == sorted(kept)


def test_strict_counts_a_null_key_as_the_failure_it_is_recorded_as(tmp_path):
    """--strict exits 3 on any failure: a row with no key was recorded as failed, and the run exited 0."""
    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=6, broken=False, seed=5)
    meta = pq.read_table(data / "full_metadata.parquet")
    keys = [None, *meta.column("key").to_pylist()[1:]]
    pq.write_table(meta.set_column(0, "key", pa.array(keys, pa.string())), data / "full_metadata.parquet")
    assert [main(dummy_args(data, tmp_path / "c", *flags)) for flags in ([], ["--strict"], ["--strict"])] == [0, 3, 3]


# ---------------------------------------------------------------- 9, 10: the end of a run, the commit budget


def test_workers_sharing_a_dir_merge_once_at_the_end(cli, hub_stub, source_keys, tmp_path):
    procs = [cli.start("shared", "--num-workers", "3", "--worker-index", str(w), "--no-push") for w in range(3)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    for out in outs:  # each worker either merged or left it to the last one
        assert ("merged into" in out) != ("the last one to finish merges" in out), out[-1500:]
    assert any("merged into" in out for out in outs)
    assert pq.read_table(tmp_path / "shared" / store.MERGED, columns=["key"]).column("key").to_pylist() == source_keys


def test_commit_budget_spreads_commits_over_all_workers():
    cfg = RunConfig(min_push_interval=120, hub_commits_per_hour=60)
    assert cfg.push_interval(1) == 120  # one worker: the interval rules
    assert cfg.push_interval(8) == 480  # 8 workers x 7.5 commits/h = 60/h
    assert RunConfig(hub_commits_per_hour=100).push_interval(64) == pytest.approx(2304)


def test_an_unreadable_shard_leaves_none_of_its_keys_out_of_the_merge(data, tmp_path):
    """Keys of a shard whose metadata cannot be read (a download redoing it) are not keys of a removed shard:
    --merge-only replaced a whole all_captions.parquet with one lacking them, and exited 0."""
    import shutil

    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK

    copy, ckpt = tmp_path / "data", tmp_path / "c"
    shutil.copytree(data, copy)
    (copy / "full_metadata.parquet").unlink()  # the shards' own parquet files are read
    assert main(dummy_args(copy, ckpt)) == EXIT_OK
    (copy / "images" / "00001.parquet").write_bytes(b"garbage")
    assert main(["--merge-only", "--data-dir", str(copy), "--checkpoint-dir", str(ckpt)]) == EXIT_ITEMS_FAILED
    assert pq.read_table(ckpt / store.MERGED, columns=["key"]).num_rows == 40
    assert main(dummy_args(copy, ckpt)) == EXIT_ITEMS_FAILED  # the end-of-run merge too
    assert pq.read_table(ckpt / store.MERGED, columns=["key"]).num_rows == 40
