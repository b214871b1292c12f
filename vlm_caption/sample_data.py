"""A synthetic ContraStyles sample in exactly the layout download_data.py produces (demo, tests, benchmarks).

    python -m vlm_caption.sample_data --n 64 --out demo/data [--broken [--broken-in-metadata]] [--seed 0] \
        [--shard-size 16]

Rows carry the ContraStyles columns (key, url, caption, md5, tags, merged_tags) with artist/style-like
text. Images are small mostly (32-384 px on the long side), a few large (up to 2000 px); modes RGB, L,
RGBA, P; JPEG and PNG; a couple of JPEGs carry an EXIF orientation. Like img2dataset with
disable_all_reencoding, every file is named {key}.jpg whatever its bytes are, the shard parquets hold
null sizes, and rows are in (shuffled) completion order.

With broken=True, some rows are deliberately bad: a truncated JPEG, a 0-byte file and an HTML page saved
as .jpg (status success, as img2dataset records them; listed in invalid_images.parquet), and a few
failed downloads (404, 403, timeout: no files). Like the download stage, full_metadata.parquet and
metadata.csv hold only the decodable rows. The captioner still meets the bad files when it reads the
shard parquets (a data dir without full_metadata.parquet), or when include_broken_in_metadata=True
(--broken-in-metadata) puts them into full_metadata.parquet as well, on purpose: the test fixtures and
the demo do that to exercise how failures are recorded; download_data.py never does.

The shard parquets, stats files, decode checks, full_metadata.parquet, metadata.csv and the summary are
written by the same functions download.py and validate.py use, so a sample and a real download cannot
drift apart. The same seed gives the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from . import cli, data_layout as layout
from . import download as dl
from . import validate
from .atomic import atomic_write_json, atomic_write_table
from .cli import plural
from .config import DownloadConfig, check_writable_dir
from .download_summary import make_summary
from .errors import UsageError

# Fixed times in the stats files, so that a seed always gives the same bytes.
_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z

_ARTISTS = [
    "Claude Monet", "Katsushika Hokusai", "Alphonse Mucha", "Hilma af Klint", "Vincent van Gogh",
    "Gustav Klimt", "Wassily Kandinsky", "Utagawa Hiroshige", "Egon Schiele", "Mary Cassatt",
    "Ivan Aivazovsky", "John Singer Sargent", "Edvard Munch", "Paul Klee", "Tamara de Lempicka",
    "Albrecht Durer", "Winslow Homer", "Sonia Delaunay", "Kawase Hasui", "Arthur Rackham",
]
_STYLES = [
    "impressionism", "ukiyo-e", "art nouveau", "abstract art", "post-impressionism", "symbolism",
    "expressionism", "art deco", "romanticism", "realism", "cubism", "watercolor illustration",
    "shin-hanga", "bauhaus", "pixel art", "low poly", "line art", "vaporwave", "baroque", "pointillism",
]
_MEDIA = ["oil on canvas", "woodblock print", "watercolor", "ink drawing", "gouache", "lithograph",
          "digital painting", "charcoal sketch", "pastel", "etching"]
_SUBJECTS = {  # subject -> its tags
    "a lighthouse at dusk": ["lighthouse", "dusk", "seascape"],
    "a crowded harbour": ["harbour", "boats", "crowd"],
    "a woman reading by a window": ["woman", "reading", "interior"],
    "mountains above a lake": ["mountains", "lake", "landscape"],
    "a cat asleep on a windowsill": ["cat", "sleeping", "window"],
    "a great wave over fishing boats": ["wave", "boats", "sea"],
    "a field of poppies": ["poppies", "field", "flowers"],
    "a city street in the rain": ["street", "rain", "cityscape"],
    "a portrait of an old fisherman": ["portrait", "old man", "fisherman"],
    "cherry blossoms over a bridge": ["cherry blossoms", "bridge", "spring"],
    "a still life with lemons": ["still life", "lemons", "fruit"],
    "a forest path in autumn": ["forest", "path", "autumn"],
    "dancers on a stage": ["dancers", "stage", "performance"],
    "a snowy village at night": ["village", "snow", "night"],
    "geometric shapes in primary colors": ["geometric", "shapes", "primary colors"],
    "a ship in a storm": ["ship", "storm", "seascape"],
    "a garden with water lilies": ["garden", "water lilies", "pond"],
}
_BROADER = {"impressionism": "19th century", "ukiyo-e": "japanese art", "art nouveau": "decorative art",
            "abstract art": "modern art", "expressionism": "modern art", "art deco": "decorative art",
            "shin-hanga": "japanese art", "bauhaus": "modern art", "pixel art": "digital art",
            "low poly": "digital art", "vaporwave": "digital art", "baroque": "old masters"}

# Deliberately bad rows: kind -> what img2dataset records for it.
_BROKEN_FILES = ("truncated_jpeg", "empty_file", "html_page")
_FAILED = {
    "http_404": "HTTP Error 404: File not found",
    "http_403": "HTTP Error 403: Forbidden",
    "timeout": "timed out",  # what img2dataset 1.47 records when --timeout passes
}


@dataclass
class _Row:
    index: int
    kind: str  # "image", one of _BROKEN_FILES, or one of _FAILED
    fmt: str = "JPEG"  # JPEG or PNG (images and the truncated JPEG)
    mode: str = "RGB"
    size: tuple[int, int] = (64, 64)
    orientation: int | None = None  # EXIF orientation tag value


# ---------------------------------------------------------------------------------------------- plan

def _plan(n: int, broken: bool, rng: random.Random) -> list[_Row]:
    rows = [_Row(i, "image") for i in range(n)]
    special = list(_BROKEN_FILES) + list(_FAILED) if broken else []
    special = special[: max(0, n - 1)]  # keep at least one good image
    for row, kind in zip(rng.sample(rows, len(special)), special):
        row.kind = kind
    images = [r for r in rows if r.kind == "image"]
    for row in images:
        _plan_image(row, rng)
    _force_extremes(images)
    jpegs = [r for r in images if r.fmt == "JPEG" and r.size[0] != r.size[1]]
    for row, tag in zip(rng.sample(jpegs, min(2, len(jpegs))), (6, 8)):  # rotated 90 CW / CCW
        row.orientation = tag
    for row in rows:
        if row.kind == "truncated_jpeg":
            row.size = (320, 240)
    return rows


def _plan_image(row: _Row, rng: random.Random) -> None:
    u = rng.random()
    long_side = rng.randint(32, 384) if u < 0.85 else rng.randint(385, 1024) if u < 0.95 else rng.randint(1025, 2000)
    short_side = max(16, round(long_side * rng.uniform(0.5, 1.0)))
    row.size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    row.mode = rng.choices(["RGB", "L", "RGBA", "P"], weights=[55, 15, 15, 15])[0]
    if row.mode in ("RGBA", "P"):
        row.fmt = "PNG"
    else:
        row.fmt = "JPEG" if rng.random() < 0.8 else "PNG"
    if long_side > 512:  # large PNGs of smooth gradients are megabytes: keep the sample small
        row.mode, row.fmt = "RGB", "JPEG"


def _force_extremes(images: list[_Row]) -> None:
    """One 2000 px image and one 32 px image whatever the draw, when there are enough rows."""
    if len(images) >= 8:
        images[0].size, images[0].mode, images[0].fmt = (2000, 1400), "RGB", "JPEG"
        images[1].size = (32, 24)


# ---------------------------------------------------------------------------------------------- bytes

def _picture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A smooth gradient with a few shapes: compresses well, yet looks like something."""
    w, h = size
    # The gradient is computed on at most 64x64 pixels and scaled up: large images stay cheap to make.
    gw, gh = min(w, 64), min(h, 64)
    x = np.linspace(0.0, 1.0, gw, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None, None]
    c0, c1, c2 = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) for _ in range(3))
    pixels = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randint(4, max(5, w // 2)), y0 + rng.randint(4, max(5, h // 2)))
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def _encode(row: _Row, rng: random.Random) -> bytes:
    img = _picture(row.size, rng)
    if row.mode == "L":
        img = img.convert("L")
    elif row.mode == "P":
        img = img.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    elif row.mode == "RGBA":
        alpha = Image.linear_gradient("L").resize(img.size)
        img.putalpha(alpha)
    buf = io.BytesIO()
    if row.fmt == "JPEG":
        exif = Image.Exif()
        if row.orientation is not None:
            exif[0x0112] = row.orientation
        img.save(buf, "JPEG", quality=85, exif=exif)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _row_bytes(row: _Row, rng: random.Random) -> bytes | None:
    """The bytes img2dataset would have saved for this row; None for a failed download."""
    if row.kind == "image":
        return _encode(row, rng)
    if row.kind == "truncated_jpeg":
        whole = _encode(_Row(row.index, "image", "JPEG", "RGB", row.size), rng)
        return whole[: len(whole) * 3 // 5]
    if row.kind == "empty_file":
        return b""
    if row.kind == "html_page":
        return (b"<!DOCTYPE html>\n<html><head><title>Image not available</title></head>\n"
                b"<body><h1>This image has been removed</h1><p>Please check the link.</p></body></html>\n")
    return None


def _exif_json(data: bytes) -> str | None:
    """The exif column exactly as img2dataset computes it (exifread, details=False)."""
    import exifread

    try:
        tags = exifread.process_file(io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    except Exception:  # noqa: BLE001 - mirrors img2dataset, which turns any exifread failure into None
        return None


# ---------------------------------------------------------------------------------------------- text

def _text(rng: random.Random) -> dict:
    artist, style, medium, subject = (rng.choice(x) for x in (_ARTISTS, _STYLES, _MEDIA, sorted(_SUBJECTS)))
    caption = rng.choice([
        f"{subject}, {medium}, in the style of {artist}",
        f"{medium.capitalize()} of {subject} by {artist}, {style}",
        f"{subject} in {style} style",
        f"{artist} - {subject} ({medium})",
    ])
    tags = [style, medium, *rng.sample(_SUBJECTS[subject], 2), artist.lower()]
    merged = [*tags, _BROADER.get(style, "fine art"), "artwork"]
    return {"caption": caption, "tags": ", ".join(tags), "merged_tags": ", ".join(dict.fromkeys(merged))}


# ---------------------------------------------------------------------------------------------- writing

def write_sample(out_dir: str | Path, n: int = 64, broken: bool = False, seed: int = 0,
                 shard_size: int | None = None, include_broken_in_metadata: bool = False) -> Path:
    """Write the sample into out_dir (created; must be empty) and return its path."""
    out = Path(out_dir)
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    shard_size = shard_size or DownloadConfig.shard_size
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    check_writable_dir(out, "--out")  # a file or an unwritable place: one line, not a traceback
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose a new directory")
    logging.getLogger("exifread").setLevel(logging.CRITICAL)  # as img2dataset does: it warns on every PNG

    rng = random.Random(seed)
    rows = _plan(n, broken, rng)
    original_keys = rng.sample(range(10**8, 10**9), n)
    images_dir = out / layout.IMAGES_DIR
    images_dir.mkdir(parents=True)
    url_rows, stats = [], {}
    for shard_id in layout.expected_shards(n, shard_size):
        shard_rows = rows[shard_id * shard_size:(shard_id + 1) * shard_size]
        stats[shard_id] = _write_shard(out, shard_id, shard_rows, shard_size, original_keys, rng, url_rows)
    dl.write_urls(out, pa.Table.from_pylist(url_rows, schema=pa.schema([(c, pa.string()) for c in dl.URL_COLUMNS])),
                  shard_size)

    checks = validate.validate_shards(out, stats, workers=1)
    counts = validate.build_outputs(out, sorted(stats), include_invalid=include_broken_in_metadata)
    checks.seconds = 0.0  # no timings in the sample: the same seed gives the same bytes
    cfg = DownloadConfig(output=str(out), source=f"synthetic sample (seed {seed})", shard_size=shard_size)
    summary = make_summary(cfg, n, sorted(stats), sorted(stats), counts, checks, None)
    atomic_write_json(out / layout.SUMMARY_FILE, summary)
    return out


def _write_shard(out: Path, shard_id: int, rows: list[_Row], shard_size: int, original_keys: list[int],
                 rng: random.Random, url_rows: list[dict]) -> dict:
    """One shard as img2dataset writes it: files, NNNNN.parquet, then NNNNN_stats.json last."""
    subdir = out / layout.IMAGES_DIR / layout.shard_name(shard_id)
    subdir.mkdir()
    metas, status_dict = [], Counter()
    for row in rows:
        meta, data = _row_meta(row, shard_size, original_keys, rng)
        url_rows.append({"url": meta["url"], "caption": meta["caption"], "original_key": meta["original_key"],
                         "md5": meta["source_md5"], "tags": meta["tags"], "merged_tags": meta["merged_tags"]})
        status_dict["success" if data is not None else meta["error_message"]] += 1
        if data is not None:
            (subdir / f"{meta['key']}.{layout.ENCODE_FORMAT}").write_bytes(data)
            (subdir / f"{meta['key']}.txt").write_text(meta["caption"], encoding="utf-8")
            (subdir / f"{meta['key']}.json").write_text(json.dumps(meta, indent=4), encoding="utf-8")
        metas.append(meta)
    rng.shuffle(metas)  # img2dataset writes rows in completion order, not key order
    atomic_write_table(out / layout.IMAGES_DIR / f"{layout.shard_name(shard_id)}.parquet",
                       pa.Table.from_pylist(metas, schema=dl.SHARD_SCHEMA))
    start = _EPOCH + 60.0 * shard_id
    stats = {
        "count": len(rows), "successes": status_dict["success"],
        "failed_to_download": len(rows) - status_dict["success"], "failed_to_resize": 0,
        "duration": 30.0, "start_time": start, "end_time": start + 30.0, "status_dict": dict(status_dict),
    }
    (out / layout.IMAGES_DIR / layout.stats_file(layout.shard_name(shard_id))).write_text(json.dumps(stats, indent=4))
    return stats


def _row_meta(row: _Row, shard_size: int, original_keys: list[int], rng: random.Random) -> tuple[dict, bytes | None]:
    """(the row's metadata in img2dataset's column order, the saved bytes or None)."""
    text = _text(rng)
    data = _row_bytes(row, rng)
    ext = "png" if row.fmt == "PNG" and row.kind == "image" else "jpg"
    failed = row.kind in _FAILED
    meta = {
        "original_key": f"{original_keys[row.index]:09d}",
        "source_md5": hashlib.md5(data if data else f"missing-{row.index}".encode()).hexdigest(),
        "tags": text["tags"],
        "merged_tags": text["merged_tags"],
        "caption": text["caption"],
        "url": f"http://127.0.0.1/img/{row.index}.{ext}",
        "key": layout.img2dataset_key(row.index, shard_size),
        "status": "failed_to_download" if failed else "success",
        "error_message": _FAILED.get(row.kind),
        # With disable_all_reencoding img2dataset never decodes, so all four sizes stay null.
        "width": None, "height": None, "original_width": None, "original_height": None,
        "exif": None if failed else _exif_json(data),
        "sha256": None if failed else hashlib.sha256(data).hexdigest(),
    }
    return meta, data


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m vlm_caption.sample_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", metavar="DIR", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--n", type=int, default=64, help="rows (default: %(default)s)")
    p.add_argument("--broken", action="store_true", help="add broken files and failed downloads")
    p.add_argument("--broken-in-metadata", action="store_true",
                   help="with --broken: list the broken files in full_metadata.parquet too (download_data.py never "
                        "does), so that a captioning run meets them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=None, help="rows per shard (default: 10000, like the download)")
    a = p.parse_args(argv)
    if a.broken_in_metadata and not a.broken:
        raise UsageError("--broken-in-metadata needs --broken")
    out = write_sample(a.out, n=a.n, broken=a.broken, seed=a.seed, shard_size=a.shard_size,
                       include_broken_in_metadata=a.broken_in_metadata)
    summary = json.loads((out / layout.SUMMARY_FILE).read_text())
    print(f"wrote {plural(a.n, 'row')} to {out}: {plural(summary['valid'], 'valid image')}, "
          f"{plural(summary['invalid'], 'broken file')}, {plural(summary['failed'], 'failed download')}; "
          f"{plural(summary['full_metadata_rows'], 'row')} in {layout.FULL_METADATA_FILE}")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main, prog=f"python -m {__spec__.name}" if __spec__ else None)
