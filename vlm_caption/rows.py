"""From a generated Caption to the caption columns of an output row: the preamble stripped, quality flags,
and counts of flags for the run summary and the dataset card.

Pure functions of captions and rows; the pipeline calls them on its writer thread.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from .backends import Caption
from .quality import FLAGS, caption_flags, strip_preamble

FLAGS_COLUMN = "caption_flags"


def judge(cap: Caption) -> tuple[str, list[str]]:
    """(the caption as published: its chatty lead-in removed, its quality flags in quality.FLAGS order)."""
    text, _ = strip_preamble(cap.text)
    return text, caption_flags(cap.text, cap.finish)


def caption_values(cap: Caption) -> dict:
    """The caption columns of one row (caption_model aside)."""
    text, flags = judge(cap)
    return {"vlm_caption": text, "caption_finish": cap.finish, "caption_tokens": cap.tokens, FLAGS_COLUMN: flags}


def ordered_counts(counts: Counter | dict) -> dict[str, int]:
    """Flag -> captions with it, in FLAGS order (unknown names after them), zero counts left out."""
    known = [f for f in FLAGS if counts.get(f)]
    return {f: int(counts[f]) for f in [*known, *sorted(set(counts) - set(FLAGS))] if counts.get(f)}


def count_flags(flag_lists: Iterable[list[str] | None]) -> dict[str, int]:
    counts: Counter = Counter()
    for flags in flag_lists:
        counts.update(flags or [])
    return ordered_counts(counts)


def count_flags_in_file(path: Path | str, column: str = FLAGS_COLUMN) -> dict[str, int]:
    """Counts per flag of a parquet file's flag column ({} when the file has none: written before flags)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if column not in pq.read_schema(path).names:
        return {}
    flat = pc.list_flatten(pq.read_table(path, columns=[column]).column(column))
    counts = pc.value_counts(flat).to_pylist() if len(flat) else []
    return ordered_counts({c["values"]: c["counts"] for c in counts})


def describe_counts(counts: dict[str, int] | None) -> str:
    """'repetition: 3, truncated: 1' (FLAGS order, whatever order a JSON round trip left), or 'none'."""
    return ", ".join(f"{k}: {v}" for k, v in ordered_counts(counts or {}).items()) or "none"
