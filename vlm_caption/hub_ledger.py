"""hub_ledger.jsonl: a local record of this dir's Hub commits (repo, run, file, parts, rows, commit), one line
per file. Checked against the repo's real files by hub.py; nothing is decided from it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from .errors import FatalError
from .hub_files import HubFile
from .store import LEDGER, quarantine

log = logging.getLogger(__name__)


def read_ledger(checkpoint_dir: Path | str) -> list[dict]:
    path = Path(checkpoint_dir) / LEDGER
    _set_aside_if_not_a_file(Path(checkpoint_dir), path)
    entries = []
    # errors="replace": garbage bytes make their lines unreadable, not the whole ledger
    for n, line in enumerate(path.read_text(errors="replace").splitlines() if path.is_file() else [], 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # torn by a crash; the Hub itself still says what is published
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("hub_path"), str):
            entries.append(entry)
        else:
            log.warning("%s line %d is unreadable; ignoring it", path, n)
    return entries


def _set_aside_if_not_a_file(checkpoint_dir: Path, path: Path) -> None:
    """A directory in the ledger's place (appending to it would fail) or a symlink (appended through, to the file
    it names, outside the dir; a dangling one made that file) is set aside: a new ledger is started."""
    if path.is_symlink() or os.path.lexists(path) and not path.is_file():
        quarantine(checkpoint_dir, path, "a symlink" if path.is_symlink() else "not a file",
                   "a new ledger is started (the Hub says what is published)")


def append_ledger(checkpoint_dir: Path | str, entries: list[dict]) -> None:
    """One os.write with O_APPEND, so lines of concurrent workers never interleave."""
    path, data = Path(checkpoint_dir) / LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    _set_aside_if_not_a_file(Path(checkpoint_dir), path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # (a link made since: ELOOP)
    try:
        if os.write(fd, data) != len(data):
            raise FatalError(f"short write to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_entry(repo_id: str, run_id: str, f: HubFile, commit: str | None) -> dict:
    first, last = (f.parts[0].seq, f.parts[-1].seq) if f.parts else (None, None)  # (a recovered file: see hub.py)
    return {"repo": repo_id, "run_id": run_id, "hub_path": f.path, "worker": f.worker, "first": first,
            "last": last, "parts": [p.path.name for p in f.parts], "rows": f.rows, "commit": commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
