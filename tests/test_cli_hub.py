"""The real CLI meets the Hub (the local stub): a refused token stops it at the door, --no-push touches nothing
and --push-only then publishes every part once (kills and faults: test_crash_loops.py)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hub_parts import assert_hub_matches
from hub_stub import REPO_ROOT_HINT

from batched_image_inference import main
from vlm_caption import hub, store
from vlm_caption.errors import EXIT_OK, EXIT_USAGE

CLI = Path(__file__).resolve().parent.parent / "batched_image_inference.py"
REPO_ID = "tester/cli-hub"


def parquet_keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


# ---------------------------------------------------------------- the token at the door


def test_invalid_token_exits_2_with_one_line_that_hides_it(hub_stub, tiny_model_dir, sample_data_dir,
                                                           tmp_path):
    bad = "hf_CANARY" + "".join(random.Random(1234).choices("abcdefghijklmnopqrstuvwxyz", k=24))
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": bad, "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": REPO_ROOT_HINT}
    proc = subprocess.run([sys.executable, str(CLI), "--model", str(tiny_model_dir), "--data-dir",
                           str(sample_data_dir), "--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID,
                           "--hub-endpoint", hub_stub.endpoint], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the Hugging Face token" in lines[0], proc.stderr
    assert bad not in proc.stdout + proc.stderr and bad[len("hf_CANARY"):] not in proc.stdout + proc.stderr
    assert hub_stub.count("GET", "/api/whoami-v2") == 1 and hub_stub.commits_applied == 0
    assert not ckpt.exists()  # refused before anything was written or loaded


# ---------------------------------------------------------------- --no-push, then --push-only


def test_no_push_touches_nothing_then_push_only_pushes_everything_once(hub_stub, tiny_model_dir,
                                                                       sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ["--model", str(tiny_model_dir), "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(ckpt),
              "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint, "--max-tokens", "6", "--batch-size", "4",
              "--checkpoint-every", "8", "--num-loader-workers", "2"]
    # The real CLI, online, with a token and every Hub URL pointing at the stub: --no-push must not call it.
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_TOKEN": hub_stub.token, "HF_ENDPOINT": hub_stub.endpoint,
           "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": REPO_ROOT_HINT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(CLI), *common, "--no-push"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]  # only undecodable images failed
    assert hub_stub.requests == []
    parts = store.list_parts(ckpt)
    assert parts and not (ckpt / store.LEDGER).exists()

    assert main([*common, "--push-only"]) == EXIT_OK
    assert hub_stub.commits_applied == 2  # the data in one commit, then the card
    rows = assert_hub_matches(hub_stub, REPO_ID, ckpt)
    assert [r["key"] for r in rows] == parquet_keys(ckpt / store.MERGED)
    assert "README.md" in hub_stub.repo_files(REPO_ID)
    ledger = hub.read_ledger(ckpt)
    assert sorted(n for e in ledger for n in e["parts"]) == sorted(p.path.name for p in parts)
    data_files = sorted(p for p in hub_stub.repo_files(REPO_ID) if p.startswith("data/"))

    # Nothing left, and the card has not changed. The generation flags may be left out: --push-only pushes
    # the run the directory holds.
    assert main(["--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint,
                 "--push-only"]) == EXIT_OK
    assert hub_stub.commits_applied == 2
    assert sorted(p for p in hub_stub.repo_files(REPO_ID) if p.startswith("data/")) == data_files
    assert hub.read_ledger(ckpt) == ledger
    assert hub_stub.token not in proc.stdout + proc.stderr
    # The push kept its files' keys in the dir (hub_keys/): no later look at the repo read them back.
    assert not [name for name, _, _ in hub_stub.downloads if name.startswith("data/")]


def test_pushes_the_hub_refuses_mid_run_end_in_exit_1_with_every_caption_kept(hub_stub, sample_data_dir, tmp_path,
                                                                              monkeypatch, caplog):
    """The user's own namespace and a token that cannot write there (fine-grained, no write): connect cannot
    tell, the first push can. Captioning goes on, and the end says what to fix; exit 1, not 'retry later'."""
    hub_stub.create_repo_direct(REPO_ID)
    hub_stub.tokens["hf_FineGrainedNoWrite1234"] = {"name": "tester", "role": "fineGrained", "orgs": []}
    monkeypatch.setenv("HF_TOKEN", "hf_FineGrainedNoWrite1234")
    ckpt = tmp_path / "ckpt"
    code = main(["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(sample_data_dir),
                 "--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint,
                 "--min-push-interval", "0", "--push-every", "8", "--batch-size", "4", "--checkpoint-every", "8",
                 "--num-loader-workers", "1"])
    err = caplog.text
    assert code == 1, err
    assert "the Hub refused the push (tester/cli-hub): HTTP 403" in err
    assert "every caption is kept in" in err and "then run --push-only" in err
    assert "FineGrainedNoWrite" not in err
    assert hub_stub.commits_applied == 0 and sum(len(k) for _, k in store.read_keys(store.list_parts(ckpt))) > 30


def test_push_only_removes_what_a_killed_push_left_half_written_in_the_dir(hub_stub, tmp_path):
    """A push-only killed while it kept a file's keys (hub_keys/) leaves a tmp file; a dir only ever pushed from
    (a finished run, published from a login node) must not keep it for good."""
    import socket

    from hub_parts import RUN, Writer

    from vlm_caption.hub_key_cache import KEY_CACHE_DIR

    ckpt = tmp_path / "ckpt"
    Writer(ckpt).parts(4)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    left = ckpt / KEY_CACHE_DIR / f".git-{'0' * 40}.parquet.tmp-{socket.gethostname()}-{dead.pid}"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half an entry")
    assert main(["--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint,
                 "--push-only"]) == EXIT_OK
    assert len(hub_stub.read_rows(REPO_ID, prefix=f"data/{RUN}/")) == 4
    assert not left.exists()


def test_push_only_with_a_hub_that_lists_nothing_exits_3_in_one_line(hub_stub, tmp_path, monkeypatch, capsys):
    """The token check passes but every listing fails: as retryable as a refused commit (exit 3), not exit 1."""
    from hub_parts import RUN, Writer

    from vlm_caption import hub_retry
    from vlm_caption.errors import EXIT_ITEMS_FAILED

    ckpt = tmp_path / "ckpt"
    Writer(ckpt).parts(4)
    monkeypatch.setattr(hub, "RetryPolicy", lambda: hub_retry.RetryPolicy(sleep=lambda s: None))
    hub_stub.inject("GET", r"/api/datasets/.*/tree/", "500", times=1000)
    args = ["--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint, "--push-only"]
    assert main(args) == EXIT_ITEMS_FAILED
    assert "pushed 0 rows" in capsys.readouterr().out and hub_stub.commits_applied == 0
    hub_stub.inject("GET", r"/api/whoami", "503", times=1000)  # down from the first request: exit 3 too (was 1)
    assert main(args) == EXIT_ITEMS_FAILED
    assert "pushed 0 rows" in capsys.readouterr().out
    hub_stub.clear_faults()
    assert main(args) == EXIT_OK and len(hub_stub.read_rows(REPO_ID, prefix=f"data/{RUN}/")) == 4


def test_a_file_in_place_of_hub_keys_is_kept_and_the_cache_goes_beside_it(hub_stub, tmp_path, caplog):
    """A file where the dir keeps hub_keys/ (a user's notes, say) was a FileExistsError traceback right after the
    commit had landed, and at every later push: now the cache goes to hub_keys-1/, said once."""
    import logging

    from hub_parts import RUN, Writer

    from vlm_caption.hub_key_cache import KEY_CACHE_DIR

    ckpt = tmp_path / "ckpt"
    Writer(ckpt).parts(4)
    (ckpt / KEY_CACHE_DIR).write_text("notes\n")
    args = ["--checkpoint-dir", str(ckpt), "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint, "--push-only"]
    with caplog.at_level(logging.WARNING):
        assert main(args) == EXIT_OK
    assert f"{ckpt / KEY_CACHE_DIR} is not a folder" in caplog.text
    assert (ckpt / KEY_CACHE_DIR).read_text() == "notes\n" and list((ckpt / f"{KEY_CACHE_DIR}-1").glob("*.parquet"))
    assert main(args) == EXIT_OK and len(hub_stub.read_rows(REPO_ID, prefix=f"data/{RUN}/")) == 4


def test_a_token_pasted_with_quotes_is_one_usage_line_that_hides_it(hub_stub, sample_data_dir, tmp_path, monkeypatch,
                                                                    capsys):
    """“hf_...” copied with its quotes cannot go in an HTTP header: a UnicodeEncodeError traceback from httpx
    (exit 1), for a pushing run and for --check-hub alike."""
    from vlm_caption.cli import run_main

    secret = "hf_CANARYqwertyuiopasdfghjkl"
    monkeypatch.setenv("HF_TOKEN", f"\u201c{secret}\u201d")
    for mode in ([], ["--check-hub"]):
        args = ["--backend", "dummy", "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(tmp_path / "ckpt"),
                "--hf-repo", REPO_ID, "--hub-endpoint", hub_stub.endpoint, *mode]
        with pytest.raises(SystemExit) as exc:
            run_main(main, args, prog="batched_image_inference.py")
        err = capsys.readouterr().err
        assert exc.value.code == EXIT_USAGE and "not ASCII" in err and secret not in err, err[-800:]
