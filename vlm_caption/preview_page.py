"""The fixed parts of the preview page (preview.py): its CSS, its script and its controls.

The script's sha256 is the page's Content-Security-Policy: any change to it is picked up there, no hash to edit.
"""
from __future__ import annotations

from .quality import FLAGS

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f5;color:#18181b}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:10px 16px;z-index:1}
h1{font-size:18px;margin:0 0 4px}
.counts{color:#52525b;margin:0 0 8px}
#filter{width:100%;max-width:480px;padding:6px 8px;font-size:14px}
select{padding:5px;font-size:14px;margin-left:8px}
.noise{background:#fef2f2;border:2px solid #b91c1c;color:#7f1d1d;padding:8px 12px;margin:0 0 8px;font-weight:600}
.card.failed{border-color:#b91c1c;background:#fff7f7}
.error{margin:0;color:#7f1d1d;font-size:12px;white-space:pre-wrap;word-break:break-word}
#shown{margin-left:8px;color:#52525b}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px;padding:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;flex-direction:column;gap:6px}
.card[hidden]{display:none}
.thumb{display:block;width:100%;height:180px;object-fit:contain;background:#e4e4e7}
.noimg{height:180px;display:flex;align-items:center;justify-content:center;background:#e4e4e7;color:#71717a}
.vlm{margin:0;white-space:pre-wrap;word-break:break-word}
.orig,.tags{margin:0;color:#52525b;font-size:12px;word-break:break-word}
.label{font-weight:600}
.meta{display:flex;flex-wrap:wrap;gap:4px 8px;align-items:center;font-size:12px;color:#52525b}
.badge{border-radius:4px;padding:1px 6px;font-weight:600;color:#fff}
.finish-stop{background:#15803d}.finish-length{background:#b45309}.finish-other{background:#71717a}
.finish-failed{background:#b91c1c}
.flag{border-radius:4px;padding:1px 5px;font-size:11px;background:#fde68a;color:#78350f}
code{font-size:12px}
.cut{color:#71717a;font-style:italic}
"""

# Cards are hidden with the `hidden` attribute; the count line says how many match. Sorting moves the
# cards inside <main>; each card carries data-finish (stop, length, failed, ...), data-flags (space-separated
# quality flags, "" for none; with several prompts those of any prompt), data-flag-count (several prompts only:
# the flags of all prompts, which the union undercounts), data-tokens (with several prompts the most of any
# prompt's) and data-key.
JS = """
const box = document.getElementById("filter");
const finish = document.getElementById("finish");
const flag = document.getElementById("flag");
const order = document.getElementById("order");
const main = document.querySelector("main");
const cards = Array.from(document.querySelectorAll("article.card"));
const shown = document.getElementById("shown");
const rank = {stop: 0, length: 1, failed: 3};
function update() {
  const q = box.value.trim().toLowerCase();
  const f = finish.value;
  const g = flag.value;
  let n = 0;
  for (const card of cards) {
    const flags = (card.dataset.flags || "").split(" ").filter(Boolean);
    const flagHit = !g || (g === "none" ? flags.length === 0 && card.dataset.finish !== "failed"
                                        : g === "any" ? flags.length > 0 : flags.includes(g));
    const hit = (!q || card.textContent.toLowerCase().includes(q)) && (!f || card.dataset.finish === f) && flagHit;
    card.hidden = !hit;
    if (hit) n++;
  }
  shown.textContent = n + " of " + cards.length + " cards shown";
}
function sort() {
  const by = order.value;
  const sorted = cards.slice();
  if (by === "finish") {
    sorted.sort((a, b) => ((rank[a.dataset.finish] ?? 2) - (rank[b.dataset.finish] ?? 2)));
  } else if (by === "flags") {
    const count = (c) => Number(c.dataset.flagCount || (c.dataset.flags || "").split(" ").filter(Boolean).length);
    sorted.sort((a, b) => count(b) - count(a));
  } else if (by === "tokens") {
    sorted.sort((a, b) => Number(b.dataset.tokens || -1) - Number(a.dataset.tokens || -1));
  }
  for (const card of sorted) main.appendChild(card);
}
box.addEventListener("input", update);
finish.addEventListener("change", update);
flag.addEventListener("change", update);
order.addEventListener("change", sort);
sort();
update();
"""


def controls() -> str:
    flag_options = "".join(f'<option value="{f}">{f}</option>' for f in FLAGS)
    return _CONTROLS.replace("<!--flags-->", flag_options)


_CONTROLS = (
    '<input id="filter" type="search" placeholder="filter cards by any text (caption, tags, key, reason)" '
    'aria-label="filter">'
    '<select id="finish" aria-label="finish reason"><option value="">every finish reason</option>'
    '<option value="stop">stop (the model ended)</option><option value="length">length (cut at --max-tokens)</option>'
    '<option value="failed">failed (not captioned)</option></select>'
    '<select id="flag" aria-label="quality flag"><option value="">every caption, flagged or not</option>'
    '<option value="none">no quality flag</option><option value="any">any quality flag</option><!--flags-->'
    '</select>'
    '<select id="order" aria-label="sort"><option value="key">key order</option>'
    '<option value="finish">by finish reason</option><option value="flags">most quality flags first</option>'
    '<option value="tokens">most tokens first</option></select>'
    '<span id="shown"></span>'
)
