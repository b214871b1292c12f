"""What img2dataset's worker processes get from this package: a temp dir of their own, and a log file for their
tracebacks instead of the terminal (README: "Exit codes").

img2dataset catches every error of a sample or a whole shard in its worker processes, calls
traceback.print_exc() (the worker's stderr: the terminal) and then prints one line of its own to stdout
("Sample 3 failed to download: [Errno 28] No space left on device", "shard 0 failed with error ...", retried
once). A disk that fills up mid-download made a screen of identical tracebacks above the one line that says
what to do.

In each worker (download_client.BoundedDownloader), img2dataset.downloader's `traceback` is a WorkerErrors:
print_exc appends the whole traceback to download_errors.log in the data dir, in one write with O_APPEND so
that entries of several workers never interleave, or, when that write fails (that disk is full), to a file of
this run in the system temp dir. img2dataset's own one-line message is printed as before. An error that is not a
write failing for want of space (a bug, something unforeseen) also prints its last line and the log's path on
stderr, so that it stays visible. After the run, ErrorLogs.note() names the logs that got entries; the run
prints it (in the disk-full verdict, or as a warning).
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

from .data_layout import ERRORS_LOG

ENTRY_MARK = "=== img2dataset worker error"  # starts every entry (the note counts them)
LOG_CAP = 64 << 20  # a log this large takes no more entries (a full disk with millions of rows left to write);
# the data dir's, that large when a run starts, is renamed .1 first (ErrorLogs): at most twice this, in all runs
QUIET_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # a write failing for want of space
SPAWNED_TMPDIR = "_img2dataset_tmpdir"  # TMPDIR of img2dataset's spawned processes (spawned_tmpdir)
# img2dataset imports these at its top (resizer, blurrer, logger) and uses them only to resize or blur, which
# disable_all_reencoding turns off, and for wandb, which download.py never enables (BENCHMARKS.md section 10).
UNUSED_BY_IMG2DATASET = ("albumentations", "wandb")


class _Deferred(types.ModuleType):
    """Stands in sys.modules for a module imported but not used: the first attribute read imports the real one.

    (importlib.util.LazyLoader cannot do this on Python 3.11: an `import` statement reads the module's
    __spec__, which loads a lazy module at once. Here __spec__ and __file__ are plain attributes.)"""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


@contextlib.contextmanager
def torch_kept_out():
    """While img2dataset is imported: it reaches torch only through webdataset's optional torch shims, which
    fall back without it. Afterwards `import torch` works again (datasets' load_dataset imports it whenever
    its name is in sys.modules); a torch already imported stays."""
    blocked = "torch" not in sys.modules
    sys.modules.setdefault("torch", None)
    try:
        yield
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def defer_unused_imports() -> None:
    """Before img2dataset is imported: the modules it imports but does not use here are loaded only if read.

    Each of its spawned processes starts in about a third of the CPU without them and torch (BENCHMARKS.md
    section 10)."""
    for name in UNUSED_BY_IMG2DATASET:
        spec = None if name in sys.modules else importlib.util.find_spec(name)
        if spec is not None:  # (absent: img2dataset's own import fails as it would have)
            module = _Deferred(name)
            module.__spec__, module.__file__ = spec, spec.origin  # (read by inspect.getmodule, by every module)
            sys.modules[name] = module


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a spawned process (img2dataset's pool and logger, the decode checks' pool): exit once the process that
    started it is gone. img2dataset's logger process loops until its parent says stop; a parent killed outright
    (SIGKILL, the OOM killer, a lost job step) never says it, and the logger, with multiprocessing's resource
    tracker, ran on for good, adopted by init (the pool's workers went at their next write to the parent, with a
    BrokenPipeError traceback). The check costs one getppid() a second. (A parent killed while this process was
    still starting, before this call, is not seen: the first parent it knows is then its adopter.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"download_data.py worker {os.getpid()}: its parent (pid {parent}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)  # (no cleanup to run: the rerun redoes the unfinished shard)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class WorkerErrors:
    """Stands in for the traceback module in img2dataset.downloader, in a worker process (pickled to it)."""

    def __init__(self, logs: tuple[str, ...]) -> None:
        self.logs = logs  # where an entry goes, in order of preference

    def __getattr__(self, name: str):
        # Anything but print_exc (img2dataset 1.47 calls nothing else) is the traceback module's own.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(traceback, name)

    def print_exc(self, limit=None, file=None, chain=True) -> None:  # noqa: ARG002 (traceback.print_exc's signature)
        exc = sys.exc_info()[1]
        text = traceback.format_exc(limit=limit, chain=chain)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        where = self._append(f"{ENTRY_MARK} ({stamp}, pid {os.getpid()})\n{text}\n")
        if isinstance(exc, OSError) and exc.errno in QUIET_ERRNOS:
            return  # img2dataset's own line says it; the run names the log at its end (disk-full verdict, warning)
        lines = text.strip().splitlines()
        last = lines[-1] if lines else repr(exc)
        saved = f"traceback in {where}" if where else "its traceback could not be saved"
        print(f"img2dataset worker error: {last} ({saved})", file=sys.stderr, flush=True)

    def _append(self, entry: str) -> str | None:
        """The path of the log the entry went to whole, or None when none took it."""
        data = entry.encode("utf-8", "backslashreplace")
        for path in self.logs:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_size < LOG_CAP and os.write(fd, data) == len(data):
                    return path
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):  # (NFS reports a late EIO/ENOSPC here: raised, it replaced the
                    os.close(fd)                    # error img2dataset's except block was reporting)
        return None


class ErrorLogs:
    """The logs of one img2dataset run: the data dir's (appended to across runs) and this run's fallback."""

    def __init__(self, out: Path) -> None:
        self.primary = out / ERRORS_LOG
        if _size(self.primary) >= LOG_CAP:  # full from earlier runs: kept as .1 (the one before goes), so this run's
            with contextlib.suppress(OSError):  # entries land in the data dir, not in a new temp file each rerun
                os.replace(self.primary, self.primary.with_name(self.primary.name + ".1"))
        self.start = _size(self.primary)
        # gettempdir() now, in the parent: img2dataset's spawned processes get a TMPDIR inside the data dir
        name = f"vlm_caption_{Path(ERRORS_LOG).stem}_{os.getpid()}_{time.time_ns()}.log"
        self.fallback = Path(tempfile.gettempdir()) / name
        self.workers = WorkerErrors((str(self.primary), str(self.fallback)))

    def note(self) -> str | None:
        """'the tracebacks of img2dataset's N worker errors are in PATH' for the logs that got entries, or None."""
        for path in (self.primary, self.fallback):  # opened by a worker whose write then failed (a full disk)
            if (path is self.fallback or self.start == 0) and path.exists() and _size(path) == 0:
                with contextlib.suppress(OSError):
                    path.unlink()
        count, paths = 0, []
        for path, start in ((self.primary, self.start), (self.fallback, 0)):
            added = _entries(path, start)
            if added:
                count += added
                paths.append(str(path))
        if not paths:
            return None
        errors = "1 worker error" if count == 1 else f"{count} worker errors"
        return f"the tracebacks of img2dataset's {errors} are in {' and '.join(paths)}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _entries(path: Path, start: int) -> int:
    """How many entries the log holds after byte `start` (0 when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read(LOG_CAP).decode("utf-8", "replace")
    except OSError:
        return 0
    return sum(line.startswith(ENTRY_MARK) for line in text.splitlines())


@contextlib.contextmanager
def spawned_tmpdir(out: Path, distributor: str):
    """A temp dir of their own for img2dataset's spawned processes, removed afterwards: wandb, which it
    imports, makes two temp dirs in each process at import and removes them at interpreter exit, which its
    workers never reach (they end with os._exit): two empty dirs in the system's temp dir per process and run.
    Only with multiprocessing: ray and spark keep their own temp dirs (their socket paths must stay short)."""
    if distributor != "multiprocessing":
        yield
        return
    tmp = out / SPAWNED_TMPDIR
    tmp.mkdir(exist_ok=True)
    tempfile.gettempdir()  # cached now: this process's own temp dir stays where it was
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(tmp, ignore_errors=True)
