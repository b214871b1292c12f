"""A local model dir names its run by its content, not its path: the same weights at two paths (two machines)
are one run, in one folder of the repo; new weights at one path are another run; and a dir an earlier version
wrote (its run named by the model's path) goes on as that run."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from dummy_runs import dummy_args
from test_check_hub import coverage
from test_exactly_once import REPO_ID, Cli, hub_keys, ok, run_id_of

from batched_image_inference import main
from vlm_caption import run_identity, store
from vlm_caption.config import RunConfig
from vlm_caption.errors import EXIT_OK, UsageError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("ident") / "data", n=16, broken=False, seed=7, shard_size=8)


def settings_of(model) -> dict:
    return RunConfig(model=str(model), backend="dummy").run_settings()


def test_the_same_weights_at_two_paths_are_one_run_and_other_weights_another(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "gemma")
    here, there = settings_of(tiny_model_dir), settings_of(copy)
    assert here["model"] != there["model"]  # each records the path that loads it...
    assert store.run_id_for(here) == store.run_id_for(there)  # ...and the content names the run
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(os.urandom(weights.stat().st_size))  # a fine-tune: every byte new, same size
    assert store.run_id_for(settings_of(copy)) != store.run_id_for(here)


def test_large_files_are_read_in_sampled_blocks_that_span_them(tmp_path, monkeypatch):
    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gemma3"}')
    (model / "model.safetensors").write_bytes(os.urandom(3 * run_identity.WHOLE_FILE_BYTES))
    (model / "README.md").write_text("notes")  # not a file that makes the model
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n=-1):
            out = self.f.read(n)
            reads.append(len(out))
            return out

    monkeypatch.setattr(run_identity, "open", lambda p, mode: Counting(real_open(p, mode)), raising=False)
    run_identity._identity_of.cache_clear()
    first = run_identity.local_model_identity(model)
    big = [n for n in reads if n == run_identity.SAMPLE_BYTES]
    assert len(big) == run_identity.SAMPLE_BLOCKS  # 2 MB of a 12 MB file, not all of it
    (model / "README.md").write_text("other notes")
    assert run_identity.local_model_identity(model) == first
    with open(model / "model.safetensors", "r+b") as f:  # the last block is one of the samples
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert run_identity.local_model_identity(model) != first


def test_two_machines_with_the_model_at_other_paths_publish_one_run(hub_stub, tiny_model_dir, data, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "node-local" / "model")
    ok(Cli(hub_stub, tiny_model_dir, data, tmp_path).run("m0", "--shards", "0"))
    ok(Cli(hub_stub, copy, data, tmp_path).run("m1", "--shards", "1"))
    run = run_id_of(tmp_path / "m0")
    assert run_id_of(tmp_path / "m1") == run  # one run, one folder of the repo, one card config
    assert len(hub_keys(hub_stub, REPO_ID, run)) == 16 == len(hub_keys(hub_stub, REPO_ID))
    check = Cli(hub_stub, copy, data, tmp_path)  # and a check by the flags finds it, from either path
    assert "0 missing" in ok(check.run("laptop", "--check-hub")) and coverage(check, "laptop")["run_id"] == run


def test_a_dir_an_earlier_version_named_by_the_models_path_goes_on(tiny_model_dir, data, tmp_path, monkeypatch):
    ckpt = tmp_path / "old"
    model = ["--model", str(tiny_model_dir)]
    path_named = RunConfig.run_settings

    def as_before(self):  # run.json as versions before run_identity.py wrote it
        return {k: v for k, v in path_named(self).items() if k != run_identity.MODEL_IDENTITY}

    with monkeypatch.context() as m:
        m.setattr(RunConfig, "run_settings", as_before)
        assert main([*dummy_args(data, ckpt, "--max-images", "8"), *model]) == EXIT_OK
    old = json.loads((ckpt / store.RUN_JSON).read_text())
    assert run_identity.MODEL_IDENTITY not in old
    assert main([*dummy_args(data, ckpt), *model]) == EXIT_OK  # this version: the same run goes on
    keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    assert run_id_of(ckpt) == old["run_id"] and len(keys) == len(set(keys)) == 16
    (ckpt / store.RUN_JSON).unlink()  # with run.json gone, its parts are re-adopted, not refused
    assert main([*dummy_args(data, ckpt), *model]) == EXIT_OK and run_id_of(ckpt) == old["run_id"]


def test_new_weights_saved_over_the_models_dir_are_another_run(tiny_model_dir, data, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "my-finetune")
    ckpt = tmp_path / "ckpt"
    assert main([*dummy_args(data, ckpt, "--max-images", "8"), "--model", str(model)]) == EXIT_OK
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(os.urandom(weights.stat().st_size))  # trained further, saved to the same dir
    with pytest.raises(UsageError, match=r"other settings \(the files of --model \(same path, other weights\)\)"):
        main([*dummy_args(data, ckpt), "--model", str(model)])  # not mixed into the first weights' captions
