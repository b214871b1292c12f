"""Setting bad files aside: moved to quarantine/ under a name never taken, with a warning (never deleted)."""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


def free_name(first: Path) -> Path:
    """`first`, or `first`-1, -2... (tried one by one): what was set aside in this second is never replaced."""
    names = (first.with_name(f"{first.name}-{n}") if n else first for n in itertools.count())
    return next(p for p in names if not p.exists())


def quarantine_dir(checkpoint_dir: Path) -> Path:
    """quarantine/, or quarantine-1/, -2... while something not a folder holds the name (a file put there by hand
    made mkdir raise a traceback mid-run, leaving the bad file where it was read as good)."""
    return aside_folder(checkpoint_dir, QUARANTINE_DIR, "bad files")


def aside_folder(checkpoint_dir: Path, name: str, what: str) -> Path:
    """checkpoint_dir/name, or name-1, -2... while something not a folder holds the name, with a warning."""
    names = (checkpoint_dir / f"{name}{f'-{n}' if n else ''}" for n in itertools.count())
    folder = next(p for p in names if p.is_dir() or not os.path.lexists(p))
    if folder.name != name:
        log.warning("%s is not a folder: setting %s aside in %s instead", checkpoint_dir / name, what, folder)
    return folder


def quarantine(checkpoint_dir: Path, path: Path, why: str, then: str = "its keys will be captioned again") -> None:
    """Set a bad file aside (never delete it), saying why and what follows (a part's keys are captioned again)."""
    dest = free_name(quarantine_dir(checkpoint_dir) / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.move(str(path), str(dest))
    except FileNotFoundError:  # workers starting together saw the same bad file: another one moved it
        log.info("%s was set aside by another process", path)
        return
    log.warning("%s is %s: moved to %s; %s", path, why, dest, then)
