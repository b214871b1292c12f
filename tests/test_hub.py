"""hub.py against the real huggingface_hub client talking to a local Hub stub (tests/hub_stub.py)."""
from __future__ import annotations

import io
import json
import logging

import pyarrow.parquet as pq
import pytest
from hub_parts import (COMMIT, DIR, REPO, RUN, Writer, assert_hub_matches, ckpt, client,  # noqa: F401
                       data_files, hub_name, ledger, make_rows, names, sleeps, store_keys)  # (fixtures: ckpt...)

from vlm_caption import card, hub, hub_files, hub_retry
from vlm_caption.errors import FatalError, UsageError
from vlm_caption.store import LEDGER, OUTPUT_SCHEMA, list_parts


# ---------------------------------------------------------------- connect


def test_connect_creates_repo_and_accepts_existing(hub_stub):  # noqa: F811
    hub.connect(REPO, endpoint=hub_stub.endpoint)
    assert ("dataset", REPO) in hub_stub.repos
    hub.connect(REPO, endpoint=hub_stub.endpoint)  # 409 from create is fine
    assert hub_stub.count("POST", "/api/repos/create") == 2


def test_connect_without_token_is_one_line_usage_error(hub_stub, monkeypatch):  # noqa: F811
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UsageError) as e:
        hub.connect(REPO, endpoint=hub_stub.endpoint)
    msg = str(e.value)
    assert "\n" not in msg and "hf auth login" in msg and "HF_TOKEN" in msg and "--no-push" in msg
    assert hub_stub.requests == []


def test_push_only_without_token_or_run_json_is_one_line_and_never_offers_no_push(hub_stub, monkeypatch, tmp_path,
                                                                                  capsys):
    from batched_image_inference import main as cli_main
    from vlm_caption.cli import run_main

    monkeypatch.delenv("HF_TOKEN")
    argv = ["--push-only", "--hf-repo", REPO, "--hub-endpoint", hub_stub.endpoint, "--checkpoint-dir"]
    for ckpt, says in ((tmp_path / "never", "holds no run.json"), (tmp_path / "ran", "no Hugging Face token")):
        if ckpt.name == "ran":
            Writer(ckpt).parts(3)
        with pytest.raises(SystemExit) as e:
            run_main(cli_main, [*argv, str(ckpt)], prog="batched_image_inference.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0] and "--no-push" not in err[0], err
    assert hub_stub.requests == []  # the dir is checked before the Hub is asked anything


def test_connect_invalid_token_not_retried(hub_stub, monkeypatch, sleeps):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_NotAValidTokenAtAll123")
    with pytest.raises(UsageError, match="refused the Hugging Face token") as e:
        hub.connect(REPO, endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=sleeps.append))
    assert "\n" not in str(e.value) and "NotAValid" not in str(e.value)
    assert hub_stub.count("GET", "/api/whoami-v2") == 1 and sleeps == []


def test_connect_read_only_token(hub_stub, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", hub_stub.read_token)
    with pytest.raises(UsageError, match="read-only"):
        hub.connect(REPO, endpoint=hub_stub.endpoint)
    assert hub_stub.count("POST", "/api/repos/create") == 0


def test_connect_foreign_namespace_names_repo(hub_stub, sleeps):  # noqa: F811
    with pytest.raises(UsageError, match="cannot write to someone-else/data") as e:
        hub.connect("someone-else/data", endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=sleeps.append))
    assert "\n" not in str(e.value)
    assert hub_stub.count("POST", "/api/repos/create") == 0 and sleeps == []  # said before asking


def test_another_users_existing_repo_is_refused_at_connect(hub_stub, monkeypatch):
    """create_repo(exist_ok=True) passes for a repo that exists in someone else's namespace (the default
    --hf-username's, say): the run would caption for hours and have every push refused."""
    hub_stub.create_repo_direct(REPO)
    hub_stub.tokens["hf_SomeoneElsesWrite1234"] = {"name": "other", "role": "write", "orgs": ["other-org"]}
    monkeypatch.setenv("HF_TOKEN", "hf_SomeoneElsesWrite1234")
    with pytest.raises(UsageError, match=r"token of other cannot write to tester/contrastyles-recap: tester is "
                                         r"neither that user nor one of their organisations \(other, other-org\)"):
        hub.connect(REPO, endpoint=hub_stub.endpoint)
    assert hub_stub.count("POST", "/api/repos/create") == 0
    hub.connect("other-org/recap", endpoint=hub_stub.endpoint)  # an org of the user's passes


def test_token_without_write_on_existing_repo_fails_at_push(hub_stub, monkeypatch, tmp_path):  # noqa: F811
    # The user's own namespace, a fine-grained token without write: create_repo answers 403, repo_info finds
    # the repo, and huggingface_hub 2.4 then fails to build the repo URL for a non-huggingface.co endpoint
    # (HfUriError): connect must treat that as "exists"; the first push is what says no.
    hub_stub.create_repo_direct(REPO)
    hub_stub.tokens["hf_FineGrainedNoWrite1234"] = {"name": "tester", "role": "fineGrained", "orgs": []}
    monkeypatch.setenv("HF_TOKEN", "hf_FineGrainedNoWrite1234")
    client = hub.connect(REPO, endpoint=hub_stub.endpoint)
    ckpt = tmp_path / "ckpt"
    Writer(ckpt).parts(3)
    with pytest.raises(FatalError, match="HTTP 403") as e:
        client.push_pending(ckpt, RUN, 0)
    assert "FineGrained" not in str(e.value)


def test_connect_offline_mode_is_usage_error(hub_stub, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        hub.connect(REPO, endpoint=hub_stub.endpoint)


def test_connect_hub_down_is_fatal(hub_stub, sleeps):  # noqa: F811
    hub_stub.inject("GET", "/api/whoami-v2", "503", times=100)
    with pytest.raises(FatalError, match="unreachable"):
        hub.connect(REPO, endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=sleeps.append))
    assert hub_stub.count("GET", "/api/whoami-v2") == 6 and len(sleeps) == 5


# ---------------------------------------------------------------- pushing


def test_push_then_hub_equals_local_parts(hub_stub, client, ckpt):  # noqa: F811
    rows = Writer(ckpt).parts(10, 12, 5)
    assert client.push_pending(ckpt, RUN, 0) == rows
    assert names(data_files(hub_stub)) == [hub_name(0, 2)]
    assert len(assert_hub_matches(hub_stub, REPO, ckpt)) == rows
    [line] = ledger(ckpt)
    assert line["parts"] == [p.path.name for p in list_parts(ckpt)] and line["rows"] == rows
    assert line["repo"] == REPO and line["run_id"] == RUN
    assert (line["worker"], line["first"], line["last"]) == (0, 0, 2) and len(line["commit"]) == 40


def test_push_only_leaves_out_parts_of_another_run_or_unreadable_and_says_so(hub_stub, client, ckpt, capsys):
    from vlm_caption import endings
    from vlm_caption.config import RunConfig

    Writer(ckpt).parts(3)
    Writer(ckpt, worker=1, run="ffffffffffff", start=100).parts(2)  # copied in from another run's dir, say
    Writer(ckpt, worker=2, start=200).parts(2)
    broken = list_parts(ckpt)[-1].path
    broken.write_bytes(broken.read_bytes()[:50])  # cut short
    code = endings.push_only(RunConfig(checkpoint_dirs=[str(ckpt)]), {"run_id": RUN}, hub_client=client)
    out = capsys.readouterr().out
    assert code == 3 and "pushed 3 rows" in out and "2 parts not pushed" in out, out
    assert sorted(r["key"] for r in hub_stub.read_rows(REPO)) == sorted(r["key"] for r in make_rows(0, 3))
    assert set(client.unusable.values()) >= {"it holds rows of run ffffffffffff, not of run " + RUN}


def test_incremental_pushes_add_files_and_empty_push_is_noop(hub_stub, client, ckpt):  # noqa: F811
    w = Writer(ckpt)
    w.parts(10, 10)
    client.push_pending(ckpt, RUN, 0)
    w.parts(7)
    assert client.push_pending(ckpt, RUN, 0) == 7
    assert names(data_files(hub_stub)) == [hub_name(0, 1), hub_name(2, 2)]
    commits = hub_stub.count("POST", COMMIT)
    assert client.push_pending(ckpt, RUN, 0) == 0
    assert hub_stub.count("POST", COMMIT) == commits == hub_stub.commits_applied == 2
    assert_hub_matches(hub_stub, REPO, ckpt)
    assert len(ledger(ckpt)) == 2


def test_backlog_is_cut_into_capped_files_in_one_commit(hub_stub, client, ckpt, monkeypatch):  # noqa: F811
    monkeypatch.setattr(hub_files, "MAX_ROWS_PER_HUB_FILE", 25)
    Writer(ckpt).parts(*[10] * 7)
    assert client.push_pending(ckpt, RUN, 0) == 70
    assert hub_stub.commits_applied == 1
    assert names(data_files(hub_stub)) == [hub_name(0, 1), hub_name(2, 3), hub_name(4, 5), hub_name(6, 6)]
    assert_hub_matches(hub_stub, REPO, ckpt)


def test_a_backlog_of_more_files_than_a_commit_takes_goes_in_several(hub_stub, client, ckpt, monkeypatch):
    monkeypatch.setattr(hub, "MAX_FILES_PER_COMMIT", 2)
    for worker in range(5):  # five workers' parts: five files
        Writer(ckpt, worker=worker).parts(3)
    assert client.push_pending(ckpt, RUN, None) == 15
    assert hub_stub.commits_applied == 3  # 2 + 2 + 1 files
    assert_hub_matches(hub_stub, REPO, ckpt)
    assert client.push_pending(ckpt, RUN, None) == 0 and hub_stub.commits_applied == 3


def test_a_listing_longer_than_a_page_is_read_whole(hub_stub, client, ckpt, monkeypatch):  # noqa: F811
    """The Hub sends a folder's listing in pages, each linking the next: the files of every page count."""
    monkeypatch.setattr(hub_files, "MAX_ROWS_PER_HUB_FILE", 2)
    Writer(ckpt).parts(*[2] * 12)
    assert client.push_pending(ckpt, RUN, 0) == 24 and len(data_files(hub_stub)) == 12
    hub_stub.tree_page_size = 5
    before = hub_stub.count("GET", r"/tree/")
    snap = client.snapshot(RUN)
    assert len(snap.files) == 12 and len(snap.keys) == 24
    assert hub_stub.count("GET", r"/tree/") - before >= 3  # the 12 files took 3 pages at least
    assert client.push_pending(ckpt, RUN, 0) == 0 and len(data_files(hub_stub)) == 12


def test_hub_file_bytes_are_deterministic_and_sorted(hub_stub, client, ckpt):  # noqa: F811
    store = Writer(ckpt).store
    store.write_part(make_rows(10, 5))
    store.write_part(make_rows(0, 5))  # keys of a later part sort first
    parts = list_parts(ckpt)
    [planned] = hub.plan_hub_files(RUN, DIR, [(p, k) for p, k in store_keys(parts)])
    assert hub.hub_file_bytes(planned) == hub.hub_file_bytes(planned)
    client.push_pending(ckpt, RUN, 0)
    [(path, data)] = [(p, d) for p, d in hub_stub.repo_files(REPO).items() if p.startswith("data/")]
    assert path == planned.path and data == hub.hub_file_bytes(planned)
    table = pq.read_table(io.BytesIO(data))
    assert table.schema.equals(OUTPUT_SCHEMA)
    assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())


def test_workers_push_concurrently_without_collisions(hub_stub, ckpt, sleeps):  # noqa: F811
    import threading

    for w in range(3):
        Writer(ckpt, w).parts(10, 10)
    clients = [hub.connect(REPO, endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=sleeps.append))
               for _ in range(3)]
    threads = [threading.Thread(target=c.push_pending, args=(ckpt, RUN, w)) for w, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(data_files(hub_stub)) == 3
    assert_hub_matches(hub_stub, REPO, ckpt)
    assert sorted(line["worker"] for line in ledger(ckpt)) == [0, 1, 2]


# ---------------------------------------------------------------- the dataset card

RUN_INFO = {"run_id": RUN, "model": "google/gemma-3-27b-it", "code_version": "0.1.0", "max_tokens": 256,
            "temperature": 0.0, "top_p": 1.0, "seed": 0,
            "prompt": "Describe the artistic style of this image.\nUse ```one``` paragraph."}


def test_render_dataset_card():
    import yaml

    older = {**RUN_INFO, "run_id": "fedcba987654", "model": "google/gemma-3-4b-it", "created": "2026-01-01T00:00:00Z",
             "rows": 345, "failed_by_stage": {}}
    newer = {**RUN_INFO, "created": "2026-02-01T00:00:00Z", "rows": 12_000, "failed_by_stage": {"decode": 3, "load": 2},
             "legacy_files": True}
    text = card.render_dataset_card(REPO, [older, newer])
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] == ["image-to-text"]
    assert meta["size_categories"] == ["10K<n<100K"] and meta["language"] == ["en"]
    assert meta["configs"] == [  # one config per run, the newest the default
        {"config_name": RUN, "data_files": [{"split": "train", "path": [f"data/{RUN}/*.parquet",
                                                                        f"data/{RUN}-w*.parquet"]}], "default": True},
        {"config_name": "fedcba987654", "data_files": [{"split": "train", "path": ["data/fedcba987654/*.parquet"]}]}]
    assert RUN_INFO["prompt"] in text and "````text" in text  # verbatim, fence longer than the prompt's
    for needle in ("max_tokens=256", "temperature=0.0", "top_p=1.0", "seed=0", "12000", "decode: 3", "345",
                   "https://huggingface.co/datasets/tomg-group-umd/ContraStyles", "arXiv:2404.01292",
                   f'datasets.load_dataset("{REPO}", "fedcba987654"', "google/gemma-3-27b-it",
                   "google/gemma-3-4b-it", "Rows in all runs: 12345"):
        assert needle in text, needle
    assert all(f"| `{name}` |" in text for name in OUTPUT_SCHEMA.names)
    assert [card.size_category(n) for n in (5, 1_000, 99_999, 100_000, 2_000_000, 10_000_000, 100_000_000)] == [
        "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B"]


def test_card_lists_each_run_and_both_load_with_datasets(hub_stub, client, ckpt, tmp_path):  # noqa: F811
    import datasets
    from huggingface_hub import snapshot_download

    other_run = "fedcba987654"
    other = Writer(tmp_path / "other", run=other_run, dir_id="d2r0000000bb", start=100)
    other.parts(7)
    client.push_pending(tmp_path / "other", other_run, 0)
    client.write_card({**RUN_INFO, "run_id": other_run, "created": "2026-01-01T00:00:00Z"}, {})
    rows = Writer(ckpt).parts(10, 10, 3)
    client.push_pending(ckpt, RUN, 0)
    text = client.write_card({**RUN_INFO, "created": "2026-02-01T00:00:00Z"}, {"done": 999, "failed": {"decode": 2}})
    assert "- n<1K" in text and "Rows (captioned images): 23" in text and "Rows (captioned images): 7" in text
    assert "decode: 2" in text  # the Hub's own counts, not the summary's 999
    assert hub_stub.repo_files(REPO)["README.md"] == text.encode()
    assert json.loads(hub_stub.repo_files(REPO)[f"runs/{RUN}.json"])["rows"] == rows
    local = snapshot_download(REPO, repo_type="dataset", endpoint=hub_stub.endpoint, token=hub_stub.token,
                              cache_dir=tmp_path / "dl")
    ds = datasets.load_dataset(local, split="train", cache_dir=str(tmp_path / "ds_cache"))  # the default: newest
    assert ds.column_names == OUTPUT_SCHEMA.names and ds.num_rows == rows
    assert sorted(ds["key"]) == sorted(r["key"] for r in assert_hub_matches(hub_stub, REPO, ckpt, run_id=RUN))
    old = datasets.load_dataset(local, other_run, split="train", cache_dir=str(tmp_path / "ds_cache"))
    assert old.num_rows == 7


@pytest.mark.parametrize("edit", [{"rows": "many"}, {"created": 17}, {"failed_by_stage": [1]}, {"prompts": "x"}])
def test_another_runs_file_edited_by_hand_is_left_off_the_card(hub_stub, client, ckpt, caplog, edit):  # noqa: F811
    """runs/{other}.json with a field of another shape raised at this run's card: a traceback at every end of a
    run and --push-only of the repo. It is left off, as an unreadable one is, and the card is written."""
    from huggingface_hub import CommitOperationAdd

    other = json.dumps({**RUN_INFO, "run_id": "fedcba987654", "rows": 3, **edit}).encode()
    client.api.create_commit(REPO, [CommitOperationAdd("runs/fedcba987654.json", other)], commit_message="by hand",
                             repo_type="dataset")
    Writer(ckpt).parts(4)
    client.push_pending(ckpt, RUN, 0)
    with caplog.at_level(logging.WARNING):
        text = client.write_card(RUN_INFO, {})
    assert "Rows (captioned images): 4" in text and "fedcba987654" not in text and "left off the card" in caplog.text


@pytest.mark.parametrize("edit", [{"failed_keys_by_dir": [1]}, {"failed_keys_by_dir": {"d": [1]}}, {"created": 5}])
def test_this_runs_own_file_edited_by_hand_is_written_again(hub_stub, client, ckpt, edit):  # noqa: F811
    from huggingface_hub import CommitOperationAdd

    mine = json.dumps({**RUN_INFO, "rows": 3, **edit}).encode()
    client.api.create_commit(REPO, [CommitOperationAdd(f"runs/{RUN}.json", mine)], commit_message="by hand",
                             repo_type="dataset")
    Writer(ckpt).parts(4)
    client.push_pending(ckpt, RUN, 0)
    info = {**RUN_INFO, "dir_id": DIR, "created": "2026-01-01T00:00:00Z"}
    assert "Rows (captioned images): 4" in client.write_card(info, {}, {"x": "decode"})
    assert json.loads(hub_stub.repo_files(REPO)[f"runs/{RUN}.json"])["failed_keys_by_dir"] == {DIR: {"x": "decode"}}


# ---------------------------------------------------------------- the token stays secret


def test_token_never_leaks(hub_stub, client, ckpt, sleeps, caplog, capsys):  # noqa: F811
    token = hub_stub.token
    w = Writer(ckpt)
    w.parts(10)
    texts = []
    with caplog.at_level(logging.DEBUG):
        hub_stub.inject("POST", COMMIT, "500", body=f"upstream said: bad token {token}")
        client.push_pending(ckpt, RUN, 0)
        w.parts(10)
        hub_stub.inject("POST", COMMIT, "403", body=f"token {token} may not write here")
        with pytest.raises(FatalError) as e:
            client.push_pending(ckpt, RUN, 0)
        texts.append(str(e.value))
        hub_stub.inject("POST", COMMIT, "503", times=100, body=f"down for {token}")
        assert client.push_pending(ckpt, RUN, 0) == 0
        hub_stub.clear_faults()
        client.write_card(RUN_INFO, {"done": 20})
        texts.append(repr(client))
        texts.append(hub_retry.scrub(f"Bearer {token} and hf_abcdefghijklmnop", token))
    out = capsys.readouterr()
    texts += [caplog.text, out.out, out.err, (ckpt / LEDGER).read_text(),
              hub_stub.repo_files(REPO)["README.md"].decode()]
    assert "***" in texts[0] and "hf_abcdefghijklmnop" not in texts[2]
    for text in texts:
        assert token not in text and "hf_CANARY" not in text


# ---------------------------------------------------------------- the Hub's own key index


def test_published_keys_are_read_by_range_reads_of_the_key_column(hub_stub, client, ckpt):  # noqa: F811
    import random

    rng = random.Random(0)
    w = Writer(ckpt)
    rows = make_rows(0, 4000)
    for r in rows:  # long, incompressible captions: the key column is a small part of the file
        r["vlm_caption"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(600))
    w.store.write_part(rows)
    client.push_pending(ckpt, RUN, 0)
    [path] = data_files(hub_stub)
    size = len(hub_stub.repo_files(REPO)[path])
    hub_stub.downloads.clear()
    fresh = hub.connect(REPO, endpoint=hub_stub.endpoint)  # another machine: nothing cached
    snap = fresh.snapshot(RUN)
    assert snap.keys == {r["key"] for r in rows} and list(snap.files) == [path]
    reads = [(n, ranged) for name, n, ranged in hub_stub.downloads if name == path]
    assert reads and all(ranged for _, ranged in reads)
    assert sum(n for n, _ in reads) < size / 4, (sum(n for n, _ in reads), size)
    fresh.snapshot(RUN)  # the same file again: read from memory, not the Hub
    assert len([1 for name, _, _ in hub_stub.downloads if name == path]) == len(reads)


def test_files_of_the_old_flat_layout_move_into_the_run_folder_with_todays_columns(hub_stub, client, ckpt, tmp_path):  # noqa: F811
    import datasets
    import pyarrow as pa
    from huggingface_hub import CommitOperationAdd, snapshot_download

    old_columns = [n for n in OUTPUT_SCHEMA.names if n not in ("caption_flags", "caption_attempts")]
    old = pa.Table.from_pylist(make_rows(0, 5), schema=pa.schema([OUTPUT_SCHEMA.field(n) for n in old_columns]))
    buf = io.BytesIO()
    pq.write_table(old, buf)
    legacy = f"data/{RUN}-w000-000000-000000.parquet"  # what version 0.1 pushed
    client.api.create_commit(REPO, [CommitOperationAdd(legacy, buf.getvalue())], commit_message="0.1",
                             repo_type="dataset")
    w = Writer(ckpt)
    w.parts(5, 5)  # keys 0-4 again (already published by 0.1) and 5-9
    assert client.push_pending(ckpt, RUN, 0) == 5
    files = data_files(hub_stub)
    assert legacy not in files and all(f.startswith(f"data/{RUN}/") for f in files)
    keys = sorted(k for r in hub_stub.read_rows(REPO) for k in [r["key"]])
    assert keys == sorted(r["key"] for r in make_rows(0, 10))  # every key once: the old rows kept, not re-pushed
    client.write_card(RUN_INFO, {})
    local = snapshot_download(REPO, repo_type="dataset", endpoint=hub_stub.endpoint, token=hub_stub.token,
                              cache_dir=tmp_path / "dl")
    ds = datasets.load_dataset(local, split="train", cache_dir=str(tmp_path / "ds_cache"))
    assert ds.num_rows == 10 and "caption_flags" in ds.column_names
