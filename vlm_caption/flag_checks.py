"""Checks of single flag values that every command line shares: shard lists, --model, Hub repo ids, writable paths.

Each fails with a one-line UsageError naming the flag, before any work starts (config.py's validate() calls them;
other modules import them from here or from config, which re-exports them).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import UsageError

# Hub repo names: letters, digits, '-', '_', '.'; no leading/trailing '-'/'.', no '--' or '..'.
REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"^(?:{REPO_PART}/)?{REPO_PART}$")
log = logging.getLogger(__name__)


def parse_shards(spec: str | None) -> list[int] | None:
    """'0-24' / '3,5,7-9' -> sorted shard numbers; None means every shard."""
    if spec is None or spec.strip() == "":
        return None
    shards: set[int] = set()
    for piece in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not m:
            raise UsageError(f"--shards: cannot read {piece!r}; use a list like 0-24 or 3,5,7-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= 10 ** 6:  # shard names have 5 digits: a typo like 0-999999999999 filled the memory
            raise UsageError(f"--shards: range {piece.strip()!r} ends before it starts" if hi < lo else
                             f"--shards: {hi} is past any shard (the last possible one is 999999)")
        shards.update(range(lo, hi + 1))
    return sorted(shards)


def ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (the --shards syntax)."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and n == out[-1][1] + 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def check_shards(asked: list[int] | None, present: set[int]) -> None:
    """--shards naming no shard of the data is a usage error; naming some missing ones, a warning."""
    if asked is None:
        return
    missing = sorted(set(asked) - present)
    have = f"the data dir has shard(s) {ranges(present)}" if present else "the data dir has no shard numbers"
    if len(missing) == len(asked):
        raise UsageError(f"--shards {ranges(asked)}: no such shard; {have}")
    if missing:
        log.warning("--shards: %s not in the data (%s); captioning the others", ranges(missing), have)


def resolve_repo_id(hf_repo: str, hf_username: str) -> str:
    """A bare repo name is joined with --hf-username; a full 'user/name' is taken as is."""
    repo_id = hf_repo if "/" in hf_repo else f"{hf_username}/{hf_repo}"
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id or repo_id.count("/") != 1:
        raise UsageError(
            f"invalid Hub repo id {repo_id!r}: use NAME (joined with --hf-username) or USER/NAME, "
            "letters, digits, '-', '_' and '.' only"
        )
    return repo_id


def check_model(model: str) -> None:
    """--model is a dir that save_pretrained wrote or a Hub id: a mistyped local path is said at once, not as
    transformers' "Repo id must be in the form ..." after the data scan, nor tried on the Hub."""
    path = Path(model)
    if path.is_dir() and not (path / "config.json").is_file():  # e.g. its parent
        raise UsageError(f"--model {model} is a directory without a config.json: give the one that "
                         "save_pretrained wrote (e.g. demo/model) or a Hub id such as google/gemma-3-4b-it")
    if not path.is_dir() and not REPO_ID_RE.match(model):
        raise UsageError(f"--model {model} is neither a directory here nor a Hub model id such as "
                         "google/gemma-3-4b-it")
    local = sorted(path.parent.glob("*/config.json")) if "/" in model and not path.is_dir() else []
    if local:  # demo/modl: a typo beside demo/model, not a Hub id
        raise UsageError(f"--model {model} is not a directory, and {path.parent}/ holds local models: "
                         f"{', '.join(str(c.parent) for c in local[:3])}")


def check_utf8_names(paths: Iterable[tuple[str, str | None]]) -> None:
    """(flag, path) pairs: each path a name in UTF-8. Bytes the shell could not decode (a latin-1 'donn\\xe9es' of
    an older system) arrive as surrogates, which pyarrow cannot encode: a traceback at the first part written,
    after the model had loaded and a batch was captioned."""
    for flag, path in paths:
        if path is None or path.isascii():
            continue
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            raise UsageError(f"{flag} {shown} is not a UTF-8 name, which parquet files cannot be read or written "
                             "under: rename it (e.g. convmv -f latin1 -t utf8)") from None


def check_sampling(temperature: float, top_p: float) -> None:
    if not 0 <= temperature < float("inf"):  # also refuses nan
        raise UsageError(f"--temperature must be a number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if top_p != 1 and temperature == 0:  # greedy would drop it without a word (run.json records 1.0)
        raise UsageError(f"--top-p {top_p} applies when sampling: add --temperature (> 0; 0 is greedy)")


def check_sdpa_flags(attn_implementation: str, **flags: str) -> None:
    """Kernel flags that choose inside torch's sdpa (or need the grouped sdpa's kernels) with another attention
    implementation loaded would be dropped without a word, and the run's report would name a kernel never run."""
    if attn_implementation == "sdpa":
        return
    for name, value in flags.items():
        if value not in ("auto", "sdpa"):
            raise UsageError(f"--{name.replace('_', '-')} {value} needs --attn-implementation sdpa "
                             f"(got {attn_implementation})")


def check_output_file(path: Path, flag: str) -> None:
    """A file to be written: not a directory, in a directory that can be written to."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    check_writable_dir(path.parent, flag)


def check_writable_dir(path: Path, flag: str, write: bool = True) -> None:
    """Fail now, not after an hour of work, when results could not be written there (write=False: a dir only
    read, as --dry-run reads one: not a file)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; pass a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a directory")
    if not write:
        return
    try:  # a real write: os.access says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror or e}); choose a directory you can write to") \
            from None
