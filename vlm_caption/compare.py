"""Two runs' captions of the same images, in numbers: how much a setting changed them.

    python -m vlm_caption.compare BASE_DIR OTHER_DIR [--show 5] [--json FILE]

Why: some settings trade captions for speed or memory (--quantize fp8, --kv-cache-dtype fp8), and a new prompt,
model or --max-tokens is a choice between captions. Caption a sample (--max-images 200) both ways into two
checkpoint dirs, then this says, over the images both captioned (the same key and sha256): the settings that
differ (run.json), per caption column the captions that are identical, their mean similarity (difflib's ratio
over words: 1 = the same words in the same order) and how many are at least SIMILAR similar; each side's mean
tokens, its share cut at --max-tokens and its quality flags; then the --show pairs that differ most, to read.
It writes nothing but --json.
"""
from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from . import cli
from .cli import plural

# outside the venv, or Ctrl-C while importing: one line, no traceback
with cli.script_imports(as_script=__name__ == "__main__", prog="python -m vlm_caption.compare"):
    import pyarrow as pa

    from . import store
    from .atomic import atomic_write_json
    from .config import check_output_file
    from .errors import UsageError
    from .rows import FLAGS_COLUMN, guessed_caption_column, run_caption_columns, run_prompt_columns
    from .run_identity import OPTIONAL_SETTINGS, RUN_SETTINGS, SETTING_NAMES

SIMILAR = 0.9  # a caption at least this similar to the other run's counts as "about the same"


def similarity(a: str, b: str) -> float:
    """difflib's ratio over the words of two captions: 1.0 the same words in the same order, 0.0 none shared."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def read_run(checkpoint_dir: Path) -> tuple[dict, dict[str, dict]]:
    """(run.json or {}, key -> row) of a checkpoint dir's merged captions."""
    merged = store.open_merged(checkpoint_dir)
    try:
        table = merged.read()
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"cannot read {checkpoint_dir / store.MERGED}: {e}") from None
    return store.read_run_json(checkpoint_dir) or {}, {row["key"]: row for row in table.to_pylist()}


def caption_columns(runs: list[tuple[dict, dict[str, dict]]]) -> list[str]:
    """The caption columns both runs wrote, in the first run's order: vlm_caption, each prompt's vlm_caption_NAME,
    each JSON field's caption_FIELD (by run.json; guessed by name without one). JSON fields were left out."""
    names = []
    for run, rows in runs:
        have = set(next(iter(rows.values()), {}))
        known = run_caption_columns(run)
        extra = known if known is not None else sorted(c for c in have if guessed_caption_column(c))
        names.append([c for c in ("vlm_caption", *extra) if c in have])
    return [c for c in names[0] if c in names[1]]


def differing_settings(base: dict, other: dict) -> dict[str, list]:
    """setting -> [base's, other's] for the settings that name a run (run.json's setting_names) that differ
    (None: not set, the default)."""
    names = set(base.get(SETTING_NAMES) or ()) | set(other.get(SETTING_NAMES) or ())
    names = names or {*RUN_SETTINGS, *OPTIONAL_SETTINGS}  # (a run.json of before setting_names)
    return {k: [base.get(k), other.get(k)] for k in sorted(names) if base.get(k) != other.get(k)}


def side_numbers(rows: list[dict], run: dict) -> dict[str, Any]:
    """One run's own numbers over the compared rows: mean tokens, share cut at --max-tokens, flag counts; for a
    --prompts-file run each prompt's too (by_prompt: the plain columns hold its first prompt's only)."""
    numbers = _numbers(rows, "")
    by_prompt = {name: column[len(FLAGS_COLUMN):] for name, column in run_prompt_columns(run, FLAGS_COLUMN).items()}
    return {**numbers, "by_prompt": {name: _numbers(rows, suffix) for name, suffix in by_prompt.items()}} \
        if by_prompt else numbers


def _numbers(rows: list[dict], suffix: str) -> dict[str, Any]:
    tokens = [r[f"caption_tokens{suffix}"] for r in rows if r.get(f"caption_tokens{suffix}") is not None]
    cut = sum(r.get(f"caption_finish{suffix}") == "length" for r in rows)
    flags = Counter(f for r in rows for f in (r.get(f"{FLAGS_COLUMN}{suffix}") or ()))
    return {"mean_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
            "cut_at_max_tokens": round(cut / len(rows), 4) if rows else 0.0, "flags": dict(sorted(flags.items()))}


def compare(base_dir: Path | str, other_dir: Path | str, show: int = 5) -> dict[str, Any]:
    """The comparison of two checkpoint dirs (see the module docstring), as a JSON-able dict."""
    base_dir, other_dir = Path(base_dir), Path(other_dir)
    (base_run, base_rows), (other_run, other_rows) = read_run(base_dir), read_run(other_dir)
    shared = base_rows.keys() & other_rows.keys()
    # A key names an image by its place in one download: the same key over another data set is another image.
    other_images = sorted(k for k in shared if None not in (base_rows[k].get("sha256"), other_rows[k].get("sha256"))
                          and base_rows[k]["sha256"] != other_rows[k]["sha256"])
    keys = sorted(shared - set(other_images))
    if not keys:
        also = f" ({len(other_images)} keys in both hold other images, sha256: other data sets?)" \
            if other_images else ""
        raise UsageError(f"{base_dir} and {other_dir} captioned no image in common{also}: nothing to compare")
    columns = caption_columns([(base_run, base_rows), (other_run, other_rows)])
    result: dict[str, Any] = {
        "base": {"dir": str(base_dir), "run_id": base_run.get("run_id")},
        "other": {"dir": str(other_dir), "run_id": other_run.get("run_id")},
        "settings_that_differ": differing_settings(base_run, other_run),
        "images_in_both": len(keys), "only_in_base": len(base_rows) - len(keys),
        "only_in_other": len(other_rows) - len(keys), "other_image_under_key": len(other_images), "captions": {}}
    for column in columns:
        pairs = [(k, base_rows[k].get(column) or "", other_rows[k].get(column) or "") for k in keys]
        scores = [(similarity(a, b), k, a, b) for k, a, b in pairs]
        result["captions"][column] = {
            "identical": sum(a == b for _, a, b in pairs),
            "mean_similarity": round(sum(s for s, *_ in scores) / len(scores), 4),
            f"at_least_{SIMILAR}": sum(s >= SIMILAR for s, *_ in scores),
            "differ_most": [{"key": k, "similarity": round(s, 4), "base": a, "other": b}
                            for s, k, a, b in sorted(scores)[:show] if s < 1.0]}
    result["base"].update(side_numbers([base_rows[k] for k in keys], base_run))
    result["other"].update(side_numbers([other_rows[k] for k in keys], other_run))
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    """What `compare` found, for a terminal."""
    n = result["images_in_both"]
    base, other = result["base"], result["other"]
    lines = [f"base: {base['dir']} (run {base['run_id']}); other: {other['dir']} (run {other['run_id']})"]
    differ = result["settings_that_differ"]
    lines.append("settings that differ: " + ("; ".join(f"{k}: {_setting(a)} -> {_setting(b)}"
                                                       for k, (a, b) in differ.items()) or "none"))
    lines.append(f"images in both: {n} (only in base: {result['only_in_base']}, only in other: "
                 f"{result['only_in_other']})")
    if result.get("other_image_under_key"):
        lines.append(f"left out: {result['other_image_under_key']} keys of both runs whose images differ (sha256): "
                     "the runs captioned other data sets there")
    for column, c in result["captions"].items():
        close = c[f"at_least_{SIMILAR}"]
        lines.append(f"{column}: identical {c['identical']}/{n} ({c['identical'] / n:.1%}), mean similarity "
                     f"{c['mean_similarity']:.3f}, at least {SIMILAR} similar {close}/{n} ({close / n:.1%})")
    prompts = [p for p in base.get("by_prompt", {}) if p in other.get("by_prompt", {})]  # (both runs': by name)
    sides = [(f" of prompt {p}", base["by_prompt"][p], other["by_prompt"][p]) for p in prompts]
    for label, b, o in sides or [("", base, other)]:
        lines.append(f"tokens a caption{label} (mean): base {b['mean_tokens']}, other {o['mean_tokens']}; cut at "
                     f"--max-tokens: base {b['cut_at_max_tokens']:.1%}, other {o['cut_at_max_tokens']:.1%}")
        lines.append(f"quality flags{label}: base {b['flags'] or 'none'}, other {o['flags'] or 'none'}")
    for column, c in result["captions"].items():
        if c["differ_most"]:
            lines.append(f"{column}: the {plural(len(c['differ_most']), 'pair')} that differ most:")
        for pair in c["differ_most"]:
            lines += [f"  {pair['key']} (similarity {pair['similarity']:.2f})", f"    base:  {pair['base']}",
                      f"    other: {pair['other']}"]
    return lines


def _setting(value) -> str:
    """A run.json setting as the report shows it: JSON, and an unset one (the default) by that name."""
    return "(default)" if value is None else json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m vlm_caption.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir", metavar="BASE_DIR", help="a checkpoint dir holding all_captions.parquet")
    p.add_argument("other_dir", metavar="OTHER_DIR", help="another, captioned with the setting to judge")
    p.add_argument("--show", metavar="N", type=int, default=5, help="pairs that differ most, printed in full "
                   "(default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers and those pairs as JSON")
    a = p.parse_args(argv)
    if a.show < 0:
        raise UsageError(f"--show must be 0 or more, got {a.show}")
    if a.json is not None:
        check_output_file(Path(a.json), "--json")
    result = compare(a.base_dir, a.other_dir, show=a.show)
    print("\n".join(report_lines(result)))
    if a.json is not None:
        atomic_write_json(Path(a.json), result)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main, prog=f"python -m {__spec__.name}" if __spec__ else None)
