"""A static HTML contact sheet of a run's first captions, to look at them before trusting a long job.

    python -m vlm_caption.preview CHECKPOINT_DIR --out preview.html [--data-dir DIR] [--n 200] [--random-weights]

One self-contained file: inline CSS and a few lines of inline JS (a filter box, a finish-reason filter, a
quality-flag filter and a sort order; preview_page.py), no network. A card per row of all_captions.parquet:
thumbnail, generated caption, original caption, tags, finish badge (stop / length), quality flags (rows.py,
quality.py; with several prompts each prompt's, named), key; then a card per failed image still without a caption
(failures/: its stage and reason). When the captions come from random weights (the demo's tiny model:
its model dir holds RANDOM_WEIGHTS_MARKER, found also after the dir moved: random_weights.py; or
--random-weights), a banner at the top says they are noise.
Thumbnails point at the local image file (a path relative to the HTML file) when the data dir is known,
else at the row's url. Captions come from a model and from the web, so every value is HTML-escaped, and a
Content-Security-Policy lets only this file's own script run, as a second wall.
"""
from __future__ import annotations

import base64
import hashlib
import html
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote, urlsplit

from . import cli
from .cli import plural

# outside the venv, or Ctrl-C while importing: one line, no traceback
with cli.script_imports(as_script=__name__ == "__main__", prog="python -m vlm_caption.preview"):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from . import dataset, store
    from .atomic import atomic_write_bytes
    from .config import check_output_file, check_utf8_names
    from .errors import UsageError
    from .preview_page import CSS, JS, controls
    from .random_weights import NOISE_BANNER, RANDOM_WEIGHTS_MARKER, is_random_weights
    from .rows import (FLAGS_COLUMN, count_flags, describe_counts, guessed_caption_column, ordered_counts,
                       run_caption_columns, run_prompt_columns)

log = logging.getLogger(__name__)
DEFAULT_ROWS = 200
COLUMNS = ["key", "url", "vlm_caption", "original_caption", "tags", "caption_finish", "caption_tokens",
           "caption_flags", "caption_attempts"]
# A run of one prompt: its flags are the plain column's, shown unlabelled (else: prompt name -> its column).
_ONE_PROMPT = {"": FLAGS_COLUMN}
# Per prompt of a --prompts-file run, besides its flags: where a card's finish, attempts and tokens come from.
_FINISH, _ATTEMPTS, _TOKENS = "caption_finish", "caption_attempts", "caption_tokens"


# ---------------------------------------------------------------- reading

def read_first_rows(pf: pq.ParquetFile, n: int, also: Sequence[str] = ()) -> tuple[list[dict], int]:
    """(the first n rows, rows in the file): streams batches so a 400K-row file is never loaded whole. `also`:
    further columns to read where the file has them (each prompt's flags and captions)."""
    rows: list[dict] = []
    names = pf.schema_arrow.names
    # Also each --prompts-file prompt's caption (vlm_caption_NAME) and the --format json fields (caption_FIELD...).
    wanted = [*(c for c in COLUMNS if c in names), *(c for c in names if guessed_caption_column(c)),
              *(c for c in also if c in names)]
    for batch in pf.iter_batches(batch_size=min(n, 1024), columns=wanted):
        rows.extend(batch.to_pylist()[: n - len(rows)])
        if len(rows) >= n:
            break
    return rows, pf.metadata.num_rows


def local_images(data_dir: Path, rows: list[dict]) -> tuple[dict[str, Path], int]:
    """(key -> image file for the rows' keys found in the data dir's metadata, how many of those keys hold another
    image there). Every data dir names its keys 000000000, 000000001, ...: a row's file is only used when its
    sha256 is the row's (another data dir's image is no thumbnail of this caption)."""
    wanted_sha = {str(r["key"]): r.get("sha256") for r in rows}
    wanted = pa.array(sorted(wanted_sha), pa.string())
    found: dict[str, Path] = {}
    other: set[str] = set()
    for path, shard in dataset.metadata_files(data_dir):
        pf = dataset.open_metadata(path)
        columns = [c for c in ("key", "file_name", "sha256") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=8192, columns=columns):
            hits = batch.filter(pc.is_in(pc.cast(batch.column("key"), pa.string()), value_set=wanted))
            for row in hits.to_pylist():
                key = str(row["key"])
                if key in found:
                    continue
                if row.get("sha256") and wanted_sha[key] and row["sha256"] != wanted_sha[key]:
                    other.add(key)
                    continue
                image = dataset.resolve_image_path(data_dir, key, row.get("file_name"), shard)
                if image is not None and image.is_file():
                    found[key] = image
                    other.discard(key)
            if len(found) == len(wanted):
                return found, len(other)
    return found, len(other)


def check_data_dir(data_dir: Path, shown: int, found: int, other: int) -> None:
    """A --data-dir whose images under the rows' keys are others (another run's data): refused when none is the
    run's, warned about when some are (those cards show the url's image)."""
    if not other:
        return
    what = f"{other} of the {shown} rows shown hold another image (sha256) under their key in --data-dir {data_dir}"
    if not found:
        raise UsageError(f"{what}: it is not the data dir this run captioned; give that one (or no --data-dir: "
                         "thumbnails from the urls)")
    log.warning("%s: their cards show the image of their url instead", what)


def read_failures(checkpoint_dir: Path, merged: pq.ParquetFile, n: int) -> tuple[list[dict], int]:
    """(the first n failure records, by key, of images no part holds; how many there are), read only.

    Unusable failure files are skipped here with a warning (the next captioning run quarantines them).
    """
    failed = store.failure_records(checkpoint_dir, store.FAILURE_SCHEMA.names, quarantine_bad=False)
    if not failed:
        return [], 0
    captioned = set(merged.read(columns=["key"]).column("key").to_pylist())
    keys = sorted(k for k in failed if k not in captioned)
    return [failed[k] for k in keys[:n]], len(keys)


def read_run_summary(checkpoint_dir: Path) -> dict:
    """run_summary.json, or {}: the preview still works without its counts. A broken one is warned about and left
    in place (a preview changes nothing in the dir; the next run sets it aside)."""
    from .endings import read_summary

    return read_summary(checkpoint_dir, set_aside=False)


# ---------------------------------------------------------------- rendering

def safe_url(url: str | None) -> str | None:
    """Only http(s) urls become links: a `javascript:` url from the data must never be clickable."""
    if not url:
        return None
    return url if urlsplit(url).scheme.lower() in ("http", "https") else None


def relative_src(image: Path, out_dir: Path) -> str | None:
    """A relative, percent-quoted path from the HTML file to the image, so the folder can move as a whole."""
    try:
        rel = os.path.relpath(image.resolve(), out_dir.resolve())
    except ValueError:  # another drive on Windows: no relative path exists
        return None
    return quote(Path(rel).as_posix())


# C0 control characters (a random-weight model emits them; so may a scraped title) are invisible or invalid in
# HTML: shown as their Unicode control pictures (U+2400 + code, DEL U+2421) so that a reviewer sees them.
_CONTROL_PICTURES = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\t\n\r"}, 0x7F: 0x2421}


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True).translate(_CONTROL_PICTURES)


# A longer value (a generation loop, a scraped wall of text) is cut in its card: 200 of them made a page of tens of MB.
SHOWN_CHARS = 3000


def _text(value) -> str:
    """A value as shown: in its own text direction (Arabic reads right to left, and cannot reorder the card), cut."""
    text = "" if value is None else str(value)
    cut = len(text) - SHOWN_CHARS
    note = (f'<span class="cut"> … ({cut:,} more characters; the whole value is in the parquet)</span>'
            if cut > 0 else "")
    return f"<bdi>{_e(text[:SHOWN_CHARS])}</bdi>{note}"


def _thumb(key: str, src: str | None) -> str:
    return (f'<a href="{_e(src)}" rel="noopener noreferrer"><img class="thumb" src="{_e(src)}" '
            f'alt="image {_e(key)}" loading="lazy"></a>') if src else '<div class="noimg">no image</div>'


def _per_prompt(row: dict, columns: Mapping[str, str] | None, base: str) -> dict[str, Any]:
    """Prompt name -> the row's value of its copy of `base` (`columns`: prompt name -> that column, for a
    --prompts-file run); {"": the plain column's} for a run of one prompt."""
    return {name: row.get(col) for name, col in columns.items()} if columns else {"": row.get(base)}


def render_card(row: dict, src: str | None, flag_columns: Mapping[str, str] | None = None,
                captions: Sequence[str] | None = None, finish_columns: Mapping[str, str] | None = None,
                attempts_columns: Mapping[str, str] | None = None,
                tokens_columns: Mapping[str, str] | None = None) -> str:
    """`flag_columns` (`finish_columns`, `attempts_columns`, `tokens_columns`): prompt name -> its flags (finish,
    attempts, tokens) column (rows.run_prompt_columns) for a --prompts-file run, whose plain columns are only the
    first prompt's; None for a run of one prompt. `captions`: run_caption_columns."""
    finishes = {name: f or "?" for name, f in _per_prompt(row, finish_columns, _FINISH).items()}
    # The filter and the badge's colour: a caption of any prompt cut at --max-tokens makes the card a "length".
    finish = "length" if "length" in finishes.values() else next(iter(finishes.values()))
    shown = finish if len(set(finishes.values())) == 1 else ", ".join(f"{n}: {f}" for n, f in finishes.items())
    badge = f"finish-{finish}" if finish in ("stop", "length") else "finish-other"
    by_tokens = _per_prompt(row, tokens_columns, _TOKENS)
    # The sort: the most of any prompt's (a --prompts-file run's plain caption_tokens are the first prompt's only).
    tokens = max((t for t in by_tokens.values() if t is not None), default=None)
    token_spans = "".join(f"<span>{_e(f'{name}: ' if name else '')}{_e(n)} tokens</span>"
                          for name, n in by_tokens.items() if n is not None or not name)
    by_prompt = {name: [str(f) for f in row.get(col) or []] for name, col in (flag_columns or _ONE_PROMPT).items()}
    counts = ordered_counts(Counter(f for fs in by_prompt.values() for f in fs))
    flags = list(counts)  # the filter: flagged in any prompt (FLAGS order, as one prompt's list is)
    badges = "".join(f'<span class="flag">{_e(f"{name}: " if name else "")}{_e(f)}</span>'
                     for name, fs in by_prompt.items() for f in fs)
    count = f' data-flag-count="{sum(counts.values())}"' if flag_columns else ""  # the sort: every prompt's
    attempts = "".join(f"<span>{_e(f'{name}: ' if name else '')}{_e(n)} attempts</span>"
                       for name, n in _per_prompt(row, attempts_columns, _ATTEMPTS).items() if (n or 1) > 1)
    return (
        f'<article class="card" data-finish="{_e(finish)}" data-tokens="{_e(tokens if tokens is not None else "")}" '
        f'data-flags="{_e(" ".join(flags))}"{count} data-key="{_e(row["key"])}">'
        f"{_thumb(row['key'], src)}"
        f'<div class="meta"><span class="badge {badge}">{_e(shown)}</span><code class="key">{_e(row["key"])}</code>'
        f'{token_spans}{attempts}{badges}</div>'
        f"{_captions(row, captions)}"
        f'<p class="orig"><span class="label">original:</span> {_text(row.get("original_caption"))}</p>'
        f'<p class="tags"><span class="label">tags:</span> {_text(row.get("tags"))}</p>'
        "</article>"
    )


def _captions(row: dict, columns: Sequence[str] | None = None) -> str:
    """The caption, or each --prompts-file prompt's under its name (the plain one repeats the first), then the
    --format json fields (`columns`, else those guessed by name)."""
    named = {k: row.get(k) for k in columns} if columns is not None else \
        {k: v for k, v in row.items() if guessed_caption_column(k)}
    if not any(k.startswith("vlm_caption_") for k in named):
        named = {"": row.get("vlm_caption"), **named}
    html = []
    for name, text in named.items():
        label = f'<span class="label">{_e(name.removeprefix("vlm_caption_"))}:</span> ' if name else ""
        if text is not None or not name:
            html.append(f'<p class="vlm">{label}{_text(text)}</p>')
    return "".join(html)


def render_failure_card(row: dict) -> str:
    """A failed image: its stage (load / decode / generate) and reason, and a link to its url."""
    error = (row.get("error") or "").strip()
    first = error.splitlines()[0] if error else "no reason recorded"
    more = (f'<details><summary>full reason</summary><p class="error">{_text(error)}</p></details>'
            if error and error != first else "")
    url = safe_url(row.get("url"))
    link = f'<a href="{_e(url)}" rel="noopener noreferrer">source url</a>' if url else ""
    return (
        f'<article class="card failed" data-finish="failed" data-tokens="" data-flags="" data-key="{_e(row["key"])}">'
        '<div class="noimg">not captioned</div>'
        f'<div class="meta"><span class="badge finish-failed">failed: {_e(row.get("stage") or "?")}</span>'
        f'<code class="key">{_e(row["key"])}</code>{link}</div>'
        f'<p class="error"><span class="label">reason:</span> {_text(first)}</p>{more}'
        "</article>"
    )


def counts_line(rows: list[dict], total: int, summary: dict, flag_columns: Mapping[str, str] | None = None,
                finish_columns: Mapping[str, str] | None = None) -> str:
    finishes = [set(_per_prompt(r, finish_columns, _FINISH).values()) for r in rows]
    stopped, length = sum(1 for f in finishes if f == {"stop"}), sum(1 for f in finishes if "length" in f)
    cut = {name: sum(1 for r in rows if r.get(col) == "length") for name, col in (finish_columns or {}).items()}
    by_prompt = f" ({', '.join(f'{name} {n}' for name, n in cut.items())})" if finish_columns else ""
    empty = sum(1 for r in rows if not (r.get("vlm_caption") or "").strip())
    parts = [f"{len(rows)} of {plural(total, 'captioned row')}"]
    failed = (summary.get("checkpoint_dir") or {}).get("failed")
    if failed is not None:
        parts.append(f"{plural(failed, 'failed image')} in the checkpoint dir")
    parts.append(f"of those shown: {stopped} stopped, {length} hit --max-tokens{by_prompt}, "
                 f"{empty} empty")
    for name, column in (flag_columns or _ONE_PROMPT).items():
        flags = count_flags(r.get(column) for r in rows)
        parts.append(f"quality flags of those shown{f', prompt {name}' if name else ''}: {describe_counts(flags)}")
    return " · ".join(parts)


def render_page(rows: list[dict], srcs: list[str | None], total: int, summary: dict, title: str,
                failures: list[dict] = (), failed_total: int = 0, random_weights: bool = False,
                flag_columns: Mapping[str, str] | None = None, captions: Sequence[str] | None = None,
                finish_columns: Mapping[str, str] | None = None,
                attempts_columns: Mapping[str, str] | None = None,
                tokens_columns: Mapping[str, str] | None = None) -> str:
    script_hash = base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src file: http: https: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'")
    cards = "\n".join([*(render_card(row, src, flag_columns, captions, finish_columns, attempts_columns,
                                     tokens_columns)
                         for row, src in zip(rows, srcs)),
                       *(render_failure_card(f) for f in failures)])
    counts = counts_line(rows, total, summary, flag_columns, finish_columns)
    if failed_total:
        counts += f" · {plural(failed_total, 'image')} not captioned (failed)" + (
            f", the first {len(failures)} shown" if len(failures) < failed_total else "")
    banner = f'<p class="noise" id="noise">{_e(NOISE_BANNER)}</p>' if random_weights else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>"
        f"<header><h1>{_e(title)}</h1>{banner}<p class=\"counts\" id=\"counts\">{_e(counts)}</p>"
        f"{controls()}</header>\n"
        f"<main>\n{cards}\n</main>\n<script>{JS}</script></body></html>\n"
    )


# ---------------------------------------------------------------- the whole thing

def write_preview(checkpoint_dir: Path | str, out: Path | str, data_dir: Path | str | None = None,
                  n: int = DEFAULT_ROWS, random_weights: bool | None = None) -> int:
    """Write the contact sheet of the first n merged rows (and of up to n failed images) to `out`
    (atomically); returns the caption cards written. random_weights None: from the model dir's marker."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if n < 1:
        raise UsageError(f"--n must be a positive integer, got {n}")
    merged = store.open_merged(checkpoint_dir)  # one line when the dir or its file is not a run's
    run = store.read_run_json(checkpoint_dir) or {}
    # --prompts-file: each prompt's flags, finish, attempts and tokens, not the plain (first prompt's) ones only
    flag_columns, finish_columns, attempts_columns, tokens_columns = (
        run_prompt_columns(run, base) for base in (FLAGS_COLUMN, _FINISH, _ATTEMPTS, _TOKENS))
    captions = run_caption_columns(run)  # what the run wrote, not guessed from the column names
    rows, total = read_first_rows(merged, n, ["sha256", *flag_columns.values(), *finish_columns.values(),
                                              *attempts_columns.values(), *tokens_columns.values(),
                                              *(captions or ())])
    images, other = local_images(Path(data_dir), rows) if data_dir is not None else ({}, 0)
    check_data_dir(Path(data_dir or "."), len(rows), len(images), other)
    out_dir = out.parent
    srcs = [relative_src(images[r["key"]], out_dir) if r["key"] in images else safe_url(r.get("url"))
            for r in rows]
    model = run.get("model", "unknown model")
    if random_weights is None:
        random_weights = is_random_weights(run, checkpoint_dir)
    failures, failed_total = read_failures(checkpoint_dir, merged, n)
    title = f"Captions by {model}" + (" (random weights: noise)" if random_weights else "")
    page = render_page(rows, srcs, total, read_run_summary(checkpoint_dir), title, failures, failed_total,
                       random_weights, flag_columns, captions, finish_columns, attempts_columns,
                       tokens_columns)
    atomic_write_bytes(out, page.encode("utf-8"))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m vlm_caption.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="a checkpoint dir holding all_captions.parquet")
    p.add_argument("--out", metavar="FILE", default="preview.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--data-dir", metavar="DIR", help="the data dir the run captioned: local thumbnails, not urls")
    p.add_argument("--n", type=int, default=DEFAULT_ROWS,
                   help="cards: the first N rows, and the first N failed images (default: %(default)s)")
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="say on the page that the captions are noise from a random-weight model (default: when "
                        f"the run's model dir holds {RANDOM_WEIGHTS_MARKER}, as the demo's does)")
    a = p.parse_args(argv)
    check_utf8_names([("--data-dir", a.data_dir), ("--out", a.out)])
    if a.data_dir is not None and not Path(a.data_dir).is_dir():
        raise UsageError(f"--data-dir {a.data_dir} {'is a file' if Path(a.data_dir).exists() else 'does not exist'}")
    check_output_file(Path(a.out), "--out")
    if Path(a.out).is_file() and Path(a.out).suffix.lower() not in (".html", ".htm"):  # --out CKPT/run.json, say
        raise UsageError(f"--out {a.out} exists and is not an .html file; the preview never replaces it")
    cards = write_preview(a.checkpoint_dir, a.out, data_dir=a.data_dir, n=a.n, random_weights=a.random_weights)
    print(f"wrote {a.out} ({plural(cards, 'caption card')})")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main, prog=f"python -m {__spec__.name}" if __spec__ else None)
