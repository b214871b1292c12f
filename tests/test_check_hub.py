"""--check-hub: the Hub itself proves a run published every selected key once, after runs on machines whose dirs
each hold a part (where --merge-only of one dir counts the others' keys as missing), and it names what is
missing, published twice or recorded as failed (dummy backend, the local Hub stub, the real CLI)."""
from __future__ import annotations

import json
import os

import pytest
from test_exactly_once import REPO_ID, Cli, ok, one_line_error, run_id_of
from test_exactly_once_more import recommit

from vlm_caption.errors import EXIT_COVERAGE
from vlm_caption.hub_coverage import HUB_COVERAGE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 images in 3 shards of 8; some cannot be decoded (permanent failures, recorded by the dir)."""
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("check") / "data", n=24, broken=True, seed=3, shard_size=8,
                        include_broken_in_metadata=True)


@pytest.fixture
def cli(hub_stub, tiny_model_dir, data, tmp_path):
    return Cli(hub_stub, tiny_model_dir, data, tmp_path)


def coverage(cli: Cli, ckpt: str) -> dict:
    return json.loads((cli.tmp / ckpt / HUB_COVERAGE).read_text())


def test_two_machines_then_the_check_from_a_fresh_dir_and_from_a_runs_dir(cli):
    ok(cli.run("m0", "--shards", "0-1"))
    ok(cli.run("m1", "--shards", "2"))
    # One machine's dir alone: the other's keys count as missing there...
    assert cli.run("m0", "--merge-only").returncode == EXIT_COVERAGE
    merged = json.loads((cli.tmp / "m0" / "coverage.json").read_text())
    assert merged["missing"] > 0
    # ...the Hub has them all: from a fresh dir (the run these flags name) and from a run's dir (its run.json)
    for ckpt in ("laptop", "m0"):
        out = ok(cli.run(ckpt, "--check-hub"))
        got = coverage(cli, ckpt)
        assert got["missing"] == got["duplicated"] == 0 and got["expected"] == merged["expected"], out
        assert got["failed"] > 0 and got["published"] + got["failed"] == got["expected"], got  # broken images
        assert all(stage in ("load", "decode") for stage in got["failed_keys"].values()), got["failed_keys"]
        assert got["run_id"] == run_id_of(cli.tmp / "m0") and "0 missing, 0 published more than once" in out
    assert "the run this command's settings name" in ok(cli.run("laptop2", "--check-hub"))


def test_a_file_copied_or_deleted_on_the_hub_is_named_and_exits_4(cli, hub_stub):
    ok(cli.run("a"))
    first = min(p for p in hub_stub.repo_files(REPO_ID) if p.startswith("data/") and p.endswith(".parquet"))
    copy = first.replace(".parquet", "-copy.parquet")

    def copy_first(tree):  # someone uploads a file of the run again under another name
        tree[copy] = tree[first]
    recommit(hub_stub, REPO_ID, copy_first)
    proc = cli.run("check", "--check-hub")  # a name this tool never gives: its rows count (twice here), it is named
    assert proc.returncode == EXIT_COVERAGE and copy in proc.stdout, proc.stdout + proc.stderr
    got = coverage(cli, "check")
    assert got["duplicated_keys"] and set(got["duplicated_keys"].values()) == {2} and list(got["foreign_files"]) == [copy]
    assert "published more than once (first 20): " in proc.stdout

    hidden = copy.replace("/" + copy.rsplit("/", 1)[1], "/." + copy.rsplit("/", 1)[1])
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({hidden: tree.pop(copy)}))  # the copy hidden: not loaded
    out = ok(cli.run("check", "--check-hub"))  # so not counted either: each key once again, the file named
    got = coverage(cli, "check")
    assert got["duplicated"] == got["missing"] == 0 and got["hidden_files"] == [hidden] and hidden in out, out
    copy = hidden

    def delete_both(tree):  # then deletes it and the copy
        del tree[first], tree[copy]
    recommit(hub_stub, REPO_ID, delete_both)
    proc = cli.run("check", "--check-hub")
    got = coverage(cli, "check")
    assert proc.returncode == EXIT_COVERAGE and got["missing"] > 0, proc.stdout + proc.stderr
    assert got["missing_keys"][0] in proc.stdout
    # a run of the captioning command publishes the missing keys again, once: the check then passes
    ok(cli.run("a"))
    assert ok(cli.run("check", "--check-hub")) and coverage(cli, "check")["missing"] == 0


def test_check_hub_mistakes_are_one_line(cli, hub_stub):
    ok(cli.run("a"))
    before = hub_stub.commits_applied
    assert "--check-hub and --no-push" in one_line_error(cli.run("x", "--check-hub", "--no-push"))
    assert "exclude each other" in one_line_error(cli.run("x", "--check-hub", "--push-only"))
    assert "no dataset repo tester/nothing-here" in one_line_error(cli.run("x", "--check-hub", repo="tester/nothing-here"))
    # other settings name another run: the repo's runs are named
    said = one_line_error(cli.run("other", "--check-hub", "--max-tokens", "7"))
    assert "holds no data of run" in said and run_id_of(cli.tmp / "a") in said
    hub_stub.create_repo_direct("tester/empty")  # the run's dir, checked against a repo it never pushed to
    said = one_line_error(cli.run("a", "--check-hub", repo="tester/empty"))
    assert f"holds no data of run {run_id_of(cli.tmp / 'a')}, the run of " in said and "--hf-repo" in said
    assert hub_stub.commits_applied == before and ("dataset", "tester/nothing-here") not in hub_stub.repos


def test_check_hub_needs_no_write_token(cli, hub_stub):
    ok(cli.run("a"))
    env = {k: v for k, v in cli.env.items() if k != "HF_TOKEN"}
    before = hub_stub.commits_applied
    cli.env = {**env, "HF_HOME": os.path.join(cli.tmp, "anon")}  # no token at all: a public repo reads fine
    assert "0 missing" in ok(cli.run("fresh", "--check-hub"))
    assert hub_stub.commits_applied == before  # a check commits nothing


def check_in_process(cli, monkeypatch, ckpt: str, *extra: str) -> int:
    """main() in this process, so that the retries' waits can be skipped (the CLI would wait ~30 s of backoff)."""
    from batched_image_inference import main
    from vlm_caption import hub, hub_retry

    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    return main(cli.args(ckpt, "--check-hub", *extra)[2:])


def test_the_runs_file_is_read_with_retries_and_a_hub_down_exits_3(cli, hub_stub, monkeypatch, capsys):
    ok(cli.run("a"))
    hub_stub.inject("GET", r"/resolve/[^/]+/runs/", "503")  # one failed read of runs/{run_id}.json: retried
    hub_stub.inject("GET", r"/tree/[^/]+/runs$", "drop")  # and one dropped listing of runs/
    assert check_in_process(cli, monkeypatch, "c") == 0
    assert coverage(cli, "c")["failed"] > 0  # the failures the dir recorded were read
    hub_stub.inject("GET", r"/resolve/[^/]+/runs/", "503", times=1000)  # it stays down: retryable, one line
    assert check_in_process(cli, monkeypatch, "c") == 3
    assert "rerun --check-hub when it is reachable" in capsys.readouterr().out
    hub_stub.clear_faults()
    hub_stub.inject("GET", r"^/api/datasets/tester/recap$", "503", times=1000)  # down from the first request
    assert check_in_process(cli, monkeypatch, "c") == 3
    out = capsys.readouterr().out  # which Hub, wherever the error leaves it out
    assert "rerun --check-hub when it is reachable" in out and hub_stub.endpoint in out, out


def test_a_check_of_some_shards_counts_within_them(cli, hub_stub, data):
    from vlm_caption import dataset

    ok(cli.run("a"))
    rid = run_id_of(cli.tmp / "a")
    info_path = f"runs/{rid}.json"
    info = json.loads(hub_stub.repo_files(REPO_ID)[info_path])
    shard0 = dataset.plan_work(data, shards=[0], max_images=None, worker=0, num_workers=1, done_keys=set(),
                               failed_keys=set()).todo_keys
    recorded = {k: s for keys in info["failed_keys_by_dir"].values() for k, s in keys.items()}
    outside = {k: "generate" for k in recorded if k not in shard0}  # retryable, in shards 1-2 only
    assert outside and set(recorded) - set(outside)
    info["failed_keys_by_dir"]["another-dir"] = outside
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({info_path: hub_stub._put_blob(json.dumps(info).encode())}))
    assert cli.run("all", "--check-hub").returncode == 3  # the whole run: those are worth a retry
    out = ok(cli.run("s0", "--check-hub", "--shards", "0"))  # shard 0 is done: exit 0
    got = coverage(cli, "s0")
    assert got["expected"] == len(shard0) == got["published"] + got["failed"], got
    assert set(got["failed_keys"]) <= shard0 and got["unexpected_keys"] > 0 and "outside the selection" in out


def test_copies_of_one_dir_keep_each_others_recorded_failures(cli, hub_stub):
    """`cp -r a b`: both have one dir_id, and runs/{run_id}.json kept the failed keys of the dir that wrote the
    card last: b's failures in shard 1 were dropped by a's next card, and --check-hub counted them missing."""
    import shutil

    from vlm_caption.store import failure_records

    ok(cli.run("a", "--shards", "0"))
    shutil.copytree(cli.tmp / "a", cli.tmp / "b")
    ok(cli.run("b", "--shards", "2"))  # b alone fails keys of shard 2 (undecodable images)
    ok(cli.run("a", "--shards", "1"))  # a's card, from a's view: shards 0 and 1
    out = ok(cli.run("fresh", "--check-hub"))
    got = coverage(cli, "fresh")
    assert got["missing"] == got["duplicated"] == 0 and got["published"] + got["failed"] == got["expected"], out
    rid = run_id_of(cli.tmp / "a")
    recorded = {k for d in ("a", "b") for k in failure_records(cli.tmp / d, run_id=rid)}
    assert set(got["failed_keys"]) == recorded
    assert len(recorded) > len(failure_records(cli.tmp / "a", run_id=rid))  # b failed keys a never saw


def test_a_parquet_file_not_of_ours_in_the_runs_folder_exits_4(cli, hub_stub):
    """The run's card config loads data/{run_id}/*.parquet: a file there that is not a captions file breaks it."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    ok(cli.run("a"))
    rid = run_id_of(cli.tmp / "a")
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2]}), buf)
    foreign, notes = f"data/{rid}/foreign.parquet", f"data/{rid}/notes.txt"
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({notes: hub_stub._put_blob(b"not loaded")}))
    assert "0 missing" in ok(cli.run("c", "--check-hub"))  # not a .parquet: not part of the config
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({foreign: hub_stub._put_blob(buf.getvalue())}))
    proc = cli.run("c", "--check-hub")
    assert proc.returncode == EXIT_COVERAGE and foreign in proc.stdout, proc.stdout + proc.stderr
    assert coverage(cli, "c")["unreadable_files"] == [foreign] and coverage(cli, "c")["missing"] == 0


def test_files_the_runs_config_does_not_load_as_captions_publish_nothing(cli, hub_stub):
    """The config loads data/{run_id}/*.parquet: a file moved into a subfolder is not loaded, and a file of keys
    alone loads without captions. Both counted as published: their rows were never pushed again, check exit 0."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    ok(cli.run("a"))
    rid = run_id_of(cli.tmp / "a")
    (first,) = [p for p in hub_stub.repo_files(REPO_ID) if p.startswith(f"data/{rid}/")]
    keys = pq.read_table(io.BytesIO(hub_stub.repo_files(REPO_ID)[first])).column("key").to_pylist()
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys}), buf)
    keys_only, moved = f"data/{rid}/keys-only.parquet", f"data/{rid}/old/{first.rsplit('/', 1)[1]}"
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({moved: tree.pop(first),
                                                          keys_only: hub_stub._put_blob(buf.getvalue())}))
    proc = cli.run("c", "--check-hub")
    got = coverage(cli, "c")
    assert proc.returncode == EXIT_COVERAGE and got["unreadable_files"] == [keys_only], proc.stdout + proc.stderr
    assert got["published"] == 0 and got["missing_keys"] == sorted(set(keys) - set(got["failed_keys"]))
    ok(cli.run("a", "--push-only"))  # the rows go into the run's folder again, once
    recommit(hub_stub, REPO_ID, lambda tree: tree.pop(keys_only))
    assert ok(cli.run("c", "--check-hub")) and coverage(cli, "c")["published"] == len(got["missing_keys"])


def test_a_runs_file_whose_failures_were_edited_into_a_list_is_no_traceback(cli, hub_stub):
    ok(cli.run("a"))
    rid = run_id_of(cli.tmp / "a")
    info = json.loads(hub_stub.repo_files(REPO_ID)[f"runs/{rid}.json"])
    edited = json.dumps({**info, "failed_keys_by_dir": [1]}).encode()
    recommit(hub_stub, REPO_ID, lambda tree: tree.update({f"runs/{rid}.json": hub_stub._put_blob(edited)}))
    proc = cli.run("c", "--check-hub")  # no failure recorded: the broken images count as missing
    assert proc.returncode == EXIT_COVERAGE and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert coverage(cli, "c")["failed"] == 0 and coverage(cli, "c")["missing"] > 0


def test_a_kept_column_the_runs_files_type_two_ways_is_named_and_exits_4(cli, hub_stub):
    """Files an older version pushed: `year` all null as text in the first, int64 in the next (load_dataset casts
    the years to text, the first file's type)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.hub_files import hub_path

    ok(cli.run("a"))
    rid = run_id_of(cli.tmp / "a")
    (first,) = [p for p in hub_stub.repo_files(REPO_ID) if p.startswith(f"data/{rid}/")]
    table = pq.read_table(io.BytesIO(hub_stub.repo_files(REPO_ID)[first]))
    half = table.num_rows // 2
    files = {}
    for rows, year in ((table.slice(0, half), pa.nulls(half, pa.string())),
                       (table.slice(half), pa.array(range(table.num_rows - half), pa.int64()))):
        buf = io.BytesIO()
        pq.write_table(rows.append_column("year", year), buf)
        files[hub_path(rid, "older0000000", 0, len(files), len(files), rows.column("key").to_pylist())] = buf
    recommit(hub_stub, REPO_ID, lambda tree: (tree.pop(first), tree.update(
        {path: hub_stub._put_blob(buf.getvalue()) for path, buf in files.items()})))
    proc = cli.run("c", "--check-hub")
    assert proc.returncode == EXIT_COVERAGE and "column year has 2 types" in proc.stdout, proc.stdout + proc.stderr
    got = coverage(cli, "c")
    assert got["missing"] == got["duplicated"] == 0 and sorted(got["type_disagreements"]["year"]) == [
        "int64", "string, all null"]
    assert all(path in proc.stdout for path in files)


def test_check_hub_counts_the_keys_of_a_shard_whose_images_folder_is_gone(hub_stub, tiny_model_dir, tmp_path):
    """--check-hub reads no image: a shard whose folder is not on this machine (never published) was left out of
    `expected`, and the check said '0 missing', exit 0."""
    import shutil

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=12, broken=False, seed=3, shard_size=6)
    cli = Cli(hub_stub, tiny_model_dir, data, tmp_path)
    ok(cli.run("m1", "--shards", "1"))  # only shard 00001 is captioned and published
    shutil.move(str(data / "images" / "00000"), str(tmp_path / "elsewhere-00000"))  # not on this machine
    proc = cli.run("check", "--check-hub")
    got = json.loads((tmp_path / "check" / HUB_COVERAGE).read_text())
    assert got["expected"] == 12 and got["missing"] == 6, (got, proc.stdout[-1500:])
    assert proc.returncode == EXIT_COVERAGE
