"""Errors every stage may raise and the exit codes every script returns (README: "Exit codes")."""
from __future__ import annotations

EXIT_OK = 0  # everything selected is done
EXIT_FATAL = 1  # a condition the run cannot go on with (disk full, the Hub refusing a push mid-run)
EXIT_USAGE = 2  # a user mistake, said in one line
EXIT_ITEMS_FAILED = 3  # some items failed (reasons recorded) or rows are still unpushed
EXIT_COVERAGE = 4  # --merge-only found keys missing or captioned twice


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2, no traceback."""


class FatalError(Exception):
    """A run that cannot go on (disk full, the Hub refusing a push mid-run): one line, exit code 1."""
