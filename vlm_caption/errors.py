"""Errors every stage may raise and the exit codes every script returns (README: "Exit codes")."""
from __future__ import annotations

EXIT_OK = 0  # everything selected is done
EXIT_FATAL = 1  # a condition the run cannot go on with (disk full, the Hub refusing a push mid-run)
EXIT_USAGE = 2  # a user mistake, said in one line
EXIT_ITEMS_FAILED = 3  # some items failed (reasons recorded) or rows are still unpushed
EXIT_COVERAGE = 4  # --merge-only or --check-hub found keys missing or captioned twice


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2, no traceback."""


class FatalError(Exception):
    """A run that cannot go on (disk full, the Hub refusing a push mid-run): one line, exit code 1."""


def described(error: BaseException) -> str:
    """`Name: first line of the message`: an exception in a failure record or a warning."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def brief(text: str, width: int = 200) -> str:
    """The first line of an error text, cut at a word at most `width` long (a warning's reason in one line)."""
    import textwrap

    line = (text.splitlines() or [""])[0]
    short = textwrap.shorten(line, width=width, placeholder=" ...", break_long_words=False, break_on_hyphens=False)
    return short if short.strip(" .") or not line else line[:width - 4] + " ..."  # one word over width: cut it
