"""What a run asks the model, per row: the prompt(s) of the run as templates, checked before any work.

A run has one PromptSpec (--prompt / --prompt-file, or the default prompt), or one per named prompt of
--prompts-file. A template may name row columns (`{tags}`, `{merged_tags}`, `{original_caption}`, any metadata
column): prompts.render_prompt fills them per row. With --format json the JSON instruction is appended.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from .errors import UsageError
from .prompt_values import is_cut
from .prompts import TEMPLATE_VALUE_SETTING, json_instruction, render_prompt, template_columns
from .schema import COLUMNS, IMAGE_PATH, Column

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSpec:
    name: str | None  # None: the run's one prompt, written to the plain columns (vlm_caption, caption_flags, ...)
    template: str  # verbatim, as recorded in run.json
    json_fields: tuple[str, ...] = ()  # --format json: the fields asked for; () = prose
    value_chars: int = 0  # --template-value-chars: a longer metadata value is cut in the prompt; 0 = whole
    columns: tuple[str, ...] = field(default=(), compare=False)  # the row columns the template names

    @classmethod
    def make(cls, name: str | None, template: str, json_fields: Sequence[str] = (),
             value_chars: int = 0) -> "PromptSpec":
        try:
            columns = tuple(template_columns(template))
        except ValueError as e:
            raise UsageError(f"{_flag(name)}: {e}") from None
        return cls(name, template, tuple(json_fields), value_chars, columns)

    @property
    def braces(self) -> bool:
        return "{" in self.template or "}" in self.template

    @property
    def suffix(self) -> str:
        return f"_{self.name}" if self.name else ""

    def render(self, row: Mapping[str, Any]) -> str:
        """The prompt the model gets for this row."""
        # {{ and }} are literal braces whether or not the template names a column
        text = render_prompt(self.template, row, self.value_chars) if self.columns or self.braces else self.template
        return f"{text}\n\n{json_instruction(self.json_fields)}" if self.json_fields else text

    def field_column(self, json_field: str) -> str:
        """The column of one --format json field of this prompt's captions."""
        return f"caption_{json_field}{self.suffix}"

    def text_columns(self) -> list[str]:
        """The columns of this prompt's caption text beyond the plain vlm_caption: a named prompt's own, then the
        JSON fields (what the preview shows as captions)."""
        return [*([f"vlm_caption{self.suffix}"] if self.name else []), *map(self.field_column, self.json_fields)]

    def output_columns(self) -> list[Column]:
        """Columns this prompt adds to the registry's: per-prompt copies for a named prompt, JSON fields."""
        n = f" of prompt `{self.name}` (--prompts-file)" if self.name else ""
        cols = []
        if self.name:
            by_name = {c.name: c for c in COLUMNS}
            for base in ("vlm_caption", "caption_flags", "caption_finish", "caption_tokens", "caption_attempts"):
                cols.append(Column(base + self.suffix, by_name[base].type, f"`{base}`{n}", "caption"))
        for f in self.json_fields:
            cols.append(Column(self.field_column(f), pa.string(),
                               f"field `{f}` of the JSON caption{n} (--format json); null when absent or invalid",
                               "caption"))
        return cols


def _flag(name: str | None) -> str:
    return f"--prompts-file prompt {name!r}" if name else "--prompt / --prompt-file"


def prompt_columns(specs: Sequence[PromptSpec], output_names: Sequence[str],
                   metadata_names: Sequence[str]) -> list[str]:
    """The metadata columns the templates need that the output does not carry (read for the prompt only).

    A column must be one the output row holds before captioning (a source or download column, or a
    --keep-columns one) or a column of the data dir's metadata; anything else is a one-line usage error."""
    captioned = {c.name for c in COLUMNS if c.stage == "caption"}
    available = [n for n in output_names if n not in captioned]
    extra: list[str] = []
    for spec in specs:
        for col in spec.columns:
            if col in available:
                continue
            if col == IMAGE_PATH and col in metadata_names:  # else it is no column at all: said below
                raise UsageError(f"{_flag(spec.name)}: {{{col}}} is the pipeline's own name for a row's image file; "
                                 "rename that metadata column")
            if col in metadata_names:
                if col not in extra:
                    extra.append(col)
                continue
            why = "is filled by captioning, not known before it" if col in captioned or col.startswith("caption_") \
                else "is not a column of the row"
            choices = ", ".join(dict.fromkeys([*available, *metadata_names]))
            raise UsageError(f"{_flag(spec.name)}: {{{col}}} {why}; a template may use {choices}")
    return extra


def check_distinct_columns(names: Sequence[str]) -> None:
    """Prompt names and JSON fields combine into column names (caption_{field}_{prompt}): prompts `x_y` and `y`
    with fields `a` and `a_x` would both write caption_a_x_y. Said before any work, not at the merge."""
    seen: set[str] = set()
    twice = [n for n in names if n in seen or seen.add(n)]
    if twice:
        raise UsageError(f"column {twice[0]} would be written twice: the --prompts-file prompt names and "
                         "--json-fields / --keep-columns combine into the same name; rename a prompt or a field")


def run_specs(settings: Mapping[str, Any], recorded: bool = False) -> list[PromptSpec]:
    """The run's prompts from its settings (RunConfig.run_settings): run.json is the one record of them.

    `recorded`: the settings are another run's record (the card's runs/{run_id}.json, a dir's run.json for the
    preview): a prompt made before templates may hold a single brace or chat markup, sent verbatim then; it is
    read as a prompt naming no column, not refused (else one old run broke every card of its repo)."""
    fields = tuple(settings.get("json_fields") or ()) if settings.get("format") == "json" else ()
    value_chars = int(settings.get(TEMPLATE_VALUE_SETTING) or 0)  # absent: whole values (runs before the limit)
    make = _recorded_spec if recorded else PromptSpec.make
    if settings.get("prompts"):
        return [make(name, settings["prompts"][name], fields, value_chars) for name in prompt_order(settings)]
    return [make(None, settings["prompt"], fields, value_chars)]


def _recorded_spec(name: str | None, template: str, fields: Sequence[str], value_chars: int) -> PromptSpec:
    try:
        return PromptSpec.make(name, template, fields, value_chars)
    except UsageError:
        return PromptSpec(name, template, tuple(fields), value_chars)


def prompt_order(settings: Mapping[str, Any]) -> list[str]:
    """The names of a --prompts-file run's prompts, first (the plain columns') first: the file's order, which
    run.json keeps as prompt_order unless it is the sorted one (its dict's keys are written sorted)."""
    return list(settings.get("prompt_order") or sorted(settings.get("prompts") or {}))


def longest_prompt(specs: Sequence[PromptSpec], rows: Iterable[Mapping[str, Any]] = ()) -> str:
    """The longest prompt of the run, for the backend to size its caches by: on a GPU a batch whose prompts
    outgrow the static KV cache decodes with the slower dynamic cache. A template's longest rendering over
    `rows` (the run's own rows: rendered with empty values, every row's prompt was longer); by UTF-8 bytes,
    which follow tokens across scripts (~3-4 bytes a token) where characters do not (a CJK character is a token
    or more, an English one a quarter: sized by characters, CJK values outgrew the cache). A template that
    renders to no word for some rows (their values are missing) is said once: those images get no instruction;
    so is a column whose value render_prompt cuts (over --template-value-chars) for some rows."""
    longest = max((s.render({c: "" for c in s.columns}) for s in specs), key=_utf8_len)
    most = _utf8_len(longest)
    templated = [s for s in specs if s.columns]
    columns = list(dict.fromkeys(c for s in templated for c in s.columns))
    limit = max((s.value_chars for s in templated), default=0)  # one run setting: the same for every prompt
    empty: Counter[str | None] = Counter()
    cut: Counter[str] = Counter()
    for row in rows if templated else ():
        cut.update(c for c in columns if is_cut(row.get(c), limit))
        for spec in templated:
            text = spec.render(row)
            if (size := _utf8_len(text)) > most:
                longest, most = text, size
            if not any(ch.isalnum() for ch in text):
                empty[spec.name] += 1
    for name, count in empty.items():
        log.warning("%s renders to no words for %d row(s) (their values are missing): those images are "
                    "captioned with no instruction", _flag(name), count)
    for column, count in cut.items():
        log.warning("{%s} is longer than %d characters for %d row(s): their prompts hold its first %d, cut at a "
                    "word (--template-value-chars)", column, limit, count, limit)
    return longest


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
