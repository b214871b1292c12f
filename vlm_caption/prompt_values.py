"""How one metadata value reads in a templated prompt (prompts.render_prompt): scalars as their text, lists
comma-separated, structs and maps as JSON text, a value over --template-value-chars cut at a word.
"""
from __future__ import annotations

import decimal
import json
import math
from typing import Any

from .quality import CHAT_MARKUP_RE

# Marks where a placeholder rendered empty, so only those lines are tidied (a private-use character).
EMPTY_MARK = "\ue000"
_ELLIPSIS = "\u2026"


def is_cut(value: Any, value_chars: int) -> bool:
    """Whether render_prompt cuts this value (longest_prompt says how many rows it cut)."""
    return 0 < value_chars < len(render_value(value))


def cut(text: str, limit: int) -> str:
    """The text, or its first `limit` characters ending in an ellipsis, cut after a whole word when one ends in
    the last fifth; limit 0: the whole text."""
    if not limit or len(text) <= limit:
        return text
    head = text[:limit - len(_ELLIPSIS) + 1]
    space = max(head.rfind(" "), head.rfind("\n"))
    head = head[:space] if space > limit * 4 // 5 else head[:-1]
    return head.rstrip() + _ELLIPSIS


def is_missing(value: Any) -> bool:
    # pandas' NA and NaT are neither None nor floats; their type names are stable.
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return True
    return isinstance(value, float) and math.isnan(value)


def render_value(value: Any) -> str:
    """One value as prompt text: missing values as nothing; a list's items comma-separated (missing ones skipped;
    an item that is itself a list, struct or map as JSON); a struct (dict) or map as JSON text; bytes decoded."""
    if is_missing(value):
        return ""
    value = _plain(value)
    if _is_map(value) or isinstance(value, dict):
        return _json_text(value) if value else ""
    if isinstance(value, (list, tuple)):
        items = (_json_text(item) if isinstance(item, (list, tuple, dict)) else render_value(item) for item in value)
        return ", ".join(item for item in items if item)
    if isinstance(value, bytes):  # text written without parquet's UTF-8 annotation reads as binary: not b'...'
        return render_value(value.decode("utf-8", "replace"))
    return defuse_markup(str(value).strip().replace(EMPTY_MARK, ""))


def defuse_markup(text: str) -> str:
    # Markup in a value (scraped alt text) would open a second image slot or close the user's turn: a
    # zero-width space after its "<" leaves it as plain text to the tokenizer.
    return CHAT_MARKUP_RE.sub(lambda m: "<\u200b" + m.group(0)[1:], text)


def _plain(value: Any) -> Any:
    # numpy arrays and scalars become plain Python values
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _is_map(value: Any) -> bool:
    """A parquet map column reads (pyarrow's to_pylist) as a list of (key, value) tuples; no other type gives
    tuples."""
    return isinstance(value, list) and bool(value) and all(isinstance(i, tuple) and len(i) == 2 for i in value)


def _json_text(value: Any) -> str:
    """A struct, map or nested list as JSON text (non-ASCII kept), its scalars as the prompt renders them alone."""
    text = json.dumps(_jsonable(value), ensure_ascii=False, allow_nan=False)
    return defuse_markup(text.replace(EMPTY_MARK, ""))


def _jsonable(value: Any) -> Any:
    value = _plain(value)
    if is_missing(value):
        return None
    if _is_map(value):
        keys = [_json_key(k) for k, _ in value]
        if len(set(keys)) == len(keys):  # a map may repeat a key; a JSON object would keep only the last
            return {k: _jsonable(v) for k, (_, v) in zip(keys, value)}
        return [[k, _jsonable(v)] for k, (_, v) in zip(keys, value)]
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no inf
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)  # datetimes, dates, times, durations: the text a scalar of that type renders as


def _json_key(key: Any) -> str:
    return render_value(key) if not isinstance(key, str) else key


def _decimal(value: decimal.Decimal) -> Any:
    """A decimal as a JSON number where one holds its value exactly (1.50 as 1.5), else its text."""
    if not value.is_finite():
        return str(value)
    if value == value.to_integral_value():
        return int(value)
    as_float = float(value)
    return as_float if decimal.Decimal(repr(as_float)) == value else str(value)
