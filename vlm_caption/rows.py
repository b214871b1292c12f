"""From a generated Caption to the caption columns of an output row: the preamble stripped, quality flags,
which captions are worth a second try (retry_pool.py runs it), and counts of flags for the run summary and the
dataset card. Pure functions of captions, called on the writer thread (wants_retry on the generate thread).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .backends import Caption
from .prompt_plan import PromptSpec, run_specs
from .prompts import read_json_caption
from .quality import FLAGS, caption_flags, strip_preamble

FLAGS_COLUMN = "caption_flags"
FLAGS_BY_PROMPT = FLAGS_COLUMN + "_by_prompt"  # run_summary.json's and runs/{run_id}.json's counts per prompt
# A caption with one of these is generated once more in the same run (retry_pool.py).
RETRY_FLAGS = ("empty", "repetition", "invalid_json")


def judge(cap: Caption, spec: PromptSpec | None = None) -> tuple[str, list[str], dict[str, str | None]]:
    """(the caption as published: its chatty lead-in removed; its quality flags in quality.FLAGS order; the
    JSON fields of a --format json caption, each None when absent, all None when the JSON is invalid).

    A valid JSON caption is judged by its field values (JSON syntax is no sign of a garbled caption), plus
    `preamble` when prose came before the object and `missing_fields` when it lacks some of the fields' keys; an
    invalid one by its raw text, plus `invalid_json` (and `truncated` when cut at --max-tokens mid-sentence: a whole
    object is never truncated, whatever came after it)."""
    text, had_preamble = strip_preamble(cap.text)
    if spec is None or not spec.json_fields:
        return text, caption_flags(cap.text, cap.finish), {}
    parsed, missing, _why = read_json_caption(text, spec.json_fields)
    if parsed is None:
        found = {*caption_flags(cap.text, cap.finish), "invalid_json"}
    else:
        content = ". ".join(v for v in parsed.values() if v)
        # The object closed, so no field was cut (what came after it may have been): never `truncated`. Fields may
        # answer alike ("None visible." for text, signature, watermark): a loop is one within a value (a retry
        # without repeated 4-grams could not answer alike again).
        found = {*(set(caption_flags(content, "stop")) - {"repetition"}), *(["preamble"] if had_preamble else []),
                 *(["missing_fields"] if missing else []),
                 *(["repetition"] if any("repetition" in caption_flags(v, "stop") for v in parsed.values() if v)
                   else [])}
    return text, [f for f in FLAGS if f in found], parsed or dict.fromkeys(spec.json_fields)


def badness(flags: Sequence[str]) -> int:
    return sum(1 for f in flags if f in RETRY_FLAGS)


# What the kept caption is chosen by: a retry that refuses or is garbled is no better than the loop it replaces.
_UNUSABLE_FLAGS = (*RETRY_FLAGS, "refusal", "garbled")


def _unusable(flags: Sequence[str]) -> int:
    return sum(1 for f in flags if f in _UNUSABLE_FLAGS)


def wants_retry(cap: Caption, spec: PromptSpec | None = None) -> bool:
    flags = judge(cap, spec)[1]
    # JSON cut at --max-tokens stays cut in a second try at the same length: only a cost (flagged truncated).
    worth = [f for f in flags if not (f == "invalid_json" and cap.finish == "length")]
    if "empty" in flags and not {"invalid_json", "missing_fields"} & set(flags) and spec and spec.json_fields:
        worth.remove("empty")  # every key answered "", as the instruction allows ("does not apply"): kept, flagged
    return badness(worth) > 0


def caption_values(cap: Caption, retried: Caption | None = None, spec: PromptSpec | None = None) -> dict:
    """The caption columns of one prompt's caption (caption_model aside; names without the prompt's suffix):
    the better of the first caption and its retry (fewer RETRY_FLAGS, refusal and garbled; a tie keeps the first),
    and how many generations it took."""
    text, flags, fields = judge(cap, spec)
    if retried is not None:
        text2, flags2, fields2 = judge(retried, spec)
        if _unusable(flags2) < _unusable(flags):
            cap, text, flags, fields = retried, text2, flags2, fields2
    return {"vlm_caption": text, "caption_finish": cap.finish, "caption_tokens": cap.tokens, FLAGS_COLUMN: flags,
            "caption_attempts": 1 if retried is None else 2, **{f"caption_{k}": v for k, v in fields.items()}}


def row_values(caps: Sequence[Caption], retried: Sequence[Caption | None], specs: Sequence[PromptSpec]) -> dict:
    """The caption columns of a row, one caption per prompt. Named prompts (--prompts-file) write their
    suffixed columns; the first prompt's caption is also the row's plain vlm_caption, caption_flags, ..."""
    values: dict = {}
    for j, (cap, again, spec) in enumerate(zip(caps, retried, specs)):
        one = caption_values(cap, again, spec)
        values.update({k + spec.suffix: v for k, v in one.items()})
        if j == 0 and spec.suffix:  # the registry's plain columns (JSON fields stay per prompt)
            values.update({k: v for k, v in one.items() if k in _PLAIN})
    return values


def flag_columns(specs: Sequence[PromptSpec]) -> dict[str, str]:
    """Prompt name -> the column of its captions' flags, in prompt order, for a --prompts-file run (the plain
    column repeats the first's, so counting it alone hides the others); {} for a run of one prompt."""
    return {s.name: FLAGS_COLUMN + s.suffix for s in specs if s.name}


def run_flag_columns(settings: Mapping[str, Any]) -> dict[str, str]:
    """flag_columns of a run by its settings (run.json, runs/{run_id}.json); {} for a run of one prompt."""
    return run_prompt_columns(settings, FLAGS_COLUMN)


def run_prompt_columns(settings: Mapping[str, Any], base: str) -> dict[str, str]:
    """Prompt name -> its own copy of the column `base` (caption_flags, caption_finish, ...), in prompt order, for
    a --prompts-file run by its settings; {} for a run of one prompt."""
    if not settings.get("prompts"):
        return {}
    return {s.name: base + s.suffix for s in run_specs(settings, recorded=True) if s.name}


def run_caption_columns(run: Mapping[str, Any]) -> list[str] | None:
    """The run's caption columns beyond vlm_caption, by its run.json (each --prompts-file prompt's text, then its
    --format json fields); None without run.json: then they are guessed by name (guessed_caption_column)."""
    if not (run.get("prompt") or run.get("prompts")):
        return None
    return [c for spec in run_specs(run, recorded=True) for c in spec.text_columns()]


def guessed_caption_column(name: str) -> bool:
    """A caption column beyond the plain ones, guessed by name: another prompt's text, or a JSON field (a field
    named like finish_type looks like the run's own caption_finish_... and is missed: run_caption_columns knows)."""
    if name.startswith("vlm_caption_"):
        return True
    return name.startswith("caption_") and name not in _PLAIN and not name.startswith(
        ("caption_flags_", "caption_finish_", "caption_tokens_", "caption_attempts_", "caption_model"))


def flags_by_prompt(per_prompt: Mapping[str, Any], count: Callable[[Any], dict[str, int]]) -> dict:
    """{FLAGS_BY_PROMPT: {prompt: count(its value)}} for a --prompts-file run, {} for a run of one prompt (its
    summary and card stay as they were)."""
    return {FLAGS_BY_PROMPT: {name: count(v) for name, v in per_prompt.items()}} if per_prompt else {}


_PLAIN = ("vlm_caption", "caption_finish", "caption_tokens", FLAGS_COLUMN, "caption_attempts")


def conform(table, schema):
    """`table` (a part's rows) in `schema`: a part written before caption_flags / caption_attempts existed
    gets them (flags from its text, its preamble stripped as new rows' are; 1 attempt)."""
    import pyarrow as pa

    names = table.column_names
    if FLAGS_COLUMN in schema.names and FLAGS_COLUMN not in names:
        texts, finishes = table.column("vlm_caption").to_pylist(), table.column("caption_finish").to_pylist()
        judged = [judge(Caption(t or "", f or "stop", 0)) for t, f in zip(texts, finishes)]
        table = table.set_column(names.index("vlm_caption"), "vlm_caption", pa.array([t for t, _, _ in judged],
                                                                                     pa.string()))
        table = table.append_column(FLAGS_COLUMN, pa.array([f for _, f, _ in judged], pa.list_(pa.string())))
    if "caption_attempts" in schema.names and "caption_attempts" not in table.column_names:
        table = table.append_column("caption_attempts", pa.array([1] * table.num_rows, pa.int32()))
    return table.select(schema.names).cast(schema)


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
    import pyarrow.parquet as pq

    if column not in pq.read_schema(path).names:
        return {}
    return count_flags_column(pq.read_table(path, columns=[column]).column(column))


def count_flags_column(flags) -> dict[str, int]:
    """Counts per flag of a flags column (an arrow list array: a file's, or a Hub file's)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(flags)
    counts = pc.value_counts(flat).to_pylist() if len(flat) else []
    return ordered_counts({c["values"]: c["counts"] for c in counts})


def describe_counts(counts: dict[str, int] | None) -> str:
    """'repetition: 3, truncated: 1' (FLAGS order, whatever order a JSON round trip left), or 'none'."""
    return ", ".join(f"{k}: {v}" for k, v in ordered_counts(counts or {}).items()) or "none"
