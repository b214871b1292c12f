"""Who is using a checkpoint dir: one lock per worker id, one shared lock per dir.

    locks/worker-{w:03d}.lock   held exclusively by the process captioning as worker w (its pid, host and
                                worker count inside: live workers must split the keys the same way)
    locks/run.lock              held shared by every live process of the dir; exclusively only to (re)write
                                run.json, and by the last worker to finish, which merges
    locks/machines.lock         held for the milliseconds of a rewrite of machines.json (dir_scope.py)

flock locks belong to the open file: the OS drops them when the process dies, kill -9 included, so a crash
never leaves a dir locked. On a shared file system they need flock support (NFSv4, Lustre with -o flock).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import time
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)

LOCKS_DIR = "locks"
RUN_LOCK = "run.lock"
_WORKER_COUNT_RE = re.compile(r"worker \d+ of (\d+)")


def _worker_lock_name(worker: int) -> str:
    return f"worker-{worker:03d}.lock"


def try_flock(fd: int, mode: int) -> bool:
    try:
        flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}


def flock(fd: int, mode: int) -> None:
    """fcntl.flock; a file system without flock support (NFS mounted without locking, Lustre without -o flock)
    is one line (it was an OSError traceback): nothing could keep two processes apart there."""
    try:
        fcntl.flock(fd, mode)
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = "this directory"
        raise UsageError(f"the file system of {where} does not support flock locks ({e.strerror}): mount it "
                         "with flock support (NFSv4, Lustre -o flock), or use a local directory") from None


class DirLock:
    """This process's hold on a checkpoint dir (see the module doc)."""

    def __init__(self, checkpoint_dir: Path | str, worker: int, num_workers: int = 1):
        self.dir = Path(checkpoint_dir) / LOCKS_DIR
        self.worker = worker
        self.num_workers = num_workers
        self._worker_fd: int | None = None
        self._run_fd: int | None = None

    def _open(self, name: str) -> int:
        return open_lock(self.dir / name)

    probe_grace_s = 1.0  # how long take_worker retries a worker lock held by someone else

    def take_worker(self) -> str | None:
        """Hold this worker id; returns None, or who holds it already (then nothing is held)."""
        fd = self._open(_worker_lock_name(self.worker))
        # Another process's holders() takes each worker lock shared for an instant to see whether it is held:
        # only a hold that outlasts a short grace is a live worker (a worker starting at that instant was refused).
        deadline = time.monotonic() + self.probe_grace_s
        while not try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                holder = _read_holder(fd)
                os.close(fd)
                return holder
            time.sleep(0.01)
        write_holder(fd, self.dir / _worker_lock_name(self.worker), f"pid {os.getpid()} on host "
                     f"{socket.gethostname()}, worker {self.worker} of {self.num_workers}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {_launcher()}\n")
        self._worker_fd = fd
        return None

    def take_run(self, exclusive: bool) -> bool:
        """Shared (every live process) or exclusive (no other live process of the dir); never blocks."""
        if self._run_fd is None:
            self._run_fd = self._open(RUN_LOCK)
        return try_flock(self._run_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    share_wait_s = 60.0  # how long share_run waits for an exclusive holder (a writer of run.json, a merge)

    def share_run(self) -> None:
        """Exclusive -> shared, or take it shared, waiting out a writer of run.json; TimeoutError after
        share_wait_s."""
        timeout = self.share_wait_s
        deadline = time.monotonic() + timeout
        while not self.take_run(exclusive=False):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.dir / RUN_LOCK} stayed locked for {timeout:.0f} s")
            time.sleep(0.1)

    def holders(self) -> list[str]:
        """Other live processes of the dir, as written in their worker locks."""
        found = []
        for path in sorted(self.dir.glob("worker-*.lock")):
            if path.name == _worker_lock_name(self.worker) and self._worker_fd is not None:
                continue
            try:  # a symlink or a dangling one put there by hand holds nobody (none is taken through one)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as e:  # the dangling one raised a FileNotFoundError traceback
                log.warning("%s cannot be opened as a lock file (%s): no worker holds it; ignoring it", path,
                            e.strerror)
                continue
            try:
                if try_flock(fd, fcntl.LOCK_SH):
                    fcntl.flock(fd, fcntl.LOCK_UN)  # nobody holds it
                else:
                    found.append(_read_holder(fd))
            finally:
                os.close(fd)
        return found

    def other_worker_counts(self) -> list[str]:
        """Live processes of the dir that split the keys another number of ways than this one.

        Called after take_worker wrote this process's count: of two processes starting together, the
        later reader sees the other's count, so at least one of them refuses."""
        return [h for h in self.holders()
                if (m := _WORKER_COUNT_RE.search(h)) is not None and int(m.group(1)) != self.num_workers]

    def not_started(self, workers: list[int]) -> list[int]:
        """Of `workers` (this process's sibling ranks under one launcher), those whose lock was not taken by a
        process of this launcher: not started yet. A lock file outlives its process, so one that ended counts."""
        missing = []
        for w in workers:
            try:
                text = (self.dir / _worker_lock_name(w)).read_text(errors="replace")
            except OSError:
                text = ""
            if _launcher() not in text:
                missing.append(w)
        return missing

    def last_one_out(self) -> bool:
        """Release this process's holds; True when no other process holds the dir (then this one keeps it
        exclusively until release()). Of two workers ending together at least one sees True: each lets go of its
        worker id and its shared hold before looking, and only one can hold the dir exclusively. A process that
        holds a worker id but not the dir yet (a rank waiting for rank 0 to write run.json) ends later: not last."""
        if self._run_fd is None:
            return False
        if self._worker_fd is not None:
            os.close(self._worker_fd)
            self._worker_fd = None
        fcntl.flock(self._run_fd, fcntl.LOCK_UN)
        if not self.take_run(exclusive=True):
            return False
        if self.holders():
            fcntl.flock(self._run_fd, fcntl.LOCK_UN)
            return False
        self._write_run_holder(f"worker {self.worker}, merging")
        return True

    def hold_if_idle(self, what: str) -> bool:
        """Hold the dir exclusively until release() when no other process holds it (True), for `what` (said in
        run.lock); else False, holding nothing. A dir without locks/ was never held by a process: True, with
        nothing made or held (a copied dir stays as it is)."""
        if not self.dir.is_dir():
            return True
        if not self.take_run(exclusive=True) or self.holders():
            self.release()
            return False
        self._write_run_holder(what)
        return True

    def _write_run_holder(self, what: str) -> None:
        os.ftruncate(self._run_fd, 0)  # who holds it, for a relaunch that waits meanwhile (run_holder)
        os.pwrite(self._run_fd, f"pid {os.getpid()} on host {socket.gethostname()}, {what} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def run_holder(self) -> str | None:
        """The process that last held the dir exclusively to merge it, as it wrote itself in run.lock."""
        try:
            return (self.dir / RUN_LOCK).read_text(errors="replace").strip() or None
        except OSError:
            return None

    def release(self) -> None:
        for fd in (self._run_fd, self._worker_fd):
            if fd is not None:
                os.close(fd)  # closing the file drops its flock
        self._run_fd = self._worker_fd = None


def _launcher() -> str:
    return f"launched by pid {os.getppid()} on host {socket.gethostname()}"


def hold_exclusive(path: Path, what: str) -> int:
    """An exclusive hold on `path` for this process (its pid written in): the fd to close when done. Held
    already: a one-line UsageError naming the holder."""
    fd = open_lock(path)
    if not try_flock(fd, fcntl.LOCK_EX):
        holder = _read_holder(fd)
        os.close(fd)
        raise UsageError(f"{what} is in use by another process ({holder}); wait for it to end, or stop it")
    write_holder(fd, path, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return fd


@contextlib.contextmanager
def waiting_for(path: Path):
    """An exclusive hold on `path` for a short read-modify-write of a file beside it: waits for another
    holder instead of refusing (each holds it for milliseconds)."""
    fd = open_lock(path)
    try:
        flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def open_lock(path: Path) -> int:
    """The fd of lock file `path`, made if missing; a directory in its place is a one-line UsageError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # locks/ (or the dir itself) a file: a traceback before this
        raise UsageError(f"{path.parent} is a file, not a directory: move it aside and rerun") from None
    try:  # never through a symlink: its holder line truncated and wrote the file it named, outside the dir
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a lock file: move it aside and rerun") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UsageError(f"{path} is a symlink, not a lock file: remove it and rerun") from None


def write_holder(fd: int, path: Path, text: str) -> None:
    """`text` as the lock file's only line; an error of a full disk names the file (cli's one line), and the
    fd is closed (the hold dropped)."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, str(path)) from None


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 300).decode(errors="replace").strip()
    return text or "a process that has not written its name yet"
