"""Where torch.compile keeps what it compiled, so that a relaunch, the next task of a Slurm array or a fresh
rented machine loads the decode step's kernels instead of compiling them again (`--compile-cache`).

Inductor's FX-graph and AOTAutograd caches and the Triton kernels it builds all live under
TORCHINDUCTOR_CACHE_DIR; torch's default is torchinductor_$USER in the system's temp dir, which a node-local
temp dir loses with the machine. By default the cache goes into the checkpoint dir, which a relaunch has by
definition and which the ranks of a multi-node run share. Entries are keyed by the graph, the input shapes,
torch's and Triton's versions and the device, and written by torch with tmp + rename: many writers and mixed
machines are safe, a mismatch is a miss, not a wrong kernel. BENCHMARKS.md §6 has what a warm cache saves.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .cli import plural
from .errors import UsageError

log = logging.getLogger(__name__)

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE_DIR = "compile_cache"  # in the checkpoint dir (--compile-cache auto)
TRITON_ENV = "TRITON_CACHE_DIR"  # inductor sets it under its own dir once, for the process, if unset


def choose(flag: str, checkpoint_dir: str | Path) -> Path | None:
    """The directory for --compile-cache `flag`: auto = a TORCHINDUCTOR_CACHE_DIR the user set (left as it
    is: None), else the checkpoint dir's compile_cache/; none = torch's own default; anything else is a dir."""
    if flag == "none" or (flag == "auto" and os.environ.get(INDUCTOR_ENV)):
        return None
    if flag == "auto":  # the checkpoint dir is written by the run anyway
        return Path(checkpoint_dir) / COMPILE_CACHE_DIR
    if not flag.strip():  # Path("") is the working directory: torch would fill it with its cache
        raise UsageError("--compile-cache is empty; give auto, none or a directory")
    directory = Path(flag)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--compile-cache {directory} is a file, not a directory")
    try:  # now, not after the model has loaded: torch would fail at the first compile with a traceback
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--compile-cache {directory}: cannot create it ({e.strerror or e})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--compile-cache {directory} is not writable")
    return directory


def _graph_counts() -> dict[str, int]:
    """Inductor's own counters of FX graphs loaded from the cache and compiled; nothing when torch.compile
    never ran in this process (importing dynamo only to read zeros would cost a second)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {"loaded": 0, "compiled": 0}
    inductor = utils.counters["inductor"]
    # A bypass is a graph the cache cannot hold (compiled every time).
    return {"loaded": inductor["fxgraph_cache_hit"],
            "compiled": inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"]}


class CacheUse:
    """What the run's compiles took from the cache: graphs loaded and graphs compiled (then written)."""

    def __init__(self, directory: Path | None):
        self.directory = directory.resolve() if directory is not None else None
        self._before = _graph_counts()
        self.where: str | None = None  # the dir torch used (set when the block ends)

    def report(self) -> dict | None:
        """None when nothing was compiled or loaded (CPU runs, --compile off, the dummy backend)."""
        now = _graph_counts()
        counts = {name: now[name] - self._before[name] for name in now}
        if not any(counts.values()):
            return None
        where = str(self.directory) if self.directory is not None else self.where or os.environ.get(
            INDUCTOR_ENV, "torch's default")
        log.info("torch.compile: %s loaded from the compile cache, %d compiled (cache: %s)",
                 plural(counts["loaded"], "graph"), counts["compiled"], where)
        return {"used": True, "dir": where, "graphs_loaded": counts["loaded"], "graphs_compiled": counts["compiled"]}

    def report_or_why_not(self, backend: str, compile_choice: str) -> dict:
        """report(), or, when nothing compiled, why the cache went unused: said once, and run_summary records
        it instead of a dir that was never read or written."""
        used = self.report()
        if used is not None:
            return used
        why = unused_reason(backend, compile_choice)
        log.info("compile cache not used: %s", why)
        return {"used": False, "why": why}


def unused_reason(backend: str, compile_choice: str) -> str:
    """Why a run compiled nothing, from its --backend and --compile."""
    if backend == "dummy":
        return "the dummy backend compiles nothing"
    if compile_choice == "off":
        return "--compile off"
    torch = sys.modules.get("torch")
    if compile_choice == "auto" and not (torch is not None and torch.cuda.is_available()):
        return "--compile auto compiles on CUDA only, and this machine has no CUDA device"
    return "nothing was compiled (the 'decode:' line above says why the static decode was not used)"


@contextmanager
def using(directory: Path | None) -> Iterator[CacheUse]:
    """Point torch.compile's caches at `directory` for the block (None: leave them where they are), and put
    the environment back afterwards, for callers that run several configurations in one process."""
    saved = {name: os.environ.get(name) for name in (INDUCTOR_ENV, TRITON_ENV)}
    use = CacheUse(directory)
    if use.directory is not None:
        os.environ[INDUCTOR_ENV] = str(use.directory)
        _forget_cache_paths()
    try:
        yield use
    finally:
        # Always: inductor writes its default dir into TORCHINDUCTOR_CACHE_DIR at its first compile even when
        # we chose none, and a later `auto` in this process would take that for the user's choice.
        use.where = os.environ.get(INDUCTOR_ENV)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if directory is not None:
            _forget_cache_paths()


def _forget_cache_paths() -> None:
    """Inductor memoizes some paths under its cache dir (its local cache, for one): forget them when the dir
    changes, as torch's own temporary_cache_dir does. Nothing to do when inductor was never imported."""
    utils = sys.modules.get("torch._inductor.utils")
    if utils is not None:
        utils.clear_caches()
