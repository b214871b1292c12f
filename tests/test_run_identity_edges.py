"""Where a local model's content-named run meets what else reads or names runs: an unreadable model dir, --push-only
(which pushes the dir's run and needs no model), --check-hub by the flags of a run an earlier version published
(named by the model's path), and --merge-only of a dir an earlier version made with one of this version."""
from __future__ import annotations

import json

import pytest
from dummy_runs import dummy_args
from test_bad_inputs import one_line_exit

from batched_image_inference import main
from vlm_caption import run_identity, store
from vlm_caption.config import RunConfig
from vlm_caption.errors import EXIT_OK, EXIT_USAGE, UsageError

REPO = "tester/ident"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("ident-edges") / "data", n=16, broken=False, seed=7, shard_size=8)


def denied(path, mode="r", *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))


def unreadable_model_files(monkeypatch) -> None:
    """As on a node that cannot read the weights: every open fails, and no identity of this process is kept."""
    monkeypatch.setattr(run_identity, "open", denied, raising=False)
    run_identity._identity_of.cache_clear()


def path_named(monkeypatch):
    """Settings as versions before run_identity.py made them: the local model dir named by its path only."""
    real = RunConfig.run_settings
    monkeypatch.setattr(RunConfig, "run_settings", lambda self: {
        k: v for k, v in real(self).items() if k != run_identity.MODEL_IDENTITY})


def hub_args(stub, data, ckpt, model, *extra: str) -> list[str]:
    return ["--backend", "dummy", "--model", str(model), "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", REPO, "--hub-endpoint", stub.endpoint, "--max-tokens", "6", "--batch-size", "4",
            "--checkpoint-every", "8", "--num-loader-workers", "1", "--min-push-interval", "0", *extra]


def test_an_unreadable_model_dir_is_one_line_not_a_traceback(tiny_model_dir, data, tmp_path, monkeypatch):
    unreadable_model_files(monkeypatch)
    with pytest.raises(UsageError, match=r"^--model \S+: cannot read \S+ \(Permission denied\); make the model dir "):
        main([*dummy_args(data, tmp_path / "ckpt"), "--model", str(tiny_model_dir)])
    assert not (tmp_path / "ckpt" / store.RUN_JSON).exists()


def test_push_only_pushes_the_dirs_run_without_reading_the_model(hub_stub, tiny_model_dir, data, tmp_path,
                                                                 monkeypatch):
    ckpt = tmp_path / "ckpt"
    assert main([*dummy_args(data, ckpt), "--model", str(tiny_model_dir)]) == EXIT_OK
    unreadable_model_files(monkeypatch)  # a login node that cannot read the weights
    assert main(hub_args(hub_stub, data, ckpt, tiny_model_dir, "--push-only")) == EXIT_OK
    run = json.loads((ckpt / store.RUN_JSON).read_text())["run_id"]
    assert any(p.startswith(f"data/{run}/") for p in hub_stub.repo_files(REPO))


def test_check_hub_by_the_flags_finds_the_run_an_earlier_version_published(hub_stub, tiny_model_dir, data, tmp_path,
                                                                           monkeypatch, capsys):
    with monkeypatch.context() as m:
        path_named(m)
        assert main(hub_args(hub_stub, data, tmp_path / "old", tiny_model_dir)) == EXIT_OK
    old = json.loads((tmp_path / "old" / store.RUN_JSON).read_text())["run_id"]
    capsys.readouterr()
    # from a machine without that dir: the flags name the content-named run, which the repo does not hold
    assert main(hub_args(hub_stub, data, tmp_path / "laptop", tiny_model_dir, "--check-hub")) == EXIT_OK
    out = capsys.readouterr().out
    assert f"checking run {old}" in out and "16 expected, 16 published" in out
    assert json.loads((tmp_path / "laptop" / "hub_coverage.json").read_text())["run_id"] == old
    # flags of a run the repo holds in neither naming: that run is named, not the path-named one
    with pytest.raises(UsageError, match=rf"holds no data of run (?!{old})[0-9a-f]{{12}}; it holds run\(s\) {old}:"):
        main(hub_args(hub_stub, data, tmp_path / "laptop", tiny_model_dir, "--check-hub", "--max-tokens", "5"))
    assert "checking run" not in capsys.readouterr().out


def test_merge_only_of_a_dir_an_earlier_version_made_and_one_of_this_version(tiny_model_dir, data, tmp_path,
                                                                             monkeypatch):
    model = ["--model", str(tiny_model_dir)]
    with monkeypatch.context() as m:
        path_named(m)
        assert main([*dummy_args(data, tmp_path / "old", "--shards", "0"), *model]) == EXIT_OK
    assert main([*dummy_args(data, tmp_path / "new", "--shards", "1"), *model]) == EXIT_OK
    old, new = (json.loads((tmp_path / d / store.RUN_JSON).read_text()) for d in ("old", "new"))
    assert old["run_id"] != new["run_id"]  # one model at one path, named two ways
    merge = ["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "old"),
             "--checkpoint-dir", str(tmp_path / "new")]
    assert main(merge) == EXIT_OK
    # another model's dir is still refused
    with monkeypatch.context() as m:
        path_named(m)
        assert main([*dummy_args(data, tmp_path / "other", "--shards", "1", "--max-tokens", "5"), *model]) == EXIT_OK
    with pytest.raises(UsageError, match="different runs"):
        main([*merge[:-1], str(tmp_path / "other")])
    assert not run_identity.one_run([old, {**new, "max_tokens": 5}])


def test_one_runs_model_at_two_paths_keeps_one_public_name_on_the_card(hub_stub, tiny_model_dir, data, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "node-local" / "gemma-copy")
    assert main(hub_args(hub_stub, data, tmp_path / "m0", tiny_model_dir, "--shards", "0")) == EXIT_OK
    assert main(hub_args(hub_stub, data, tmp_path / "m1", copy, "--shards", "1")) == EXIT_OK
    run = json.loads((tmp_path / "m0" / store.RUN_JSON).read_text())["run_id"]
    info = json.loads(hub_stub.repo_files(REPO)[f"runs/{run}.json"])
    assert info["model"] == f"dummy:local:{tiny_model_dir.name}" and info["rows"] == 16
    assert str(tmp_path) not in json.dumps(info) and str(tiny_model_dir) not in json.dumps(info)  # no path published
    commits = hub_stub.commits_applied
    assert main(hub_args(hub_stub, data, tmp_path / "m0", tiny_model_dir, "--push-only")) == EXIT_OK
    assert hub_stub.commits_applied == commits  # nothing new: no card commit flipping the model's name back


def test_parts_that_name_no_run_are_not_adopted_by_a_hub_models_run(data, tmp_path):
    """run.json lost, parts of a version that recorded no run id in them: a Hub model's settings have no
    path-named id either (None), which must not pass as a match: refused as before, never a run.json of run null."""
    import pyarrow.parquet as pq

    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(data, ckpt, "--max-images", "8")) == EXIT_OK
    for part in store.list_parts(ckpt):
        pq.write_table(pq.read_table(part.path).replace_schema_metadata(None), part.path)
    (ckpt / store.RUN_JSON).unlink()
    with pytest.raises(UsageError, match=r"holds parts of run\(s\) unrecorded, not of this run [0-9a-f]{12}"):
        main(dummy_args(data, ckpt))
    assert not (ckpt / store.RUN_JSON).exists()


def test_the_smoke_test_pushes_again_to_a_repo_an_earlier_smoke_test_pushed_to(hub_stub, sample_data_dir, tmp_path,
                                                                               capsys):
    """test_pipeline.py --push builds the same tiny random model each time: named by its content, each smoke test
    would be one run, and a second one found its captions on the Hub already: nothing pushed, FAIL push."""
    import importlib.util
    import sys
    from pathlib import Path

    from test_demo_and_smoke import lines_starting

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("smoke_cli", root / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for ckpt in ("first", "second"):
        code = module.main(["--full", "--push", "--tiny", "--num-images", "3", "--max-tokens", "8", "--data-dir",
                            str(sample_data_dir), "--checkpoint-dir", str(tmp_path / ckpt),
                            "--hub-endpoint", hub_stub.endpoint, "--hf-repo", "tester/smoke"])
        out = capsys.readouterr().out
        assert code == 0 and "push" in lines_starting(out, "PASS"), out


def test_merge_only_sets_aside_parts_and_failures_of_another_run_and_refuses_a_dir_of_two_runs(data, tmp_path):
    """A part or failure file of another run copied into a dir was merged (its keys 'duplicated', exit 4; its
    generate failure turned the exit into 3); a dir without run.json holding two runs' parts was merged as one."""
    import shutil

    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main(dummy_args(data, mine, "--shards", "0")) == EXIT_OK
    assert main(dummy_args(data, other, "--prompt", "Name the colours.")) == EXIT_OK
    theirs = store.CheckpointStore(other, 3)
    theirs.run_id = json.loads((other / store.RUN_JSON).read_text())["run_id"]
    theirs.write_failures([{"key": "000000015", "original_key": "15", "url": "u", "stage": "generate", "error": "x"}])
    stray = [store.list_parts(other)[0].path, store.list_failure_files(other)[0].path]
    for path, dest in zip(stray, ("parts/captions-w007-000000.parquet", "failures/failures-w007-000000.parquet")):
        (mine / dest).parent.mkdir(exist_ok=True)
        shutil.copy(path, mine / dest)
    merge = ["--merge-only", "--data-dir", str(data), "--shards", "0", "--checkpoint-dir", str(mine)]
    assert main(merge) == EXIT_OK
    coverage = json.loads((mine / "coverage.json").read_text())
    assert (coverage["captioned"], coverage["failed"], coverage["duplicated"]) == (8, 0, 0)
    assert len(list((mine / store.QUARANTINE_DIR).iterdir())) == 2
    shutil.copy(stray[0], mine / "parts" / "captions-w007-000000.parquet")
    (mine / store.RUN_JSON).unlink()
    with pytest.raises(UsageError, match="has no run.json and holds parts of runs"):
        main(merge)


def test_merge_only_of_some_shards_counts_no_failure_of_another_shard(data, tmp_path):
    """A generate failure of shard 1 made --merge-only --shards 0 say '8 expected, 8 captioned, 1 failed' and exit 3."""
    import pyarrow.parquet as pq

    ckpt = tmp_path / "c"
    assert main(dummy_args(data, ckpt, "--shards", "0")) == EXIT_OK
    key = pq.read_table(data / "full_metadata.parquet", columns=["key"]).column("key").to_pylist()[-1]  # shard 1
    writer = store.CheckpointStore(ckpt, 3)
    writer.run_id = json.loads((ckpt / store.RUN_JSON).read_text())["run_id"]
    writer.write_failures([{"key": key, "original_key": key, "url": "u", "stage": "generate", "error": "timeout"}])
    assert main(["--merge-only", "--data-dir", str(data), "--shards", "0", "--checkpoint-dir", str(ckpt)]) == EXIT_OK
    assert json.loads((ckpt / "coverage.json").read_text())["failed"] == 0


def test_dry_run_of_a_dir_that_lost_run_json_says_a_real_run_refuses_another_runs_parts(data, tmp_path, capsys):
    """It said 'to do 0, already done 16' with no note; the real run then refused the parts in one line."""
    ckpt = tmp_path / "c"
    assert main(dummy_args(data, ckpt, "--prompt", "Name the colours.")) == EXIT_OK
    (ckpt / store.RUN_JSON).unlink()
    capsys.readouterr()
    assert main([*dummy_args(data, ckpt), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "to do 16, already done 0" in out and "a real run needs the settings that made them" in out
    with pytest.raises(UsageError, match="run.json is missing and the dir holds parts of run"):
        main(dummy_args(data, ckpt))
    assert main([*dummy_args(data, ckpt, "--prompt", "Name the colours."), "--dry-run"]) == EXIT_OK
    assert "to do 0, already done 16" in capsys.readouterr().out  # its own run re-adopts them


def test_overwrite_with_a_mode_that_starts_no_run_is_refused_in_one_line(tmp_path, capsys):
    """--merge-only --overwrite merged as if --overwrite were not there: the user believed the old run set aside."""
    (tmp_path / "c").mkdir()
    for mode in ("--merge-only", "--push-only", "--check-hub"):
        code, err = one_line_exit(capsys, [mode, "--overwrite", "--checkpoint-dir", str(tmp_path / "c"),
                                           "--data-dir", str(tmp_path)])
        assert code == EXIT_USAGE and f"--overwrite starts a run over; {mode} starts none" in err, err
