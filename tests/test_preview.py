"""preview.py: cards, escaping of untrusted captions, thumbnails, and a real render in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlm_caption import store
from vlm_caption.errors import UsageError
from vlm_caption.preview import main as preview_main
from vlm_caption.preview import write_preview

# A caption that would run script in the page if it were not escaped; the marker shows whether it did.
HOSTILE = '<script>document.body.dataset.pwned = "1"</script><img src=x onerror="document.body.dataset.pwned=1">'


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cards, self.scripts, self.imgs, self.links = 0, 0, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article" and "card" in (a.get("class") or "").split():
            self.cards += 1
        elif tag == "script":
            self.scripts += 1
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])


def parse(html: str) -> PageParser:
    p = PageParser()
    p.feed(html)
    return p


@pytest.fixture(scope="module")
def checkpoint(sample_data_dir, tmp_path_factory) -> Path:
    """A checkpoint dir with 8 merged rows of sample keys; row 1 has a hostile caption and row 2 a javascript: url."""
    meta = pq.read_table(sample_data_dir / "full_metadata.parquet").slice(0, 8).to_pylist()
    rows = [{"key": m["key"], "original_key": m["original_key"], "url": m["url"], "original_caption": m["caption"],
             "vlm_caption": f"caption {i} & \"quoted\"", "width": m["width"], "height": m["height"],
             "original_width": m["original_width"], "original_height": m["original_height"], "sha256": m["sha256"],
             "md5": m["md5"], "tags": m["tags"], "merged_tags": m["merged_tags"], "caption_model": "tiny",
             "caption_finish": "stop" if i % 2 else "length", "caption_tokens": 5} for i, m in enumerate(meta)]
    rows[1]["vlm_caption"] = HOSTILE
    rows[2]["url"] = "javascript:alert(1)"
    ckpt = tmp_path_factory.mktemp("preview") / "ckpt"
    ckpt.mkdir()
    # Two row groups: the reader must stop after n rows, whatever the file's layout.
    pq.write_table(pa.Table.from_pylist(rows, schema=store.OUTPUT_SCHEMA), ckpt / store.MERGED, row_group_size=4)
    return ckpt


def test_cards_thumbnails_and_escaping(checkpoint, sample_data_dir, tmp_path):
    out = tmp_path / "site" / "preview.html"
    assert write_preview(checkpoint, out, data_dir=sample_data_dir, n=5) == 5
    html = out.read_text()
    page = parse(html)
    assert page.cards == 5 and page.scripts == 1
    assert "<script>document" not in html  # the hostile <img> would show up in page.imgs below
    assert "&lt;script&gt;document.body.dataset.pwned" in html
    assert "caption 0 &amp; &quot;quoted&quot;" in html
    assert "5 of 8 captioned rows" in html
    # Local thumbnails, by paths relative to the HTML file.
    assert len(page.imgs) == 5
    for src in page.imgs:
        assert not src.startswith(("/", "http")) and (out.parent / unquote(src)).resolve().is_file(), src


def test_urls_without_data_dir_and_unsafe_schemes_dropped(checkpoint, tmp_path):
    out = tmp_path / "preview.html"
    assert write_preview(checkpoint, out, n=200) == 8
    page = parse(out.read_text())
    assert page.cards == 8
    assert len(page.imgs) == 7 and all(src.startswith("http://") for src in page.imgs)  # row 2: no image
    assert not any("javascript" in href for href in page.links)


@pytest.fixture()
def failed_run(checkpoint, sample_data_dir, tmp_path) -> Path:
    """The checkpoint plus two failed images (one captioned later: not shown), and a random-weight model."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    merged_key = pq.read_table(ckpt / store.MERGED)["key"][0].as_py()
    rows = [{"key": "000000900", "original_key": "9", "url": "http://127.0.0.1/broken.jpg", "stage": "decode",
             "error": "OSError: image file is truncated (40 bytes not processed)\nsecond line of detail"},
            {"key": merged_key, "original_key": "1", "url": "http://127.0.0.1/a.jpg", "stage": "load",
             "error": "file missing"},
            {"key": "000000901", "original_key": "7", "url": "javascript:alert(1)", "stage": "generate",
             "error": HOSTILE}]
    (ckpt / store.FAILURES_DIR).mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=store.FAILURE_SCHEMA),
                   ckpt / store.FAILURES_DIR / "failures-w000-000000.parquet")
    model = tmp_path / "model"
    model.mkdir()
    (ckpt / store.RUN_JSON).write_text(json.dumps({"run_id": "abc", "model": str(model)}))
    return ckpt


def test_failed_images_are_cards_with_stage_and_reason(failed_run, tmp_path):
    out = tmp_path / "preview.html"
    assert write_preview(failed_run, out, n=3) == 3
    html = out.read_text()
    page = parse(html)
    assert page.cards == 3 + 2  # the failure that was captioned later is not shown
    assert html.count('data-finish="failed"') == 2
    assert "failed: decode" in html and "image file is truncated" in html and "failed: generate" in html
    assert "2 images not captioned (failed)" in html
    assert "&lt;script&gt;document.body" in html and "<script>document" not in html  # reasons are escaped
    assert not any("javascript" in href for href in page.links)
    # Finish-reason filter and sort controls, and every caption card says its finish reason.
    for value in ('value="stop"', 'value="length"', 'value="failed"', 'id="order"'):
        assert value in html
    assert html.count('data-finish="stop"') + html.count('data-finish="length"') == 3
    assert 'id="noise"' not in html  # a model dir without the marker: no banner


def test_random_weights_banner(failed_run, tmp_path):
    from vlm_caption.preview import RANDOM_WEIGHTS_MARKER

    out = tmp_path / "preview.html"
    write_preview(failed_run, out, n=2, random_weights=True)  # what the demo passes
    assert 'id="noise"' in out.read_text() and "RANDOM WEIGHTS" in out.read_text()
    model = Path(json.loads((failed_run / store.RUN_JSON).read_text())["model"])
    (model / RANDOM_WEIGHTS_MARKER).write_text("random")  # what the demo writes next to its tiny model
    write_preview(failed_run, out, n=2)
    assert 'id="noise"' in out.read_text() and "(random weights: noise)" in out.read_text()


def test_cli_from_another_directory(failed_run, tmp_path):
    """`python -m vlm_caption.preview` with the package importable (setup.sh puts the repo on the venv's path)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "vlm_caption.preview", str(failed_run), "--out", "p.html",
                           "--n", "1", "--random-weights"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "wrote p.html (1 caption card)"
    assert 'id="noise"' in (elsewhere / "p.html").read_text()


def test_missing_merged_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="all_captions.parquet"):
        preview_main([str(tmp_path), "--out", str(tmp_path / "p.html")])
    pq.write_table(pa.table({"image": ["a.jpg"]}), tmp_path / "all_captions.parquet")  # another tool's: KeyError
    with pytest.raises(UsageError, match="all_captions.parquet is no captioning run's .it has no key column: image"):
        preview_main([str(tmp_path), "--out", str(tmp_path / "p.html")])


def test_out_that_is_a_directory_is_a_usage_error(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--out .* is a directory; give a file name"):
        preview_main([str(checkpoint), "--out", str(tmp_path)])


def test_out_naming_a_file_of_the_run_is_refused_not_replaced_by_the_page(checkpoint, tmp_path):
    """--out CKPT/run.json (a slip of the tab key) wrote the HTML over the run's settings."""
    checkpoint = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (checkpoint / store.RUN_JSON).write_text(json.dumps({"run_id": "0123456789ab", "model": "tiny"}))
    for name in (store.RUN_JSON, store.MERGED):
        before = (checkpoint / name).read_bytes()
        with pytest.raises(UsageError, match="exists and is not an .html file"):
            preview_main([str(checkpoint), "--out", str(checkpoint / name)])
        assert (checkpoint / name).read_bytes() == before


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (CI installs it)")
def test_renders_in_headless_chromium(checkpoint, sample_data_dir, tmp_path):
    out = tmp_path / "preview.html"
    write_preview(checkpoint, out, data_dir=sample_data_dir, n=6)
    url = out.resolve().as_uri()
    flags = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    png = tmp_path / "preview.png"
    subprocess.run([*flags, f"--screenshot={png}", url], capture_output=True, timeout=90, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=90, check=True).stdout
    assert parse(dom).cards == 6
    assert "6 of 6 cards shown" in dom  # the page's own script ran (the CSP allows it by hash)
    assert 'data-finish="stop"' in dom
    assert "pwned" not in dom.split("<main>")[0]  # the hostile caption ran nothing (it would mark <body>)


def test_each_prompts_caption_and_the_json_fields_are_shown():
    from vlm_caption.preview import render_card

    row = {"key": "000000001", "vlm_caption": "short one", "vlm_caption_short": "short one",
           "vlm_caption_long": "a long one", "caption_subject_long": "a bridge", "caption_finish": "stop"}
    html = render_card(row, None)
    assert html.count('<p class="vlm">') == 3  # the plain column repeats the first prompt's: not shown twice
    assert '<span class="label">short:</span> <bdi>short one</bdi>' in html and \
        '<span class="label">long:</span> <bdi>a long one</bdi>' in html
    assert '<span class="label">caption_subject_long:</span> <bdi>a bridge</bdi>' in html
    plain = render_card({"key": "000000002", "vlm_caption": "just one", "caption_finish": "stop"}, None)
    assert '<p class="vlm"><bdi>just one</bdi></p>' in plain
    # control characters (random weights emit them) are shown as their control pictures, not left invisible
    odd = render_card({"key": "000000003", "vlm_caption": "a\x00b\x1bc\x7fd\te", "caption_finish": "stop"}, None)
    assert '<p class="vlm"><bdi>a\u2400b\u241bc\u2421d\te</bdi></p>' in odd and "\x00" not in odd and "\x1b" not in odd


# Two prompts flagged differently; the plain caption_flags repeat the first's. Sorted by the flags of all prompts:
# B, C (2 each, key order), A, D; by the union B's 2 are 1; by the plain column only B has any.
TWO_PROMPTS = {"A": ([], ["garbled"]), "B": (["preamble"], ["preamble"]), "C": ([], ["garbled", "truncated"]),
               "D": ([], [])}


@pytest.fixture(scope="module")
def two_prompts(tmp_path_factory) -> Path:
    from vlm_caption.prompt_plan import run_specs
    from vlm_caption.rows import run_flag_columns
    from vlm_caption.schema import output_schema

    settings = {"run_id": "abc", "model": "m", "prompt": None, "prompts": {"short": "Name it.", "long": "Say."},
                "prompt_order": ["short", "long"]}
    columns = run_flag_columns(settings)
    # C's long caption hit --max-tokens and B's long one took two attempts (the plain columns are short's).
    rows = [{"key": f"00000000{i}", "url": f"http://127.0.0.1/{name}.jpg", "vlm_caption": f"caption {name}",
             "caption_finish": "stop", "caption_tokens": 3, "caption_flags": short, "caption_attempts": 1,
             columns["short"]: short, columns["long"]: long, "caption_finish_short": "stop",
             "caption_finish_long": "length" if name == "C" else "stop", "caption_attempts_short": 1,
             "caption_attempts_long": 2 if name == "B" else 1}
            for i, (name, (short, long)) in enumerate(TWO_PROMPTS.items())]
    ckpt = tmp_path_factory.mktemp("two_prompts") / "ckpt"
    ckpt.mkdir()
    schema = output_schema([c for spec in run_specs(settings) for c in spec.output_columns()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), ckpt / store.MERGED)
    (ckpt / store.RUN_JSON).write_text(json.dumps(settings))
    return ckpt


def test_each_prompts_flags_are_badges_named_by_prompt_and_all_count(two_prompts, tmp_path):
    """Badges, data-flags and the counts line showed the first prompt's flags only."""
    from vlm_caption.preview import render_card

    out = tmp_path / "preview.html"
    write_preview(two_prompts, out)
    cards = {c.split('data-key="')[1][:9]: c for c in out.read_text().split("<article")[1:]}
    a, b, c, d = (cards[f"00000000{i}"] for i in range(4))
    assert '<span class="flag">long: garbled</span>' in a and "short:" not in a
    assert '<span class="flag">short: preamble</span><span class="flag">long: preamble</span>' in b
    assert 'data-flags="preamble" data-flag-count="2"' in b  # the filter: the union; the sort: all
    assert 'data-flags="truncated garbled" data-flag-count="2"' in c  # quality.FLAGS order
    assert 'data-flags="" data-flag-count="0"' in d and 'class="flag"' not in d
    html = out.read_text()
    assert ("quality flags of those shown, prompt short: preamble: 1 · "
            "quality flags of those shown, prompt long: truncated: 1, preamble: 1, garbled: 2") in html
    plain = render_card({"key": "1", "caption_flags": ["preamble"], "caption_finish": "stop"}, None)
    assert 'data-flags="preamble" data-key="1"' in plain and '<span class="flag">preamble</span>' in plain


def test_each_prompts_finish_and_attempts_show_and_count(two_prompts, tmp_path):
    """A second prompt's caption cut at --max-tokens or tried twice showed nowhere but its flag: the badge, the
    finish filter, the attempts and the counts line read the plain columns, the first prompt's."""
    out = tmp_path / "preview.html"
    write_preview(two_prompts, out)
    cards = {c.split('data-key="')[1][:9]: c for c in out.read_text().split("<article")[1:]}
    a, b, c = (cards[f"00000000{i}"] for i in range(3))
    assert 'data-finish="length"' in c and ">short: stop, long: length</span>" in c
    assert 'data-finish="stop"' in a and '"badge finish-stop">stop</span>' in a and "attempts" not in a
    assert "<span>long: 2 attempts</span>" in b
    assert "of those shown: 3 stopped, 1 hit --max-tokens (short 0, long 1), 0 empty" in out.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (CI installs it)")
def test_flag_filter_and_sort_count_every_prompt_in_chromium(two_prompts, tmp_path):
    out = tmp_path / "preview.html"
    write_preview(two_prompts, out)
    # The page as a reader leaves it: filtered by `garbled`, most flags first (the script and its hash unchanged).
    html = out.read_text().replace('<option value="garbled">', '<option value="garbled" selected>')
    out.write_text(html.replace('<option value="flags">', '<option value="flags" selected>'))
    flags = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", out.resolve().as_uri()], capture_output=True, text=True, timeout=90,
                         check=True).stdout
    assert "2 of 4 cards shown" in dom  # A and C: long's garbled
    order = [c.split('data-key="')[1][:9] for c in dom.split("<article")[1:]]
    assert order == ["000000001", "000000002", "000000000", "000000003"]  # B, C, A, D


def test_every_json_field_of_the_run_is_shown_whatever_its_name(sample_data_dir, tmp_path):
    """The JSON field columns were guessed by name: a field such as finish_type, model_era or tokens_of_text looked
    like the run's own caption_finish_... / caption_model / caption_tokens_... columns and was left off the page."""
    from dummy_runs import dummy_args

    from batched_image_inference import main

    fields = ["subject", "finish_type", "model_era", "tokens_of_text"]
    ckpt, out = tmp_path / "ckpt", tmp_path / "preview.html"
    assert main(dummy_args(sample_data_dir, ckpt, "--format", "json", "--json-fields", ",".join(fields),
                           "--max-images", "2")) == 0
    write_preview(ckpt, out)
    card = out.read_text().split("<article")[1]
    assert [f for f in fields if f'<span class="label">caption_{f}:</span> ' not in card] == []
    assert "caption_finish:" not in card and "caption_model:" not in card  # the run's own columns stay meta
