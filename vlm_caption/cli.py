"""What every script shares: logging set-up and turning known errors into one line and an exit code.

Standard library only: the root scripts import it to explain a missing dependency (outside the venv).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
from typing import Callable, Iterator

from .errors import EXIT_FATAL, EXIT_USAGE, FatalError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse with the README's usage-error policy: one line (and where to look), not the whole usage block.
    A flag is spelled whole (`--over` is no `--overwrite`), and a path's `~` is the home dir wherever it stands:
    the shell expands it in `--data-dir ~/x` but not in `--data-dir=~/x`, where a literal `./~` dir was made
    beside writes that pyarrow expanded itself. A path is what a flag's metavar names so (DIR, FILE, ID|DIR)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if isinstance(action.metavar, str) and re.search(r"(DIR|FILE)$", action.metavar):
                value = getattr(namespace, action.dest, None)
                if isinstance(value, str):
                    setattr(namespace, action.dest, os.path.expanduser(value))
                elif isinstance(value, list):
                    setattr(namespace, action.dest, [os.path.expanduser(v) if isinstance(v, str) else v
                                                     for v in value])
        return namespace, extras


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Chatty libraries stay at WARNING unless asked.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Our hub module reports retries and failures itself; the library's own notes (e.g. an unchanged
    # dataset card skipped as an empty commit) would only be noise. On its first import huggingface_hub
    # sets its logger's level and adds a handler of its own, which would undo the level set here and print
    # each note twice (bare, then through ours): import it first, then leave its records to our handler.
    import huggingface_hub.utils.logging  # noqa: F401

    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.handlers.clear()
    hf_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """'1 image', '2 images' (plural_form for irregular nouns: plural(n, "URL is", "URLs are"))."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"


def duration(seconds: float) -> str:
    """'42 s', '17 min', '3.2 h': a time to read at a glance."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


# A disk or file system that refuses a write: a condition to fix outside the run (exit 1, one line), at any write
# site (a lock's holder line, run.json, machines.json before any work); a traceback before.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def disk_error_line(e: OSError) -> str | None:
    """'could not write PATH: REASON; ...' for an OSError of DISK_ERRNOS (pyarrow's carry the errno in their
    text only), else None (a bug keeps its traceback)."""
    number = e.errno
    if number is None and (m := re.search(r"\[errno (\d+)\]", str(e))):
        number = int(m.group(1))
    if number not in DISK_ERRNOS:
        return None
    path = e.filename or getattr(e, "vlm_caption_written_path", None)  # atomic.WRITTEN_PATH (cli: stdlib only)
    where = f" {path}" if path else ""
    # A refused permission may be a read (an unreadable metadata file): not called a write.
    what = "no permission for" if number in (errno.EACCES, errno.EPERM) else "could not write"
    fix = {errno.EROFS: "make it writable", errno.EACCES: "fix permissions", errno.EPERM: "fix permissions"}.get(
        number, "free space")
    return (f"{what}{where}: {os.strerror(number)}; finished parts are kept (every file is written whole "
            f"or not at all): {fix} and rerun to resume")


SETUP_HINT = "run ./setup.sh, then `source vlm-caption/bin/activate` (or use ./run_captioning.sh)"


def missing_dependency_line(e: ModuleNotFoundError, prog: str | None = None) -> str | None:
    """The one line for a dependency missing from this Python; None when the missing module is our own
    (a bug or a broken checkout, which keeps its traceback)."""
    top = (e.name or "").split(".")[0]
    if not top or top == __name__.split(".")[0]:
        return None
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    return (f"{prog}: error: the package {top!r} is not installed for {sys.executable} (the project's dependencies "
            f"live in its venv): {SETUP_HINT}")


def exit_missing_dependency(e: ModuleNotFoundError, as_script: bool = True, prog: str | None = None) -> None:
    """For a root script's imports: print the one line and exit 1. Re-raises when the missing module is our
    own, or when not as_script (the file imported as a module, e.g. by tests: no exit at import time)."""
    line = missing_dependency_line(e, prog) if as_script else None
    if line is None:
        raise e
    print(line, file=sys.stderr)
    sys.exit(EXIT_FATAL)


@contextlib.contextmanager
def script_imports(as_script: bool = True, prog: str | None = None) -> Iterator[None]:
    """Around a root script's imports: a missing dependency is one line, exit 1 (exit_missing_dependency); Ctrl-C
    while they load (seconds on a cold network file system) is one line, exit 130, not a KeyboardInterrupt
    traceback. Not as_script (the file imported as a module, e.g. by tests or a spawned worker): both raise."""
    try:
        yield
    except ModuleNotFoundError as e:
        exit_missing_dependency(e, as_script, prog)
    except KeyboardInterrupt:
        if not as_script:
            raise
        print(f"{prog or sys.argv[0].rsplit('/', 1)[-1]}: interrupted (SIGINT) while starting; nothing was done",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
             prog: str | None = None, exit_at_once_on_signal: bool = False) -> None:
    """Run a script's main(); user mistakes and fatal conditions become one line on stderr.

    exit_at_once_on_signal (a script with threads only, no child processes to clean up): after a signal, leave
    without the interpreter's shutdown. A signal can land while pyarrow's I/O threads read a Hub file through
    Python; finalizing under them once aborted the process ("PyGILState_Release ... must be current") with
    134 instead of 143. Every file is written atomically, so nothing is left half done."""
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    try:
        code = main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except FatalError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = EXIT_FATAL
    except ModuleNotFoundError as e:  # a dependency imported lazily, e.g. outside the venv
        line = missing_dependency_line(e, prog)
        if line is None:
            raise
        print(line, file=sys.stderr)
        code = EXIT_FATAL
    except BrokenPipeError:  # stdout piped into a reader that stopped (`--dry-run | head`): no traceback
        # Whatever was written is on disk; end as a process killed by SIGPIPE does (128 + 13), silently, as head's
        # other writers do. stdout goes to /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    except OSError as e:
        line = disk_error_line(e)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        code = EXIT_FATAL
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM via interrupts.Interrupted: 128 + the signal number
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{prog}: interrupted ({signal.Signals(signum).name}); finished parts are kept, rerun to resume",
              file=sys.stderr)
        code = 128 + signum
        if exit_at_once_on_signal and argv is None:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)
