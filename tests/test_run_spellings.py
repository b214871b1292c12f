"""Settings spelled differently that caption the same way are one run (run_identity.canonical_settings): a greedy
run's --seed, --prompt with the default prompt's text, a text prompt's surrounding whitespace, a --keep-columns
name given twice. Default settings keep the ids they had; a dir or a Hub run an earlier version recorded in
another spelling goes on as that run."""
from __future__ import annotations

import json

import pytest
from dummy_runs import dummy_args
from test_exactly_once import hub_keys, run_id_of

from batched_image_inference import main
from vlm_caption import run_identity, store
from vlm_caption.config import RunConfig
from vlm_caption.errors import EXIT_OK
from vlm_caption.prompts import DEFAULT_PROMPT
from vlm_caption.run_identity import run_id_for

REPO = "tester/spellings"
PROMPTS_YAML = 'short: "Caption {tags} briefly."\nlong: |\n  Describe this artwork.\n'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("spellings") / "data", n=16, broken=False, seed=7, shard_size=8)


def run_id(**flags) -> str:
    return run_id_for(RunConfig(**flags).run_settings())


def as_before(monkeypatch) -> None:
    """Settings recorded and compared as versions before canonical_settings: every spelling is its own run."""
    monkeypatch.setattr(run_identity, "canonical_settings", dict, raising=False)


def test_default_ish_settings_keep_the_ids_they_had(tmp_path):
    (tmp_path / "p.yaml").write_text(PROMPTS_YAML)
    # computed by the code before canonical_settings existed: dirs and Hub folders of these runs keep their names
    assert run_id() == "7e0b0b184f69"
    assert run_id(format="json") == "aee36a530948"
    assert run_id(format="json", json_fields="subject,style") == "f417980c2eef"
    assert run_id(model="google/gemma-3-4b-it") == "2d35afa60764"
    assert run_id(prompt="Describe the style.") == "c04efa59ccec"
    assert run_id(temperature=0.7, seed=3, top_p=0.9) == "5f64d022a644"
    assert run_id(prompts_file=str(tmp_path / "p.yaml")) == "882041dd3b89"
    assert run_id(keep_columns="a,b") == "d8d06d16cf5f"


def test_equivalent_spellings_get_the_common_spellings_id(tmp_path):
    (tmp_path / "default.txt").write_text(DEFAULT_PROMPT + "\n")
    (tmp_path / "style.txt").write_text("Describe the style.\n")
    default = run_id()
    assert run_id(seed=7) == run_id(temperature=-0.0) == run_id(temperature=0, top_p=0.5) == default  # greedy
    assert run_id(prompt=DEFAULT_PROMPT) == run_id(prompt=f"  {DEFAULT_PROMPT}\n") == default
    assert run_id(prompt_file=str(tmp_path / "default.txt")) == default
    assert run_id(prompt=DEFAULT_PROMPT, format="json") == run_id(format="json")
    assert run_id(prompt="Describe the style.\n") == run_id(prompt_file=str(tmp_path / "style.txt")) == \
        run_id(prompt="Describe the style.")
    assert run_id(keep_columns="a, a,b") == run_id(keep_columns="a,b")
    assert RunConfig(keep_columns="a,a").kept_columns() == ["a"]
    # spellings that caption otherwise stay apart
    assert run_id(temperature=0.7, seed=7) != run_id(temperature=0.7)
    assert run_id(prompt="Describe the style.\n", format="json") != run_id(prompt="Describe the style.", format="json")
    assert run_id(keep_columns="b,a") != run_id(keep_columns="a,b")  # the output's column order


def test_the_chat_template_trims_the_text_prompt_the_model_gets(tiny_model_dir):
    """Why a text prompt's surrounding whitespace is no part of its run: the model gets the same tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))

    def chat(prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert chat("  Describe the style.\n\n") == chat("Describe the style.")
    # a JSON run's instruction follows the prompt: its trailing whitespace reaches the model, so it stays
    assert chat("Describe the style.\n\n\nAnswer.") != chat("Describe the style.\n\nAnswer.")


@pytest.mark.parametrize("old_flags", [("--seed", "7"), ("--prompt", DEFAULT_PROMPT), ("--prompt", "Say it.\n")])
def test_a_dir_recorded_in_an_older_spelling_resumes(data, tmp_path, monkeypatch, old_flags):
    ckpt = tmp_path / "ckpt"
    new_flags = () if old_flags[0] == "--seed" or old_flags[1] == DEFAULT_PROMPT else ("--prompt", "Say it.")
    with monkeypatch.context() as m:
        as_before(m)
        assert main(dummy_args(data, ckpt, "--max-images", "8", *old_flags)) == EXIT_OK
    old = run_id_of(ckpt)
    assert old != run_id_for(RunConfig(**_kw(new_flags)).run_settings())  # the id changed: found by its settings
    first = {k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks}
    for flags in (old_flags, new_flags):  # either spelling goes on as that run, captioning only what is left
        assert main(dummy_args(data, ckpt, *flags)) == EXIT_OK
        keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
        assert run_id_of(ckpt) == old and len(keys) == len(set(keys)) == 16 and first <= set(keys)
    assert json.loads((ckpt / store.RUN_JSON).read_text())["run_id"] == old


def _kw(flags: tuple) -> dict:
    return {"prompt": flags[1]} if flags else {}


def hub_args(stub, data, ckpt, *extra: str) -> list[str]:
    return ["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
            "--hf-repo", REPO, "--hub-endpoint", stub.endpoint, "--max-tokens", "6", "--batch-size", "4",
            "--checkpoint-every", "8", "--num-loader-workers", "1", "--min-push-interval", "0", *extra]


def test_a_new_dir_publishes_into_the_hub_run_of_an_older_spelling(hub_stub, data, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:  # machine A, an earlier version: --seed 7 made its own run
        as_before(m)
        assert main(hub_args(hub_stub, data, tmp_path / "a", "--seed", "7", "--shards", "0")) == EXIT_OK
    old = run_id_of(tmp_path / "a")
    assert old != run_id(backend="dummy", model="dummy-model", max_tokens=6)
    # machine B, this version, the same job without --seed, all shards: shard 0 is on the Hub already
    assert main(hub_args(hub_stub, data, tmp_path / "b")) == EXIT_OK
    assert run_id_of(tmp_path / "b") == old
    keys = hub_keys(hub_stub, REPO)
    assert len(keys) == len(set(keys)) == 16 and hub_keys(hub_stub, REPO, old) == keys
    assert len([k for _, ks in store.read_keys(store.list_parts(tmp_path / "b")) for k in ks]) == 8  # shard 1 only
    capsys.readouterr()
    # a check by the new flags, from a machine with neither dir, finds that run too
    assert main(hub_args(hub_stub, data, tmp_path / "laptop", "--check-hub")) == EXIT_OK
    out = capsys.readouterr().out
    assert f"run {old}" in out and "16 expected, 16 published" in out


def test_a_new_dir_joins_the_run_an_earlier_version_has_not_described_yet(hub_stub, data, tmp_path, monkeypatch,
                                                                          capsys):
    """A machine not yet upgraded, captioning for days under --seed 7, writes runs/{run_id}.json only when its
    process ends; an upgraded machine with the very same flags on a new dir joined no run of the Hub's records and
    published every key a second time under its own id."""
    from vlm_caption import hub

    with monkeypatch.context() as m:  # the earlier version, still in its first process: data, no runs/*.json
        as_before(m)
        m.setattr(hub.HubClient, "write_card", lambda *a, **k: None)
        assert main(hub_args(hub_stub, data, tmp_path / "a", "--seed", "7", "--shards", "0")) == EXIT_OK
    old = run_id_of(tmp_path / "a")
    assert not [p for p in hub_stub.repo_files(REPO) if p.startswith("runs/")]
    capsys.readouterr()
    assert main(hub_args(hub_stub, data, tmp_path / "laptop", "--seed", "7", "--check-hub", "--shards", "0")) == 0
    assert f"checking run {old}" in capsys.readouterr().out  # was: 'holds no data of run ...' (exit 2)
    assert main(hub_args(hub_stub, data, tmp_path / "b", "--seed", "7")) == EXIT_OK
    assert run_id_of(tmp_path / "b") == old
    keys = hub_keys(hub_stub, REPO)
    assert len(keys) == len(set(keys)) == 16 and hub_keys(hub_stub, REPO, old) == keys


def test_merge_only_of_two_spellings_of_one_run(data, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        as_before(m)
        assert main(dummy_args(data, tmp_path / "a", "--seed", "7", "--shards", "0")) == EXIT_OK
    assert main(dummy_args(data, tmp_path / "b", "--shards", "1")) == EXIT_OK
    assert run_id_of(tmp_path / "a") != run_id_of(tmp_path / "b")
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(tmp_path / "a"),
                 str(tmp_path / "b")]) == EXIT_OK


def test_a_dir_that_took_the_hub_runs_id_and_lost_its_run_json_is_that_run_again(hub_stub, data, tmp_path,
                                                                                 monkeypatch):
    with monkeypatch.context() as m:  # an earlier version's --seed 7 run on the Hub
        as_before(m)
        assert main(hub_args(hub_stub, data, tmp_path / "a", "--seed", "7", "--shards", "0")) == EXIT_OK
    old = run_id_of(tmp_path / "a")
    assert main(hub_args(hub_stub, data, tmp_path / "b", "--max-images", "12")) == EXIT_OK
    assert run_id_of(tmp_path / "b") == old
    (tmp_path / "b" / store.RUN_JSON).unlink()  # lost: its parts name run `old`, which these very flags are
    assert main(hub_args(hub_stub, data, tmp_path / "b")) == EXIT_OK  # was: refused, "rerun with the settings..."
    assert run_id_of(tmp_path / "b") == old
    keys = hub_keys(hub_stub, REPO)
    assert len(keys) == len(set(keys)) == 16 and hub_keys(hub_stub, REPO, old) == keys


def test_a_hub_run_of_another_local_dir_of_the_same_name_is_not_ours(tmp_path):
    """A Hub run that an earlier version named by a local dir's path shows only local:NAME: which dir (and which
    weights) made it is unknown, so a dir of that name elsewhere is not that run."""
    model = tmp_path / "elsewhere" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    settings = RunConfig(model=str(model)).run_settings()
    legacy = {k: v for k, v in run_identity.recorded_settings(settings).items() if k != run_identity.MODEL_IDENTITY}
    assert run_identity.same_settings(legacy, settings)  # the dir's own run.json (its path): that run
    assert not run_identity.same_settings({**legacy, "model": "local:model", "run_id": "0123456789ab"}, settings)
    hub = {**run_identity.recorded_settings(settings), "model": "local:model"}  # content-named: ours wherever
    assert run_identity.same_settings(hub, settings)


def test_only_the_process_that_writes_run_json_asks_for_the_hubs_id(tmp_path):
    """Each worker starting on a new dir looked the Hub up (a listing plus a download per other run of the repo);
    only the one writing run.json does now, and the others take the id it wrote."""
    settings = RunConfig(model="tiny").run_settings()
    asked = []

    def find() -> str:
        asked.append(1)
        return "aaaaaaaaaaaa"  # the Hub's run of these settings in another spelling

    workers = [store.CheckpointStore(tmp_path / "d", w, num_workers=3) for w in range(3)]
    ids = [w.open_run(settings, overwrite=False, find_run_id=find) for w in workers]
    assert ids == ["aaaaaaaaaaaa"] * 3 and len(asked) == 1


def test_a_later_versions_run_with_a_setting_this_one_does_not_know_is_not_ours(tmp_path):
    """Read alike on the settings this version knows, a later version's run of a setting it added (say a crop mode)
    captions otherwise: a new dir must not publish into its folder. Records this version writes list their setting
    names; earlier versions' list none and are read as before."""
    settings = RunConfig(model="google/gemma-3-4b-it").run_settings()
    first = store.CheckpointStore(tmp_path / "d", 0)
    first.open_run(settings, overwrite=False)
    record = json.loads((tmp_path / "d" / store.RUN_JSON).read_text())
    assert record["setting_names"] == sorted(run_identity.recorded_settings(settings))
    respelled = {**record, "run_id": "bbbbbbbbbbbb", "seed": 7}  # another spelling of these settings: ours
    assert run_identity.same_settings(respelled, settings)
    later = {**respelled, "vision_crop": "pan_and_scan", "setting_names": [*record["setting_names"], "vision_crop"]}
    assert not run_identity.same_settings(later, settings)
    earlier = {k: v for k, v in respelled.items() if k != "setting_names"}
    assert run_identity.same_settings(earlier, settings)


def test_a_hub_down_at_the_lookup_of_a_new_dirs_run_says_what_to_do(tmp_path):
    from vlm_caption import pipeline
    from vlm_caption.hub_retry import HubUnavailable

    class Down:
        def snapshot(self, run_id):
            raise HubUnavailable("Hub key listing failed 6 times, last: 503")

    with pytest.raises(HubUnavailable, match="rerun when it is reachable, or caption with --no-push"):
        pipeline.published_as(Down(), store.CheckpointStore(tmp_path / "d", 0), RunConfig(model="m").run_settings())


def test_the_typed_id_is_the_one_an_earlier_version_gave_a_column_kept_twice():
    """typed_settings is what versions before canonical_settings recorded: --keep-columns a,a as [a, a] (their
    run_settings, pinned here), so a machine of such a job not yet upgraded is found by its data folder."""
    cfg = RunConfig(keep_columns="b,a, a", model="google/gemma-3-4b-it")
    assert cfg.typed_settings()["keep_columns"] == ["b", "a", "a"]
    assert run_id_for(cfg.typed_settings()) == "fd3a657ccb92"  # 95ed0be's RunConfig(same flags).run_settings()
    assert cfg.run_settings()["keep_columns"] == ["b", "a"]  # one spelling for this version
