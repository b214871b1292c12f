"""What img2dataset's worker processes get from this package: a temp dir of their own (spawned_tmpdir)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

SPAWNED_TMPDIR = "_img2dataset_tmpdir"  # TMPDIR of img2dataset's spawned processes (spawned_tmpdir)


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
