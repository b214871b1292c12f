"""python -m vlm_caption.compare (vlm_caption/compare.py): two real runs of the tiny Gemma 3 over the sample data,
compared in numbers; a run against itself; what it refuses in one line."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_captioning import caption_args, full_run  # noqa: F401  (full_run: a fixture)
from vlm_caption import store
from vlm_caption.compare import compare, main, similarity


def test_similarity_is_difflibs_ratio_over_words():
    assert similarity("a red fox", "a red fox") == 1.0
    assert similarity("a red fox", "a blue fox") == pytest.approx(2 / 3)
    assert similarity("", "") == 1.0 and similarity("a", "") == 0.0


def test_two_runs_of_other_settings_compared(full_run, tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """The default run (6 new tokens) against one of 12 tokens over its first images: the setting that differs,
    the images both captioned, identical and similar captions, each side's tokens and cut share, and the pairs
    that differ most, in full; --json writes the same numbers."""
    from batched_image_inference import main as caption

    _, base = full_run
    other = tmp_path / "other"
    assert caption(caption_args(tiny_model_dir, sample_data_dir, other, "--max-tokens", "12",
                                "--max-images", "8")) == 0
    out = tmp_path / "cmp.json"
    assert main([str(base), str(other), "--show", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings_that_differ"] == {"max_tokens": [6, 12]}
    base_keys = {r["key"] for r in pq.read_table(base / store.MERGED).to_pylist()}
    other_keys = {r["key"] for r in pq.read_table(other / store.MERGED).to_pylist()}
    n = len(base_keys & other_keys)
    assert result["images_in_both"] == n > 0 and result["only_in_base"] == len(base_keys) - n
    captions = result["captions"]["vlm_caption"]
    assert captions["identical"] < n and 0 < captions["mean_similarity"] < 1  # longer captions: not the same
    assert len(captions["differ_most"]) == 2 and captions["differ_most"][0]["similarity"] < 1
    assert result["base"]["mean_tokens"] <= 6 < result["other"]["mean_tokens"] <= 12
    assert "settings that differ: max_tokens: 6 -> 12" in printed and f"images in both: {n}" in printed
    assert f"vlm_caption: identical {captions['identical']}/{n}" in printed
    assert captions["differ_most"][0]["other"] in printed and f"wrote {out}" in printed


def test_a_run_against_its_own_copy_is_the_same(full_run, tmp_path, capsys):
    _, base = full_run
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    result = compare(base, copy)
    n = result["images_in_both"]
    assert result["settings_that_differ"] == {} and result["only_in_base"] == result["only_in_other"] == 0
    assert result["captions"]["vlm_caption"] == {"identical": n, "mean_similarity": 1.0, "at_least_0.9": n,
                                                 "differ_most": []}
    assert main([str(base), str(copy)]) == 0 and "settings that differ: none" in capsys.readouterr().out
    table = pq.read_table(copy / store.MERGED)  # two keys whose image is another in the copy
    sha = table.column("sha256").to_pylist()
    sha[:2] = ["0" * 64, "1" * 64]
    pq.write_table(table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha)),
                   copy / store.MERGED)
    result = compare(base, copy)
    assert result["images_in_both"] == n - 2 and result["other_image_under_key"] == 2
    assert main([str(base), str(copy)]) == 0 and "left out: 2 keys of both runs whose images differ" in \
        capsys.readouterr().out


@pytest.mark.parametrize("case, says", [
    ("missing", "does not exist; give the --checkpoint-dir of a captioning run"),
    ("unmerged", "has no all_captions.parquet; run batched_image_inference.py (or its --merge-only) on it first"),
    ("disjoint", "captioned no image in common: nothing to compare"),
    ("other_data", "captioned no image in common (42 keys in both hold other images, sha256: other data sets?)"),
    ("show", "--show must be 0 or more"),
    ("foreign", "is no captioning run's (it has no key column: image, caption)"),  # was a KeyError traceback
])
def test_what_it_cannot_compare_is_one_line_and_exit_2(full_run, tmp_path, capsys, case, says):
    from vlm_caption.cli import run_main

    _, base = full_run
    other = tmp_path / "other"
    other.mkdir()
    if case in ("disjoint", "other_data"):  # the same file, every key renamed / every image another
        table = pq.read_table(base / store.MERGED)
        column = "key" if case == "disjoint" else "sha256"
        values = pa.array([f"x{k}" for k in table.column(column).to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, values),
                       other / store.MERGED)
    if case == "foreign":  # another tool's file of that name
        pq.write_table(pa.table({"image": ["a.jpg"], "caption": ["a cat"]}), other / store.MERGED)
    argv = [str(base), str(tmp_path / "nowhere" if case == "missing" else other)]
    with pytest.raises(SystemExit) as ended:
        run_main(main, argv + (["--show", "-1"] if case == "show" else []), prog="compare")
    err = capsys.readouterr().err
    assert ended.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_setting_one_run_leaves_at_its_default_is_named_so(capsys):
    from vlm_caption.compare import differing_settings, report_lines

    base = {"setting_names": ["model", "max_tokens"], "model": "m", "max_tokens": 6, "created": "then"}
    other = {"setting_names": ["model", "max_tokens", "kv_cache_dtype"], "model": "m", "max_tokens": 6,
             "kv_cache_dtype": "fp8", "created": "now"}
    differ = differing_settings(base, other)
    assert differ == {"kv_cache_dtype": [None, "fp8"]}  # (created: not a setting)
    result = {"base": {"dir": "a", "run_id": "1", "mean_tokens": 6.0, "cut_at_max_tokens": 0.0, "flags": {}},
              "other": {"dir": "b", "run_id": "2", "mean_tokens": 6.0, "cut_at_max_tokens": 0.0, "flags": {}},
              "settings_that_differ": differ, "images_in_both": 1, "only_in_base": 0, "only_in_other": 0,
              "captions": {}}
    assert 'settings that differ: kv_cache_dtype: (default) -> "fp8"' in report_lines(result)


def test_json_fields_and_each_prompts_numbers_are_compared(tmp_path, monkeypatch, capsys):
    """A --format json run's caption_FIELD columns were never compared, and a --prompts-file run showed only its
    first prompt's tokens, cut share and flags (prompt `long`, garbled on every row, looked clean)."""
    from dummy_runs import clear_launch_env, dummy_args, flags_per_prompt, run_two_prompts

    from batched_image_inference import main as caption
    from vlm_caption.sample_data import write_sample

    clear_launch_env(monkeypatch)
    data = write_sample(tmp_path / "data", n=8, seed=3)
    fields, prompts = tmp_path / "fields", tmp_path / "prompts"
    assert caption(dummy_args(data, fields, "--format", "json", "--json-fields", "subject,style")) == 0
    assert list(compare(fields, fields)["captions"]) == ["vlm_caption", "caption_subject", "caption_style"]
    assert run_two_prompts(data, prompts) == 0
    garbled = flags_per_prompt(prompts)["long"]["garbled"]
    result = compare(prompts, prompts)
    assert list(result["captions"]) == ["vlm_caption", "vlm_caption_short", "vlm_caption_long"]
    assert result["base"]["by_prompt"]["long"]["flags"]["garbled"] == garbled >= 6
    assert "garbled" not in result["base"]["flags"]  # the plain columns: the first prompt's
    capsys.readouterr()
    assert main([str(prompts), str(prompts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("quality flags of prompt long: base {") and f"'garbled': {garbled}" in line
               for line in lines)
    assert any(line.startswith("tokens a caption of prompt short (mean): base ") for line in lines)
