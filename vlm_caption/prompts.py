"""Prompt templates and JSON captions: per-row prompts from `{column}` placeholders, named prompts from a
YAML or JSON file, and a caption asked for (and parsed back) as one JSON object of string fields.
"""
from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .prompt_values import EMPTY_MARK as _EMPTY_MARK
from .prompt_values import cut as _cut
from .prompt_values import defuse_markup as _defuse_markup
from .prompt_values import render_value as _render_value
from .quality import CHAT_MARKUP_RE

# The default prompt; its version is recorded in run.json (a custom prompt is recorded verbatim).
PROMPT_VERSION = 1
DEFAULT_PROMPT = (
    "Describe this artwork in detail. Cover: the main subjects and what they are doing; the artistic style "
    "and any art movement or artist it recalls; the medium and technique (for example oil paint, watercolour, "
    "ink, pencil, digital painting, 3D render or photograph) and any visible brushwork or texture; the colour "
    "palette; the composition and framing; the mood and lighting; and any visible text, signatures or "
    "watermarks, quoted exactly. Write one or two paragraphs of plain prose with no preamble."
)

TEMPLATE_VALUE_SETTING = "template_value_chars"  # a templated run's --template-value-chars (store.OPTIONAL_SETTINGS)
TEMPLATE_BRACES_SETTING = "template_braces"  # {{ in a prompt naming no column: once sent doubled, now single
_LITERAL_BRACE_HINT = "write {{ and }} for literal braces"
# A placeholder names a column; '.', '[' or spaces would be str.format attribute/index access or a typo.
_COLUMN_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


# ---------------------------------------------------------------------------------------------- templates

def template_columns(template: str) -> list[str]:
    """The column names a prompt template uses, in order of first use; ValueError if it is malformed.

    Placeholders are str.format-style `{column}`; `{{` and `}}` are literal braces. Positional `{}` /
    `{0}`, conversions (`{tags!r}`) and format specs (`{tags:>10}`) are refused: a prompt needs none.
    """
    columns: list[str] = []
    for literal, field, spec, conversion in _parse_template(template):
        if markup := CHAT_MARKUP_RE.search(literal):
            raise ValueError(f"prompt template: holds the chat markup {markup.group(0)}; the chat template adds "
                             "the image and the turns itself: leave it out")
        if field is None:
            continue
        _check_placeholder(field, spec, conversion)
        if field not in columns:
            columns.append(field)
    return columns


def template_settings(templates: Sequence[str], value_chars: int) -> dict[str, int]:
    """What a run's settings record of how values are rendered: the value limit when a template names a column and
    values are cut (a run whose prompts name none renders nothing; 0 renders them whole, as before the limit:
    either way its run id stays what it was), and TEMPLATE_BRACES_SETTING when a prompt naming no column holds a
    literal brace; {} otherwise."""
    try:
        columns = [template_columns(t) for t in templates]
    except ValueError:  # a malformed template is refused with its reason where the run's prompts are made
        return {}
    settings = {TEMPLATE_VALUE_SETTING: value_chars} if any(columns) and value_chars else {}
    if any(not named and ("{" in t or "}" in t) for t, named in zip(templates, columns)):
        settings[TEMPLATE_BRACES_SETTING] = 1
    return settings


def _parse_template(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt template: unbalanced brace ({e}); {_LITERAL_BRACE_HINT}") from None


def _check_placeholder(field: str, spec: str | None, conversion: str | None) -> None:
    written = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
    if field == "" or field.isdigit():
        problem = f"positional placeholder {{{field}}}: name a column, as in {{tags}}"
    elif not _COLUMN_NAME_RE.fullmatch(field):  # JSON in a prompt lands here: {"a": 1}
        problem = f"placeholder {{{written}}} is not a column name"
    elif conversion is not None or spec:
        problem = f"placeholder {{{written}}} has a conversion or format spec: write just {{{field}}}"
    else:
        return
    raise ValueError(f"prompt template: {problem}; {_LITERAL_BRACE_HINT}")


_SPACES_RE = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"[ \t]+(?=[.,;:!?])")
# Indentation and a list marker ("- ", "* ", "1. ") stay in front of a tidied line.
_LINE_PREFIX_RE = re.compile(r"[ \t]*(?:(?:[-*+\u2022]|\d+[.)])[ \t]+)?")
# A label of 1-3 words whose value rendered empty ("Tags: ." / "Tags:" / "Tags: ,"), at the start of
# the line or of a sentence; the label must be right before the empty value, so "Describe the following:"
# elsewhere on the line stays.
_EMPTY_LABEL_RE = re.compile(
    rf"(?:^|(?<=[.;,!?] ))\w[\w\-]*(?: [\w\-]+){{0,2}}:[ \t]*{_EMPTY_MARK}[ \t]*(?:[.;,](?= |$)|$)"
)


def render_prompt(template: str, row: Mapping[str, Any], value_chars: int = 0) -> str:
    """The template with each `{column}` replaced by the row's value; KeyError naming a missing column.

    Values (prompt_values.render_value): None, NaN and empty or blank strings render as nothing; lists (and
    arrays) comma-separated, their missing items skipped; structs and maps as JSON text; anything else as str();
    a value over `value_chars` (0: none) is cut. Lines where a value rendered as nothing are tidied: a label
    right before the empty value ("Tags: .", "Tags:", "Tags: ,") is removed, runs of spaces collapse, spaces
    before punctuation go, and a line left without a letter or digit is dropped.
    """
    for column in template_columns(template):
        if column not in row:
            raise KeyError(f"prompt template uses column {column!r}, which the row does not have")
    pieces: list[str] = []
    for literal, field, _spec, _conversion in _parse_template(template):
        pieces.append(literal)
        if field is not None:
            pieces.append(_cut(_render_value(row[field]), value_chars) or _EMPTY_MARK)
    # A value may end or start markup that the text next to it completes ("<{a}>", "{a}{b}"): the template's own
    # text holds none (template_columns), so any in the whole is made by values and is defused too.
    return _defuse_markup(_tidy_empty_lines("".join(pieces)))


def _tidy_empty_lines(text: str) -> str:
    lines: list[str] = []
    dropped = False
    for line in text.split("\n"):
        if _EMPTY_MARK not in line:
            lines.append(line)
        elif (tidied := _tidy_line(line)) is not None:
            lines.append(tidied)
        else:
            dropped = True
    joined = "\n".join(lines)
    # A dropped line between paragraphs would leave two blank lines.
    return re.sub(r"\n{3,}", "\n\n", joined) if dropped else joined


def _tidy_line(line: str) -> str | None:
    """The line without its empty labels and doubled spaces; None when nothing worth keeping is left."""
    prefix = _LINE_PREFIX_RE.match(line).group(0)
    body = _SPACES_RE.sub(" ", line[len(prefix):].strip())
    body = _EMPTY_LABEL_RE.sub("", body).replace(_EMPTY_MARK, "")
    body = _SPACE_BEFORE_PUNCT_RE.sub("", _SPACES_RE.sub(" ", body)).strip()
    return prefix + body if any(ch.isalnum() for ch in body) else None


# ---------------------------------------------------------------------------------------------- prompts files

# Names become output columns `vlm_caption_{name}`: lower-case identifiers, short enough to read.
PROMPT_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PROMPTS_SUFFIXES = (".yaml", ".yml", ".json")
# --prompt-file and --prompts-file: UTF-8, with or without the byte order mark Windows editors write first.
PROMPT_FILE_ENCODING = "utf-8-sig"


def load_prompts_file(path: str | Path) -> dict[str, str]:
    """Named prompts from a YAML or JSON file: a mapping {name: prompt} or a list of {name:, prompt:}.

    Names match ^[a-z][a-z0-9_]{0,31}$ and are unique; prompts are non-empty, well-formed templates.
    Anything else raises ValueError with a one-line message naming the file and the problem.
    """
    path = Path(path)
    try:
        data = _read_prompts_data(path)
        return _named_prompts(data)
    except ValueError as e:
        raise ValueError(f"{path}: {' '.join(str(e).split())}") from None  # one line


def _read_prompts_data(path: Path) -> Any:
    if path.suffix.lower() not in _PROMPTS_SUFFIXES:
        raise ValueError(f"prompts file must end in {', '.join(_PROMPTS_SUFFIXES)}")
    try:
        text = path.read_text(encoding=PROMPT_FILE_ENCODING)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_key_dict)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        where = str(e).replace('"<unicode string>"', str(path))  # (PyYAML names the text it was given, not the file)
        raise ValueError(f"not valid YAML: {where} (quote a prompt that holds ': ' or starts with '{{')") from None


def _unique_key_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    keys = [key for key, _ in pairs]
    duplicate = next((key for key in keys if keys.count(key) > 1), None)
    if duplicate is not None:
        raise ValueError(f"duplicate name {duplicate!r}")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated mapping key instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # `{short}: ...` is a mapping as the name: was a TypeError traceback
                raise ValueError(f"a name must be text, not a {type(key).__name__} ({key!r}); quote a name that "
                                 "starts with '{' or '['")
            if key in seen:
                raise ValueError(f"duplicate name {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _named_prompts(data: Any) -> dict[str, str]:
    if isinstance(data, dict):
        pairs = list(data.items())
    elif isinstance(data, list):
        pairs = [_list_item_pair(i, item) for i, item in enumerate(data)]
    else:
        raise ValueError(f"expected a mapping {{name: prompt}} or a list of {{name, prompt}}, got "
                         f"{'an empty file' if data is None else type(data).__name__}")
    if not pairs:
        raise ValueError("no prompts")
    prompts: dict[str, str] = {}
    for name, prompt in pairs:
        _check_prompt(name, prompt)
        if name in prompts:
            raise ValueError(f"duplicate name {name!r}")
        prompts[name] = prompt
    return prompts


def _list_item_pair(index: int, item: Any) -> tuple[Any, Any]:
    if not isinstance(item, dict) or set(item) != {"name", "prompt"}:
        raise ValueError(f"item {index} must be a mapping with exactly the keys 'name' and 'prompt'")
    return item["name"], item["prompt"]


def _check_prompt(name: Any, prompt: Any) -> None:
    if not isinstance(name, str) or not PROMPT_NAME_RE.fullmatch(name):
        raise ValueError(f"bad prompt name {name!r}: use 1-32 of a-z, 0-9, _ starting with a letter")
    if prompt is not None and not isinstance(prompt, str):  # YAML reads `{tags} ...`, `[...]`, yes, 1.5 as data
        kind = type(prompt).__name__
        raise ValueError(f"prompt {name!r} must be a non-empty string, not {'an' if kind[0] in 'aeiou' else 'a'} "
                         f"{kind}: quote a prompt "
                         "that starts with '{' or '[' or is a word YAML reads as data (yes, no, on, off, a number)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {name!r} must be a non-empty string")
    if _LONE_SURROGATE_RE.search(prompt):  # the tokenizer raised a TypeError traceback after the model loaded
        raise ValueError(f"prompt {name!r} holds a lone surrogate escape (\\ud83d: half an emoji): write the "
                         "character itself, or both halves of its escape")
    try:
        template_columns(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- JSON captions

DEFAULT_JSON_FIELDS = ("subject", "style", "medium", "palette", "composition", "mood", "text")
# Bump when json_instruction's wording changes: the version joins a --format json run's id, so runs asked in the
# old and the new words never share a run id (nor a checkpoint dir, nor a card config).
JSON_INSTRUCTION_VERSION = 1
# Runs of version 1 were made before the version existed and do not record it: their run ids stay what they were.
_UNRECORDED_JSON_INSTRUCTION_VERSION = 1
_JSON_INSTRUCTION_SETTING = "json_instruction_version"  # a key of store.OPTIONAL_SETTINGS
# A lone \ud83c escape (half an emoji) parses to a surrogate, which no UTF-8 file holds: it becomes U+FFFD (garbled).
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def json_instruction_settings() -> dict[str, int]:
    """What a --format json run's settings record of json_instruction's wording (RunConfig.run_settings)."""
    if JSON_INSTRUCTION_VERSION == _UNRECORDED_JSON_INSTRUCTION_VERSION:
        return {}
    return {_JSON_INSTRUCTION_SETTING: JSON_INSTRUCTION_VERSION}


def recorded_json_instruction(settings: Mapping[str, Any], fields: Sequence[str]) -> tuple[int, str | None]:
    """(the version of json_instruction that a --format json run's prompts ended with, by its settings; its text
    when that is this code's version, else None: a run records the version, not the words)."""
    version = int(settings.get(_JSON_INSTRUCTION_SETTING, _UNRECORDED_JSON_INSTRUCTION_VERSION))
    return version, json_instruction(fields) if version == JSON_INSTRUCTION_VERSION else None


def json_instruction(fields: Sequence[str]) -> str:
    """Text appended to a prompt asking for exactly one JSON object with these string fields."""
    if not fields:
        raise ValueError("a JSON caption needs at least one field")
    skeleton = "{" + ", ".join(f'"{field}": "..."' for field in fields) + "}"
    return (
        "Answer with exactly one JSON object and nothing else: no prose before or after it and no code fence. "
        f"Use exactly these keys, each with a string value (an empty string when it does not apply): {skeleton}"
    )


def parse_json_caption(text: str, fields: Sequence[str]) -> tuple[dict[str, str | None] | None, str | None]:
    """(value per field, None) for a caption holding a JSON object, else (None, why not).

    The object may sit in a ```json fence or among prose: the first balanced top-level {...} that parses
    as JSON is used. Keys match fields case-insensitively; values become strings (lists joined with ", ");
    null, empty strings and absent fields become None. Valid when at least one field is present.
    """
    values, _missing, why = read_json_caption(text, fields)
    return values, why


def read_json_caption(text: str, fields: Sequence[str]) -> tuple[dict[str, str | None] | None, list[str], str | None]:
    """parse_json_caption's (values, why) with, between them, the fields whose key the object lacks ([] when
    the caption is invalid): the quality flag `missing_fields`."""
    spans = _object_spans(text)
    if not spans:
        return None, [], "no JSON object" if "{" not in text else "unbalanced braces: the JSON object is not closed"
    first_error = None
    for start, end in spans:
        try:
            obj = json.loads(text[start:end])
        except json.JSONDecodeError as e:
            first_error = first_error or f"invalid JSON: {e}"
            continue
        return _field_values(obj, fields)
    return None, [], first_error


def _object_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each balanced top-level {...}; braces inside double-quoted strings do not count."""
    spans: list[tuple[int, int]] = []
    depth, start, in_string, escaped = 0, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"' and depth:
            in_string = True
        elif ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _field_values(obj: dict[str, Any], fields: Sequence[str]) -> tuple[dict[str, str | None] | None, list[str],
                                                                       str | None]:
    by_key = {str(key).strip().lower(): value for key, value in obj.items()}
    # Only an absent key is missing: the instruction asks for "" when a field does not apply, so "" (or null, the
    # same said otherwise) is an answer; flagging it would flag every artwork without, say, visible text.
    missing = [field for field in fields if field.lower() not in by_key]
    if len(missing) == len(fields):
        return None, [], f"none of the fields {', '.join(fields)} in the JSON object"
    return {field: _field_text(by_key.get(field.lower())) for field in fields}, missing, None


def _field_text(value: Any) -> str | None:
    if isinstance(value, list):
        text = ", ".join(item for item in map(_field_text, value) if item)
    elif isinstance(value, (dict, bool)):
        text = json.dumps(value, ensure_ascii=False)
    else:  # JSON has no NaN or Infinity: Python's parser takes them, as no value (not the text "nan")
        text = "" if value is None or isinstance(value, float) and not math.isfinite(value) else str(value).strip()
    return _LONE_SURROGATE_RE.sub("\ufffd", text) or None
