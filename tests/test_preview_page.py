"""preview.py's page as a reader sees it: layout in headless Chromium (measured by a script the test adds)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from vlm_caption.preview import render_page

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]
# Marks <body> with the keys of cards whose meta line (badge, key, tokens, attempts, flags) runs past the card.
MEASURE = """<script>
const over = Array.from(document.querySelectorAll("article.card")).filter(card => {
  const right = card.getBoundingClientRect().right;
  return Array.from(card.querySelectorAll(".meta > *")).some(el => el.getBoundingClientRect().right > right + 0.5);
}).map(card => card.dataset.key);
document.body.dataset.overflow = over.join(" ") || "none";
</script>"""


def dump_dom(html: str, tmp_path) -> str:
    page = tmp_path / "page.html"
    # The test's own script is not in the page's Content-Security-Policy: the policy is dropped for it.
    page.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html).replace(
        "</body>", MEASURE + "</body>"))
    flags = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=90, check=True).stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (CI installs it)")
def test_a_cards_meta_line_wraps_inside_the_card(tmp_path):
    """A caption with several flags (each prompt's, named) and attempts: the badges ran past the card's right edge,
    under the next card, where the last flags could not be read."""
    flagged = {"key": "000000004", "vlm_caption": "a caption", "caption_finish": "stop", "caption_tokens": 23,
               "caption_flags": ["repetition", "truncated", "garbled"], "caption_attempts": 2}
    plain = {"key": "000000005", "vlm_caption": "a caption", "caption_finish": "stop", "caption_tokens": 11,
             "caption_flags": [], "caption_attempts": 1}
    html = render_page([flagged, plain], [None, None], 2, {}, "Captions by m")
    dom = dump_dom(html, tmp_path)
    assert 'data-overflow="none"' in dom, re.search(r'data-overflow="[^"]*"', dom)


def test_each_prompts_tokens_show_and_the_sort_counts_the_most(tmp_path):
    """A --prompts-file run's card showed the first prompt's tokens only, unnamed (the plain caption_tokens), and
    "most tokens first" sorted by them: a second prompt's caption of 40 tokens sorted as one of 3."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption import store
    from vlm_caption.preview import write_preview
    from vlm_caption.prompt_plan import run_specs
    from vlm_caption.schema import output_schema

    settings = {"run_id": "abc", "model": "m", "prompt": None, "prompts": {"short": "Name it.", "long": "Say."},
                "prompt_order": ["short", "long"]}
    rows = [{"key": f"00000000{i}", "vlm_caption": "c", "caption_finish": "stop", "caption_tokens": short,
             "caption_tokens_short": short, "caption_tokens_long": long, "caption_finish_short": "stop",
             "caption_finish_long": "stop"} for i, (short, long) in enumerate([(5, 6), (3, 40)])]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    schema = output_schema([c for spec in run_specs(settings) for c in spec.output_columns()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), ckpt / store.MERGED)
    (ckpt / store.RUN_JSON).write_text(json.dumps(settings))
    write_preview(ckpt, tmp_path / "preview.html")
    first, second = (c for c in (tmp_path / "preview.html").read_text().split("<article")[1:])
    assert "<span>short: 5 tokens</span><span>long: 6 tokens</span>" in first and 'data-tokens="6"' in first
    assert "<span>short: 3 tokens</span><span>long: 40 tokens</span>" in second and 'data-tokens="40"' in second


def test_a_huge_or_right_to_left_value_is_cut_and_isolated():
    """A 100 KB caption (a loop at a large --max-tokens) and a 100 KB original caption were shown whole: 200 such
    cards, a page of tens of MB, each card many screens tall. An Arabic caption took the card's left-to-right
    direction (its trailing punctuation and emoji shown on the wrong side), an unclosed U+202E reordered the text
    after it."""
    from vlm_caption.preview import SHOWN_CHARS, render_card

    row = {"key": "000000001", "vlm_caption": "loop " * 20_000, "original_caption": "x" * 100_000,
           "tags": "\u202eevil", "caption_finish": "length"}
    card = render_card(row, None)
    assert len(card) < 3 * SHOWN_CHARS + 2000
    assert f"({100_000 - SHOWN_CHARS:,} more characters" in card and card.count("more characters") == 2
    assert "<bdi>\u202eevil</bdi>" in card
    arabic = render_card({"key": "000000002", "vlm_caption": "لوحة زيتية 🎨!", "caption_finish": "stop"}, None)
    assert '<p class="vlm"><bdi>لوحة زيتية 🎨!</bdi></p>' in arabic and "more characters" not in arabic
