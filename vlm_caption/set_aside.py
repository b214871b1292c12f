"""Setting bad files aside: moved to quarantine/ under a name never taken, with a warning (never deleted)."""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import time
from pathlib import Path

from .atomic import _tmp_name
from .errors import FatalError

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


def free_name(first: Path) -> Path:
    """`first`, or `first`-1, -2... (tried one by one): what was set aside in this second is never replaced."""
    names = (first.with_name(f"{first.name}-{n}") if n else first for n in itertools.count())
    return next(p for p in names if not p.exists())


def _claim_name(first: Path, folder: bool) -> Path:
    """free_name, taken at once: an empty file (or folder) made there with O_EXCL (mkdir), which the move then
    replaces. Two workers setting a file aside in one second both found one name free, and the second rename
    silently replaced the first one's file. A kill before the move leaves that empty file, never a lost one."""
    n = 0
    while True:
        p = first.with_name(f"{first.name}-{n}") if n else first
        try:
            if folder:  # (a folder is renamed over an empty folder only, a file over a file only)
                os.mkdir(p)
            else:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return p
        except FileExistsError:
            n += 1


def quarantine_dir(checkpoint_dir: Path) -> Path:
    """quarantine/, or quarantine-1/, -2... while something not a folder holds the name (a file put there by hand
    made mkdir raise a traceback mid-run, leaving the bad file where it was read as good)."""
    return aside_folder(checkpoint_dir, QUARANTINE_DIR, "bad files")


def aside_folder(checkpoint_dir: Path, name: str, what: str) -> Path:
    """checkpoint_dir/name, or name-1, -2... while something not a folder holds the name, with a warning."""
    names = (checkpoint_dir / f"{name}{f'-{n}' if n else ''}" for n in itertools.count())
    # "absent" asked before "a folder": another worker of the dir may make the folder between the two questions,
    # and asked the other way round that read as a file in the way (8 workers starting together took name-1).
    folder = next(p for p in names if not os.path.lexists(p) or p.is_dir())
    if folder.name != name:
        log.warning("%s is not a folder: setting %s aside in %s instead", checkpoint_dir / name, what, folder)
    return folder


def quarantine(checkpoint_dir: Path, path: Path, why: str, then: str = "its keys will be captioned again") -> None:
    """Set a bad file aside (never delete it), saying why and what follows (a part's keys are captioned again)."""
    folder = quarantine_dir(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dest = _claim_name(folder / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}",
                           path.is_dir() and not path.is_symlink())
    except OSError as e:  # (a read-only or full quarantine/: one line, as a failed move is)
        raise FatalError(f"cannot set {path} aside ({why}): making its name in {folder} failed: "
                         f"{e.strerror or e}; make that folder writable and rerun") from None
    try:
        move(path, dest)
    except FileNotFoundError:  # workers starting together saw the same bad file: another one moved it
        log.info("%s was set aside by another process", path)
        return
    except MoveError as e:
        raise FatalError(f"cannot set {path} aside ({why}): {e}; make its folder writable (or move the file out "
                         "of the way yourself) and rerun") from None
    log.warning("%s is %s: moved to %s; %s", path, why, dest, then)


class MoveError(Exception):
    """A move that failed, saying which step (the rename, the copy, the removal of the original)."""


def move(src: Path, dest: Path) -> None:
    """Rename src to dest, a name this process claimed (_claim_name: removed again on any failure, and only then,
    as another process may take it once it is free); a copy and a delete only across file systems (EXDEV). Never
    two copies: shutil.move copied on any failed rename, and when the delete then failed too (a read-only folder)
    the file was both set aside and still in place. FileNotFoundError when src is gone; MoveError naming the step
    that failed."""
    try:
        os.rename(src, dest)
        return
    except FileNotFoundError:
        _remove_claim(dest)
        raise
    except OSError as e:
        if e.errno != errno.EXDEV:
            _remove_claim(dest)
            raise MoveError(f"renaming it to {dest} failed: {e.strerror or e}") from None
    tmp = _tmp_name(dest)  # then renamed over the claimed name (a symlink is not copied onto a file)
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)
        os.replace(tmp, dest)
    except FileNotFoundError:
        _remove_quietly(tmp)
        _remove_claim(dest)
        raise
    except OSError as e:
        _remove_quietly(tmp)
        _remove_claim(dest)
        raise MoveError(f"copying it to {dest} (another file system) failed: {e.strerror or e}") from None
    try:
        os.unlink(src)
    except FileNotFoundError:  # another process set it aside meanwhile: its copy stands
        _remove_quietly(dest)
        return
    except OSError as e:
        _remove_quietly(dest)
        raise MoveError(f"removing it after copying it to {dest.parent} (another file system) failed: "
                        f"{e.strerror or e}; the copy was removed") from None


def _remove_claim(dest: Path) -> None:
    with contextlib.suppress(OSError):
        if dest.is_dir() and not dest.is_symlink():
            os.rmdir(dest)
        else:
            os.unlink(dest)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
