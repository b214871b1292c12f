"""Captions worth publishing: quality flags, inline retry, JSON captions (prompts: test_caption_prompts.py).

Pipeline logic runs with `--backend dummy` (VLM_CAPTION_DUMMY_FAULTS=1 makes it write broken captions for keys
by their last digit, see dummy_backend.py); what concerns the model runs on the tiny Gemma 3 in fp32.
"""
from __future__ import annotations

import dataclasses
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batched_image_inference import main
from dummy_runs import FAULTS, dummy_args, faults, merged_rows  # noqa: F401  (faults: fixture)

from vlm_caption import store
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK

# ---------------------------------------------------------------- 1: quality flags


def test_flags_column_summary_and_preview(faults, sample_data_dir, tmp_path):
    from vlm_caption.preview import write_preview

    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.schema.field("caption_flags").type == pa.list_(pa.string())
    for part in store.list_parts(ckpt):
        assert pq.read_schema(part.path).field("caption_flags").type == pa.list_(pa.string())
    rows = {r["key"]: r for r in merged.to_pylist()}
    assert {tuple(r["caption_flags"]) for k, r in rows.items() if k.endswith("2")} == {("preamble",)}
    assert not any(r["vlm_caption"].startswith("Here is") for r in rows.values())  # stripped before the write
    assert all("repetition" in r["caption_flags"] for k, r in rows.items() if k.endswith("4"))  # retried, still
    assert all(r["caption_flags"] == [] for k, r in rows.items() if k[-1] not in "24")
    expected = {}
    for r in rows.values():
        for f in r["caption_flags"]:
            expected[f] = expected.get(f, 0) + 1
    assert expected.get("preamble") and expected.get("repetition")
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert summary["checkpoint_dir"]["caption_flags"] == expected
    assert summary["this_run"]["caption_flags"] == expected  # one run made the whole dir
    out = tmp_path / "preview.html"
    write_preview(ckpt, out)
    html = out.read_text()
    assert 'data-flags="preamble"' in html and '<option value="repetition">' in html
    assert '<option value="flags">' in html and "quality flags of those shown" in html


def test_card_lists_flag_counts_per_run():
    from vlm_caption.card import render_dataset_card

    runs = [{"run_id": "aaa", "rows": 5, "created": "2026-01-02", "caption_flags": {"repetition": 2, "empty": 1}},
            {"run_id": "bbb", "rows": 3, "created": "2026-01-01"}]
    card = render_dataset_card("me/data", runs)
    first, second = card.split("### Run `aaa`")[1].split("### Run `bbb`")
    assert "captions per flag (README \"Caption quality\"): empty: 1, repetition: 2" in first
    assert "captions per flag (README \"Caption quality\"): none" in second
    assert "`caption_flags`" in card  # the column table


def test_flag_counts_reach_the_hub_card_and_runs_json(hub_stub, tiny_model_dir, tmp_path):  # noqa: F811
    from test_exactly_once import REPO_ID, Cli, ok

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=12, broken=False, seed=3, shard_size=12)
    cli = Cli(hub_stub, tiny_model_dir, data, tmp_path)
    cli.env.update(FAULTS)
    ok(cli.run("c", "--max-tokens", "40"))
    run_id = json.loads((tmp_path / "c" / store.RUN_JSON).read_text())["run_id"]
    files = hub_stub.repo_files(REPO_ID)
    published = json.loads(files[f"runs/{run_id}.json"])
    local = json.loads((tmp_path / "c" / store.SUMMARY).read_text())["checkpoint_dir"]["caption_flags"]
    assert published["caption_flags"] == local and local
    from vlm_caption.rows import describe_counts

    assert describe_counts(local) in files["README.md"].decode()


# ---------------------------------------------------------------- 2: inline retry


def test_flagged_captions_are_retried_once_and_the_better_kept(faults, sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    assert len(keys) == len(set(keys))  # every key once
    rows = {r["key"]: r for r in merged_rows(ckpt)}
    assert pq.read_schema(ckpt / store.MERGED).field("caption_attempts").type == pa.int32()
    for key, row in rows.items():
        digit = key[-1]
        assert row["caption_attempts"] == (2 if digit in "134" else 1), key
        if digit in "13":  # the retry is clean: it is kept
            assert row["caption_flags"] == [] and "painted loosely painted loosely" not in row["vlm_caption"]
        if digit == "4":  # both loop: the first stays
            assert "repetition" in row["caption_flags"] and "again" not in row["vlm_caption"]  # a tie: the first
    assert {k[-1] for k in rows} >= set("1234")
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert "empty" not in summary["checkpoint_dir"]["caption_flags"]


def test_a_retry_that_refuses_or_is_garbled_does_not_replace_the_first_caption():
    """A caption that loops at its end still describes the image; a retry that refuses describes nothing."""
    from vlm_caption.backends import Caption
    from vlm_caption.rows import caption_values

    loop = Caption("A harbour at dusk with boats. " + "The gulls circle. " * 4, "stop", 30)
    for bad in ("I'm sorry, but I can't describe this image.", "\ufffd\ufffd <end_of_turn> boats harbour"):
        kept = caption_values(loop, Caption(bad, "stop", 9))
        assert kept["vlm_caption"].startswith("A harbour") and kept["caption_flags"] == ["repetition"], bad
    assert caption_values(loop, Caption("A harbour at dusk.", "stop", 5))["caption_flags"] == []


def test_retry_penalty_0_means_no_second_try(faults, sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt, "--retry-repetition-penalty", "0")) in (EXIT_OK, EXIT_ITEMS_FAILED)
    rows = merged_rows(ckpt)
    assert rows and all(r["caption_attempts"] == 1 for r in rows)
    assert any("repetition" in r["caption_flags"] for r in rows)  # flagged, kept as they came
    assert store.read_run_json(ckpt)["retry_repetition_penalty"] == 0  # a run of its own


def test_retry_settings_reach_the_transformers_generate(tiny_model_dir, sample_data_dir, monkeypatch):
    import torch

    from vlm_caption import dataset, loader
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import load_model

    model, processor = load_model(str(tiny_model_dir), torch.device("cpu"), dtype="float32")
    cap = Captioner(model, processor, model_name="tiny", prompt="Describe.", max_tokens=8,
                    retry_repetition_penalty=1.3)
    seen = []
    real = model.generate

    def spy(*args, generation_config=None, **kwargs):
        seen.append((generation_config.repetition_penalty, generation_config.no_repeat_ngram_size))
        return real(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    rows = list(dataset.iter_rows(sample_data_dir, {f"{i:09d}" for i in range(8)}))
    items = [i for i in loader.prefetch(rows, cap.prepare, workers=1, window=4) if i.error is None][:2]
    keys = [i.row["key"] for i in items]
    cap.generate(keys, [i.inputs for i in items])
    again = cap.generate(keys, [i.inputs for i in items], retry=True)
    assert seen[0][0] in (None, 1.0) and seen[0][1] in (None, 0) and seen[1] == (1.3, 4)
    assert cap.gen_config.repetition_penalty in (None, 1.0)  # the run's config is untouched
    assert len(again) == 2


# ---------------------------------------------------------------- 5: JSON captions


def test_json_format_fields_invalid_json_flag_and_retry(faults, sample_data_dir, tmp_path, monkeypatch):
    from vlm_caption import dummy_backend

    real = dummy_backend.DummyBackend._json
    monkeypatch.setattr(dummy_backend.DummyBackend, "_json", lambda self, key, stats, prompt, retry: (
        real(self, key, stats, prompt, retry and not key.endswith("25"))))  # key ...25: invalid on the retry too
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt, "--format", "json", "--json-fields", "subject,style")) in (
        EXIT_OK, EXIT_ITEMS_FAILED)
    schema = pq.read_schema(ckpt / store.MERGED)
    assert schema.field("caption_subject").type == schema.field("caption_style").type == pa.string()
    assert "caption_medium" not in schema.names
    rows = {r["key"]: r for r in merged_rows(ckpt)}
    assert {k for k in rows if k.endswith("5")} >= {"000000025", "000000005"}
    for key, r in rows.items():
        if key.endswith("25"):  # invalid twice: flagged, fields null, the raw text kept
            assert r["caption_flags"] == ["invalid_json"] and r["caption_attempts"] == 2
            assert r["caption_subject"] is None and r["vlm_caption"].startswith('{"subject"')
        elif key.endswith("5"):  # invalid, then valid on the retry
            assert r["caption_attempts"] == 2 and r["caption_flags"] == [] and r["caption_subject"]
        else:
            assert r["caption_attempts"] == 1 and r["caption_flags"] == []
            assert json.loads(r["vlm_caption"]) == {"subject": r["caption_subject"], "style": r["caption_style"]}
            assert key in r["caption_subject"]
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert summary["checkpoint_dir"]["caption_flags"] == {"invalid_json": sum(k.endswith("25") for k in rows)}
    run = store.read_run_json(ckpt)
    assert run["format"] == "json" and run["json_fields"] == ["subject", "style"]


def test_json_lacking_some_fields_is_flagged_missing_fields_everywhere_flags_are_counted(
        sample_data_dir, tmp_path, monkeypatch, capsys):
    """An object with some of the fields is valid (its fields are kept) but flagged, so those rows can be
    filtered: in the rows, the console, run_summary.json, the preview and the card."""
    from vlm_caption import dummy_backend
    from vlm_caption.card import render_dataset_card
    from vlm_caption.preview import write_preview

    real = dummy_backend.DummyBackend._json

    def drop_style(self, key, stats, prompt, retry):
        cap = real(self, key, stats, prompt, retry)
        if not key.endswith("7"):
            return cap
        obj = json.loads(cap.text)
        return dataclasses.replace(cap, text=json.dumps({"subject": obj["subject"], "mood": ""}))

    monkeypatch.setattr(dummy_backend.DummyBackend, "_json", drop_style)
    ckpt = tmp_path / "ckpt"
    args = dummy_args(sample_data_dir, ckpt, "--format", "json", "--json-fields", "subject,style,mood")
    assert main(args) in (EXIT_OK, EXIT_ITEMS_FAILED)
    rows = {r["key"]: r for r in merged_rows(ckpt)}
    lacking = {k for k in rows if k.endswith("7")}
    assert lacking
    for key, r in rows.items():  # "" answers a field (the instruction asks for it): only an absent key is missing
        assert r["caption_flags"] == (["missing_fields"] if key in lacking else []), key
        assert r["caption_attempts"] == 1 and r["caption_subject"]
    counts = {"missing_fields": len(lacking)}
    assert f"quality flags of this run's captions: missing_fields: {len(lacking)}" in capsys.readouterr().out
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert summary["this_run"]["caption_flags"] == summary["checkpoint_dir"]["caption_flags"] == counts
    out = tmp_path / "preview.html"
    write_preview(ckpt, out)
    html = out.read_text()
    assert '<option value="missing_fields">' in html and 'data-flags="missing_fields"' in html
    card = render_dataset_card("me/data", [{**store.read_run_json(ckpt), "rows": len(rows), "caption_flags": counts}])
    assert f'captions per flag (README "Caption quality"): missing_fields: {len(lacking)}' in card


def test_json_instruction_is_appended_to_the_prompt_and_bad_fields_are_usage_errors(sample_data_dir, tmp_path,
                                                                                    capsys):
    from vlm_caption.cli import run_main
    from vlm_caption.errors import EXIT_USAGE
    from vlm_caption.prompts import DEFAULT_JSON_FIELDS, json_instruction

    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt, "--dry-run", "--prompt", "Look.", "--format", "json")) == 0
    assert f"Look.\n    \n    {json_instruction(DEFAULT_JSON_FIELDS)}" in capsys.readouterr().out
    for extra, says in ((["--json-fields", "a"], "--json-fields needs --format json"),
                        (["--format", "json", "--json-fields", "flags"], "--json-fields 'flags'"),
                        (["--format", "yaml"], "--format must be text or json")):
        with pytest.raises(SystemExit) as exc:
            run_main(main, dummy_args(sample_data_dir, ckpt, *extra), prog="batched_image_inference.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == EXIT_USAGE and len(err) == 1 and says in err[0], err


def test_the_json_instruction_version_names_json_runs_and_leaves_earlier_run_ids_as_they_were(monkeypatch):
    """A reworded instruction asks another question: its runs must not share a run id (nor a checkpoint dir)
    with the old wording's. Version 1, the wording of the runs made before the version existed, is not recorded."""
    from vlm_caption import prompts
    from vlm_caption.config import RunConfig

    def run_id(**extra) -> str:
        return store.run_id_for(RunConfig(model="org/vlm", max_tokens=300, temperature=0.0, seed=0,
                                          **extra).run_settings())

    before = {(): "a82f962dc042", (("format", "json"),): "342102219d60",  # computed before the version existed
              (("format", "json"), ("json_fields", "subject,style")): "c32956afc9e9",
              (("format", "json"), ("prompt", "Look at {tags}."), ("template_value_chars", 0)): "3324c0e5e8ac",
              # a template's id since its values are cut (--template-value-chars, default 1000)
              (("format", "json"), ("prompt", "Look at {tags}.")): "aa71c0b99434"}
    assert prompts.JSON_INSTRUCTION_VERSION == 1
    assert {k: run_id(**dict(k)) for k in before} == before
    monkeypatch.setattr(prompts, "JSON_INSTRUCTION_VERSION", 2)
    assert all(run_id(**dict(k)) != v for k, v in before.items() if k)  # every JSON run gets another id
    assert run_id() == before[()]  # a text run asks for no JSON
    assert RunConfig(format="json").run_settings()["json_instruction_version"] == 2


def test_card_names_the_json_fields():
    from vlm_caption.card import render_dataset_card

    card = render_dataset_card("me/data", [{"run_id": "a", "format": "json", "json_fields": ["subject", "mood"]}])
    assert "fields in\n  `caption_subject`, `caption_mood`" in card


# ---------------------------------------------------------------- parts written before the flags existed


def test_parts_without_the_new_columns_are_kept_and_filled_in(faults, sample_data_dir, tmp_path):
    from vlm_caption import hub

    ckpt = tmp_path / "ckpt"
    args = dummy_args(sample_data_dir, ckpt, "--max-images", "16")
    assert main(args) == EXIT_OK
    old = store.list_parts(ckpt)[0].path
    table = pq.read_table(old)
    table = table.drop_columns(["caption_flags", "caption_attempts"])
    texts = table.column("vlm_caption").to_pylist()
    texts[0] = "Sure! Here is a description of the artwork:\n" + texts[0]  # as an older run wrote it
    table = table.set_column(table.column_names.index("vlm_caption"), "vlm_caption", pa.array(texts))
    pq.write_table(table, old)  # the run id stays in the file's metadata
    before = len(store.list_parts(ckpt))
    assert main(args) == EXIT_OK  # nothing quarantined, nothing captioned again
    assert len(store.list_parts(ckpt)) == before and not (ckpt / store.QUARANTINE_DIR).exists()
    merged = {r["key"]: r for r in merged_rows(ckpt)}
    first = merged[table.column("key")[0].as_py()]
    assert first["caption_flags"] == ["preamble"] and first["caption_attempts"] == 1
    assert not first["vlm_caption"].startswith("Sure!")
    assert pq.read_schema(ckpt / store.MERGED).names == store.OUTPUT_SCHEMA.names
    parts = store.list_parts(ckpt)
    keys = sorted(k for _, ks in store.read_keys(parts) for k in ks)
    got = pq.read_table(io.BytesIO(hub.hub_file_bytes(hub.HubFile("x", 0, parts, keys))))
    assert got.schema.names == store.OUTPUT_SCHEMA.names and got.num_rows == len(keys) > 0


def test_prompts_file_with_json_fields_and_flag_counts_per_prompt(faults, sample_data_dir, tmp_path):
    prompts_file = tmp_path / "p.json"
    prompts_file.write_text(json.dumps({"one": "Look.", "two": "Look at {tags}."}))
    ckpt = tmp_path / "ckpt"
    args = dummy_args(sample_data_dir, ckpt, "--prompts-file", str(prompts_file), "--format", "json",
                      "--json-fields", "subject")
    assert main(args) in (EXIT_OK, EXIT_ITEMS_FAILED)
    names = pq.read_schema(ckpt / store.MERGED).names
    assert {"caption_subject_one", "caption_subject_two"} <= set(names) and "caption_subject" not in names
    by_prompt = json.loads((ckpt / store.SUMMARY).read_text())["checkpoint_dir"]["caption_flags_by_prompt"]
    assert set(by_prompt) == {"one", "two"}
