"""The Hub dataset card as its readers use it: every config loads, counts cover every machine of a run, the
columns and prompts it names are the files' own, no local path is published."""
from __future__ import annotations

import json

import yaml
from hub_parts import REPO, RUN, Writer, ckpt, client, sleeps  # noqa: F401  (fixtures)

from vlm_caption import store
from vlm_caption.card import render_dataset_card
from vlm_caption.config import RunConfig
from vlm_caption.prompt_plan import run_specs


def card_yaml(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_run_with_no_published_rows_gets_no_config_and_is_never_the_default():
    """Its data_files would match nothing: as the default config, load_dataset(repo) failed for every run."""
    runs = [{"run_id": "aaa", "rows": 5, "created": "2026-01-01", "prompt": "p"},
            {"run_id": "bbb", "rows": 0, "created": "2026-01-02", "prompt": "p"}]
    card = render_dataset_card("me/data", runs)
    configs = card_yaml(card)["configs"]
    assert [c["config_name"] for c in configs] == ["aaa"] and configs[0]["default"] is True
    assert "### Run `aaa` (default config)" in card and "### Run `bbb`\n" in card
    assert "No rows published yet" in card.split("### Run `bbb`")[1]


def test_the_card_names_each_runs_columns_beyond_the_table():
    run = {"run_id": "aaa", "rows": 5, "prompt": None, "keep_columns": ["aesthetic"], "format": "json",
           "json_fields": ["subject"], "prompts": {"short": "Name it.", "long": "Describe it."}}
    card = render_dataset_card("me/data", [run])
    # (no prompt_order recorded: the file's order was the sorted one)
    assert "fields in\n  `caption_subject_long`, `caption_subject_short`" in card  # not `caption_subject`
    extra = card.split("Columns beyond the table below: ")[1].splitlines()[0]
    assert extra.startswith("`aesthetic` (--keep-columns), `vlm_caption_long`")
    assert "`caption_subject_short`" in extra


def test_the_order_of_a_prompts_file_names_the_run(tmp_path):
    """The first prompt also fills the plain vlm_caption; run.json writes the prompts' dict with sorted keys,
    so two orders of one file had one run id and their captions mixed in one config."""
    as_sorted, reversed_ = tmp_path / "a.yaml", tmp_path / "b.yaml"
    as_sorted.write_text("long: Describe it.\nshort: Name it.\n")
    reversed_.write_text("short: Name it.\nlong: Describe it.\n")
    first, second = (RunConfig(prompts_file=str(p)).run_settings() for p in (as_sorted, reversed_))
    assert "prompt_order" not in first  # the sorted order: run ids of earlier runs stay what they were
    assert second["prompt_order"] == ["short", "long"] and first != second
    assert store.run_id_for(first) != store.run_id_for(second)
    recorded = json.loads(json.dumps(second, sort_keys=True))  # as run.json keeps it
    assert [s.name for s in run_specs(recorded)] == ["short", "long"]
    card = render_dataset_card("me/data", [{**recorded, "run_id": "aaa", "rows": 1}])
    assert card.index("Prompt `short`") < card.index("Prompt `long`")


def test_counts_are_the_hubs_rows_and_the_runs_failed_keys_and_no_local_path_is_published(hub_stub, client, ckpt):  # noqa: F811
    """A trial dir and the full run's dir fail the same keys: counted once; a key one dir failed and another
    published is not a failure; flags are counted over the published rows."""
    Writer(ckpt).parts(3)  # keys 0-2 published
    client.push_pending(ckpt, RUN, 0)
    published = sorted(hub_stub_keys(hub_stub))
    for dir_id, created, failed in (("d1", "2026-01-02T00:00:00Z", {"k1": "decode", "k2": "load"}),
                                    ("d2", "2026-01-01T00:00:00Z", {"k1": "decode", published[0]: "generate"})):
        client.write_card({"run_id": RUN, "dir_id": dir_id, "created": created, "model": "/srv/alice/models/ft",
                           "prompt": "p"}, {"checkpoint_dir": {"failed_by_stage": {"decode": 99}}}, failed)
    files = hub_stub.repo_files(REPO)
    info = json.loads(files[f"runs/{RUN}.json"])
    assert info["failed_by_stage"] == {"decode": 1, "load": 1}  # k1 once; the published key is no failure
    assert info["rows"] == 3 and info["caption_flags"] == {}  # the test rows carry no flags
    assert info["created"] == "2026-01-01T00:00:00Z" and info["model"] == "local:ft"
    card = files["README.md"].decode()
    assert "alice" not in card and "Model: `local:ft`" in card and "decode: 1, load: 1" in card


def test_a_card_with_nothing_new_is_not_committed_again(hub_stub, client, ckpt, monkeypatch):  # noqa: F811
    """runs/{run}.json held the time of writing: every --push-only and every run end with nothing new made a
    commit (against the Hub's commit limit)."""
    from vlm_caption import hub_card

    Writer(ckpt).parts(2)
    client.push_pending(ckpt, RUN, 0)
    info = {"run_id": RUN, "dir_id": "d1", "created": "2026-01-01T00:00:00Z", "model": "m", "prompt": "p"}
    clock = iter(["2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"])
    monkeypatch.setattr(hub_card.time, "strftime", lambda fmt, t=None: next(clock))
    client.write_card(info, {}, {})
    commits = hub_stub.commits_applied
    client.write_card(info, {}, {})  # a second later, nothing new
    assert hub_stub.commits_applied == commits
    assert json.loads(hub_stub.repo_files(REPO)[f"runs/{RUN}.json"])["updated"] == "2026-01-01T00:00:01Z"
    client.write_card(info, {}, {"k9": "decode"})  # a new failure: a new card, a new time
    assert hub_stub.commits_applied == commits + 1
    assert json.loads(hub_stub.repo_files(REPO)[f"runs/{RUN}.json"])["updated"] == "2026-01-01T00:00:02Z"


def hub_stub_keys(stub) -> set[str]:
    import io

    import pyarrow.parquet as pq

    return {k for path, data in stub.repo_files(REPO).items() if path.endswith(".parquet")
            for k in pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist()}


def test_config_names_are_quoted_so_a_yaml_12_reader_sees_names_not_numbers():
    card = render_dataset_card("me/data", [{"run_id": "123e45678901", "rows": 1, "prompt": "p"},
                                           {"run_id": "012345678901", "rows": 1, "prompt": "p", "created": "1"}])
    header = card.split("---")[1]
    assert "- config_name: '012345678901'" in header and "- config_name: '123e45678901'" in header
    assert [c["config_name"] for c in card_yaml(card)["configs"]] == ["012345678901", "123e45678901"]


def test_what_the_hub_shows_of_a_model():
    from vlm_caption.config import public_model_name

    assert public_model_name("google/gemma-3-4b-it") == "google/gemma-3-4b-it"
    assert public_model_name("/srv/alice/models/ft") == "local:ft"
    assert public_model_name("google/gemma-3-27b-it", "dummy") == "dummy:google/gemma-3-27b-it"  # no model ran


def test_each_prompts_flags_are_counted_from_the_hubs_rows_onto_the_card(hub_stub, client, ckpt):  # noqa: F811
    """The card's flag line came from the plain caption_flags only, the first prompt's: it now has a line per
    prompt, counted from the published rows' caption_flags_NAME columns, in the prompts file's order."""
    from hub_parts import make_rows

    from vlm_caption.atomic import atomic_write_json
    from vlm_caption.rows import run_flag_columns
    from vlm_caption.schema import output_schema

    settings = {"run_id": RUN, "dir_id": "d1", "model": "tiny", "prompt": None,
                "prompts": {"long": "Describe.", "short": "Name it."}, "prompt_order": ["short", "long"]}
    ckpt.mkdir(parents=True)
    atomic_write_json(ckpt / store.RUN_JSON, settings)
    schema = output_schema([c for spec in run_specs(settings) for c in spec.output_columns()])
    writer = store.CheckpointStore(ckpt, 0, schema=schema)
    writer.run_id, writer.dir_id = RUN, "d1"
    flags = {"short": [["preamble"], [], []], "long": [["garbled"], ["garbled", "truncated"], []]}
    columns = run_flag_columns(settings)
    rows = [{**r, "caption_flags": flags["short"][i], **{columns[n]: flags[n][i] for n in flags}}
            for i, r in enumerate(make_rows(0, 3))]
    writer.write_part(rows)
    client.push_pending(ckpt, RUN, 0)
    client.write_card(settings, {}, {})
    files = hub_stub.repo_files(REPO)
    info = json.loads(files[f"runs/{RUN}.json"])
    assert info["caption_flags"] == {"preamble": 1}
    assert info["caption_flags_by_prompt"] == {"short": {"preamble": 1}, "long": {"truncated": 1, "garbled": 2}}
    card = files["README.md"].decode()
    assert ('Quality flags, captions per flag (README "Caption quality"), per prompt:\n'
            "  - `short`: preamble: 1\n  - `long`: truncated: 1, garbled: 2\n") in card


def test_a_json_run_shows_the_instruction_appended_to_its_prompt(monkeypatch):
    """The reader sees what the model was asked: the prompt, then the JSON instruction, fenced as the prompt is."""
    from vlm_caption import prompts

    one = {"run_id": "aaa", "rows": 1, "prompt": "Look.", "format": "json", "json_fields": ["subject", "mood"],
           "code_version": "0.9"}
    instruction = prompts.json_instruction(["subject", "mood"])
    fenced = f"```text\n{instruction}\n```"
    card = render_dataset_card("me/data", [one])
    assert card.index("```text\nLook.\n```") < card.index(
        f"- JSON instruction (version 1), appended to the prompt after a blank line:\n\n{fenced}\n")
    named = {**one, "prompt": None, "prompts": {"short": "Name it.", "long": "Describe it."}}
    card = render_dataset_card("me/data", [named])
    assert card.count(fenced) == 1 and card.index("Prompt `short`") < card.index(fenced)
    assert "appended to each prompt after a blank line" in card
    assert "JSON instruction" not in render_dataset_card("me/data", [{"run_id": "bbb", "rows": 1, "prompt": "p"}])
    monkeypatch.setattr(prompts, "JSON_INSTRUCTION_VERSION", 2)  # reworded since: only the version is recorded
    card = render_dataset_card("me/data", [one])
    assert instruction not in card
    assert "- JSON instruction (version 1), appended to the prompt after a blank line: the wording of" in card
    assert "code version 0.9" in card


def test_a_run_whose_prompt_predates_templates_does_not_break_the_card_nor_the_preview():
    """Before templates a prompt was sent verbatim: a single brace or chat markup in an older run's recorded prompt
    stopped every later card of its repo (a one-line error naming --prompt, at each push of any run)."""
    from vlm_caption.rows import run_caption_columns as caption_columns

    old = {"run_id": "aaa", "rows": 5, "created": "2025-01-01", "prompt_version": "custom",
           "prompt": 'Answer as {"style": "..."} <start_of_image>', "format": "json", "json_fields": ["style"]}
    card = render_dataset_card("me/data", [old, {"run_id": "bbb", "rows": 5, "created": "2026-01-01", "prompt": "p"}])
    assert 'Answer as {"style": "..."} <start_of_image>' in card and "`caption_style`" in card
    assert caption_columns(old) == ["caption_style"]


def test_the_first_card_of_a_run_warns_of_nothing(hub_stub, client, ckpt, caplog):  # noqa: F811
    """With no runs/{run_id}.json on the Hub yet, every first push warned `runs/None.json cannot be shown`."""
    import logging

    Writer(ckpt).parts(2)
    client.push_pending(ckpt, RUN, 0)
    with caplog.at_level(logging.WARNING):
        client.write_card({"run_id": RUN, "dir_id": "d1", "model": "m", "prompt": "p"}, {}, {})
    assert "cannot be shown" not in caplog.text


def test_the_cards_column_table_says_what_the_url_and_original_sizes_are(sample_data_dir):
    """The published url is the one img2dataset fetched (full_metadata.parquet's), percent-encoded where the
    source's held a space or an accent; the card called it ContraStyles' URL, which a join on it misses. The
    original sizes are the measured ones (no resizing), not img2dataset's report as the card said."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.download_source import img2dataset_input

    source = "http://127.0.0.1/Claude Monet/été.jpg"
    urls = pa.table({c: [source if c == "url" else "x"] for c in ("url", "caption", "original_key", "md5", "tags",
                                                                  "merged_tags")})
    assert img2dataset_input(urls).column("url")[0].as_py() == "http://127.0.0.1/Claude%20Monet/%C3%A9t%C3%A9.jpg"
    card = render_dataset_card("me/data", [{"run_id": "aaa", "rows": 5, "prompt": "p"}])
    rows = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| `")}
    assert "percent-encoded" in rows["url"]
    published = pq.read_table(sample_data_dir / "full_metadata.parquet")
    assert published["original_width"].equals(published["width"]) and "img2dataset" not in rows["original_width"]
    assert "`width` again" in rows["original_width"] and "`height` again" in rows["original_height"]
