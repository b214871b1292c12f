"""Caption quality flags: cheap checks that tell a caption worth publishing from a broken one.

Each detector is a small pure function of the text. `caption_flags` runs them and returns the names of
those that fire, in FLAGS order. Precision comes first: a flag marks a caption to drop or redo, so a
good art description, plain prose or Gemma-style markdown (bold headers, bullets, headings), gets none.
"""
from __future__ import annotations

import re
from collections import Counter

# Set for --format json captions by rows.judge (from prompts.read_json_caption), never by caption_flags:
# `invalid_json` no JSON object with any of the fields; `missing_fields` an object that lacks some of their keys.
JSON_FLAGS = ("invalid_json", "missing_fields")
# Stable order: captions' flag lists and the card's counts list them this way.
FLAGS = ("empty", "repetition", "truncated", "preamble", "refusal", "garbled", *JSON_FLAGS)


def caption_flags(text: str, finish: str) -> list[str]:
    """Names of the quality problems of a caption, in FLAGS order; [] for a caption worth publishing.

    `finish` is "stop" (the model ended the caption) or "length" (it hit the token limit).
    `empty` and `refusal` judge the text after its preamble, which the captioner strips (strip_preamble).
    An empty caption gets no other flag than `preamble`: nothing else is worth saying about no text.
    """
    body, had_preamble = strip_preamble(text)
    found = {"preamble"} if had_preamble else set()
    if _is_empty(body):
        found.add("empty")
    else:
        checks = {
            "repetition": _has_repetition(text),
            "truncated": _is_truncated(text, finish),
            "refusal": _is_refusal(body),
            "garbled": _is_garbled(text),
        }
        found.update(name for name, fired in checks.items() if fired)
    return [name for name in FLAGS if name in found]


# ---------------------------------------------------------------------------------------------- empty

def _is_empty(text: str) -> bool:
    """Nothing but whitespace and punctuation: no letter or digit at all."""
    return not any(ch.isalnum() for ch in text)


# ---------------------------------------------------------------------------------------------- repetition

# A unit of 1-10 non-space characters 5+ times in a row over 20+ characters ("hahahahahahahahahaha");
# shorter runs are laughter or emphasis a caption may quote from the artwork. Only runs of 20+
# non-space characters can hold one, and prose has few, so the loop regex only looks at those.
_LONG_TOKEN_RE = re.compile(r"\S{20,}")
_CHAR_LOOP_RE = re.compile(r"(\S{1,10}?)\1{4,}")
_CHAR_LOOP_MIN_CHARS = 20
# One punctuation mark 10+ times in a row ("!!!!!!!!!!"): no sentence needs that many.
_PUNCT_RUN_RE = re.compile(r"([^\w\s])\1{9,}")
# Markdown rules and tables (---, ===, ***, ___, ###, ~~~, |---|:--|) repeat these on purpose.
_MARKDOWN_RULE_CHARS = "-=_*#~|:+ "

# Word loops, matched on a string with one character per word (see _word_codes), so `.` is one word:
# the same word 6+ times in a row ("very very very ..."; "very very" or a quoted "no no no" is fine),
_SAME_WORD_LOOP_RE = re.compile(r"(.)\1{5,}", re.DOTALL)
# a 2-3 word phrase 4+ times in a row (a quoted "NO WAR NO WAR NO WAR" slogan stays unflagged),
_SHORT_PHRASE_LOOP_RE = re.compile(r"(.{2,3}?)\1{3,}", re.DOTALL)
# a phrase of 4-40 words 3+ times in a row: prose never says the same 12+ words thrice in a row.
# Longer loops repeat whole sentences, which the sentence count below catches at a fraction of the cost.
_PHRASE_LOOP_RE = re.compile(r"(.{4,40}?)\1{2,}", re.DOTALL)
_WORD_RE = re.compile(r"\w+")

# The same sentence of 4+ words 3+ times anywhere; short ones ("None visible.") recur in lists on purpose.
_SENTENCE_SPLIT_RE = re.compile(r"[.!?\n]+")
_MIN_REPEATED_SENTENCE_WORDS = 4
_MIN_SENTENCE_REPEATS = 3


def _has_repetition(text: str) -> bool:
    """A generation loop: a character, word, phrase or sentence repeated far beyond what prose does.

    Words like "the", "of", "and" recur everywhere and bullet lists repeat a structure
    ("- **Style:** ...", "- **Medium:** ..."); only literal back-to-back repeats and thrice-repeated
    sentences count, so those stay unflagged.
    """
    return _has_char_loop(text) or _has_word_loop(text) or _has_repeated_sentence(text)


def _has_char_loop(text: str) -> bool:
    if any(not set(m.group(1)) <= set(_MARKDOWN_RULE_CHARS) for m in _PUNCT_RUN_RE.finditer(text)):
        return True
    return any(
        len(m.group(0)) >= _CHAR_LOOP_MIN_CHARS and not set(m.group(1)) <= set(_MARKDOWN_RULE_CHARS)
        for token in _LONG_TOKEN_RE.findall(text)
        for m in _CHAR_LOOP_RE.finditer(token)
    )


def _word_codes(text: str) -> str:
    """One private-use character per word (case and punctuation ignored), so regexes can find word loops."""
    codes: dict[str, str] = {}
    return "".join(codes.setdefault(word, chr(0xE000 + len(codes))) for word in _WORD_RE.findall(text.lower()))


def _has_word_loop(text: str) -> bool:
    codes = _word_codes(text)
    return any(regex.search(codes) for regex in (_SAME_WORD_LOOP_RE, _SHORT_PHRASE_LOOP_RE, _PHRASE_LOOP_RE))


def _has_repeated_sentence(text: str) -> bool:
    sentences = (" ".join(_WORD_RE.findall(s.lower())) for s in _SENTENCE_SPLIT_RE.split(text))
    counts = Counter(s for s in sentences if s.count(" ") + 1 >= _MIN_REPEATED_SENTENCE_WORDS)
    return any(n >= _MIN_SENTENCE_REPEATS for n in counts.values())


# ---------------------------------------------------------------------------------------------- truncated

# Rule: a caption cut at the token limit is truncated unless its last visible character ends a sentence
# (. ! ? or …), possibly followed by closing quotes, brackets or markdown emphasis ('." ', '.)', '.**').
# A list item or heading without final punctuation does not count: the model may have had more to say.
# Full-width (Chinese, Japanese), Devanagari and Arabic sentence ends and closers count as the ASCII ones do.
_SENTENCE_CLOSERS = "\"'”’»)]*_」』）"
_SENTENCE_ENDS = (".", "!", "?", "…", "。", "！", "？", "।", "؟")


def _is_truncated(text: str, finish: str) -> bool:
    return finish == "length" and not text.rstrip().rstrip(_SENTENCE_CLOSERS).endswith(_SENTENCE_ENDS)


# ---------------------------------------------------------------------------------------------- preamble

_APOSTROPHE = "['’]"
# A chat interjection needs its punctuation ("Sure!", "Okay,"), so "Great Wave ..." or "OK Computer" is content.
_INTERJECTION = (
    r"(?:sure|okay|ok|certainly|of\s+course|absolutely|alright|all\s+right|great|yes|no\s+problem|got\s+it)"
    r"[ \t]*[!.,]+"
)
# Phrases that introduce an answer; "Here, a woman stands" or "Here lies" does not start with one.
_LEAD_PHRASE = (
    rf"(?:here(?:{_APOSTROPHE}s|[ \t]+is|[ \t]+are)|below[ \t]+(?:is|are)|the[ \t]+following[ \t]+is"
    rf"|let(?:{_APOSTROPHE}s|[ \t]+me)|i{_APOSTROPHE}ll|i[ \t]+will|i{_APOSTROPHE}d[ \t]+be[ \t]+happy[ \t]+to"
    rf"|allow[ \t]+me[ \t]+to)\b"
)
# Lead-ins are at most 200 characters: a longer first line is the caption itself.
_LEAD_IN_MAX_CHARS = 200
# Rule 1: optional interjection, a lead phrase, then up to the first colon or the end of the line.
_LEAD_IN_RE = re.compile(
    rf"\A\s*(?:{_INTERJECTION}\s*)?(?P<lead>{_LEAD_PHRASE}[^\n:]{{0,{_LEAD_IN_MAX_CHARS}}}?)(?::|[ \t]*(?=\n))",
    re.IGNORECASE,
)
# ... and it must say what it introduces, so "Here is a woman holding three things: ..." stays content.
_LEAD_IN_TOPIC_RE = re.compile(
    r"\b(?:descri\w*|break\w*\s+(?:\w+\s+){0,2}?down|breakdown|analy[sz]\w*|overview|caption\w*|summary|rundown"
    r"|look|details?|detailed|what)\b",
    re.IGNORECASE,
)
# Rule 2: a first line that starts with an interjection and ends with a colon ("Certainly. This artwork
# has a lot going on:") or holds nothing else ("Sure!").
_INTERJECTION_LINE_RE = re.compile(
    rf"\A\s*{_INTERJECTION}(?:[^\n]{{0,{_LEAD_IN_MAX_CHARS}}}:)?[ \t]*(?:\n|\Z)",
    re.IGNORECASE,
)


def strip_preamble(text: str) -> tuple[str, bool]:
    """(text without its chatty lead-in, whether there was one). Deterministic; content is never removed.

    A lead-in sits at the very start and ends with a colon or a line break: "Here is a detailed
    description of this artwork:", "Sure! Here's ...:", "Okay, let's break down this artwork.\\n",
    "Certainly. This artwork ...:\\n". The rest is returned with its leading whitespace removed.
    """
    end = _preamble_end(text)
    if end is None:
        return text, False
    return text[end:].lstrip(), True


def _preamble_end(text: str) -> int | None:
    lead_in = _LEAD_IN_RE.match(text)
    if lead_in and _LEAD_IN_TOPIC_RE.search(lead_in.group("lead")):
        return lead_in.end()
    line = _INTERJECTION_LINE_RE.match(text)
    return line.end() if line else None


# ---------------------------------------------------------------------------------------------- refusal

# Only the opening matters: "the figure cannot be identified" later on is description, not refusal;
# "I cannot help noticing" is an idiom, not a refusal to help.
_REFUSAL_WINDOW_CHARS = 300
_REFUSAL_RE = re.compile(
    r"(?:\A|[.!?]\s+)[\s\"'*_#>]*(?:"
    r"i(?:'m|\s+am)\s+(?:sorry|unable|not\s+able)\b"
    r"|i\s+(?:cannot|can't|can\s+not|won't|will\s+not)\s+(?:help(?!\s+(?:but|noticing|feeling|thinking))"
    r"|assist|provide|describe|fulfil|fulfill|comply|create|generate|process|analy[sz]e|access|(?:view|see)"
    # "I cannot see the image" declines; "I cannot see any signature or text" describes (the default prompt asks);
    # "I can't see any attached image" declines too: up to two words before the image's noun
    r"(?!\s+(?:any|a|an)\s+(?!(?:[\w-]+\s+){0,2}(?:images?|pictures?|photo\w*|artwork|attachments?|files?)\b)"
    r"|\s+(?:no|text|writing)\b)"
    r"|do\s+that|identify|discuss|engage|caption)"
    r"|(?:i'm\s+)?sorry,?\s+(?:but\s+)?i\b"
    r"|i\s+apologi[sz]e\b"
    r"|unfortunately,?\s+i\b"
    r"|as\s+an\s+ai(?:\s+(?:language\s+)?(?:model|assistant)|,)"
    r"|as\s+a\s+(?:large\s+)?language\s+model"
    r"|i\s+(?:do\s+not|don't)\s+(?:have\s+the\s+ability|have\s+access|feel\s+comfortable|see\s+an?\s+image)"
    r")",
    re.IGNORECASE,
)


def _is_refusal(text: str) -> bool:
    """The model declines or speaks as an assistant at the start of one of the opening sentences."""
    return bool(_REFUSAL_RE.search(text[:_REFUSAL_WINDOW_CHARS].replace("’", "'")))


# ---------------------------------------------------------------------------------------------- garbled

# Gemma's chat and image markup: leaked into a caption, it is garbled (captioner.py strips it first); in a
# prompt, the processor would read it as structure (prompts.py refuses it in templates, defuses it in values).
CHAT_MARKUP_RE = re.compile(
    r"<(?:start_of_turn|end_of_turn|start_of_image|end_of_image|image_soft_token|eos|bos|pad|unk|unused\d+)>"
)
# Prose, markdown included, is ~80 % letters among visible characters; under half is symbols, digits or
# code. Texts under 20 visible characters are too short for a share to mean anything.
_MIN_LETTER_SHARE = 0.5
_MIN_VISIBLE_CHARS_FOR_SHARE = 20


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls but tab and line breaks: no prose


def _is_garbled(text: str) -> bool:
    if "\ufffd" in text or CHAT_MARKUP_RE.search(text) or _CONTROL_RE.search(text):
        return True
    visible = "".join(text.split())
    if len(visible) < _MIN_VISIBLE_CHARS_FOR_SHARE:
        return False
    return sum(ch.isalpha() for ch in visible) < _MIN_LETTER_SHARE * len(visible)
