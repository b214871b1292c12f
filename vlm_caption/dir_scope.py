"""Which keys a checkpoint dir is for: the machines of the run that made it (Slurm array size or --num-workers,
times the nodes of a multi-node torchrun: each node is a machine, workers.py).

A machine takes the keys whose CRC32 mod the machine count is its index (workers.py), so a dir relaunched with
another machine count takes another set of keys: those already captioned in the other machines' dirs are
captioned again (--merge-only then exits 4), and the dir's own finished keys that the new slice leaves out fall
to no one's dir, or twice. That happens on a resubmission of part of an array with another size
(`sbatch --array=3-5` for tasks 3-5 of 0-7: slices 0-2 of 3) or a task finished by hand without
--num-workers. Each run of a dir records its machine count and index (machines.json; several machines may share
a dir). A later run with another count on a dir holding work is refused before the model loads, unless the
machines that wrote the dir covered every key (then the dir is the whole run and any split of it is safe), or
the run's keys are exactly the dir's (an array task's dir shared by its nodes, relaunched on one node). The
number of GPUs or srun tasks inside a machine may change.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import locks, store
from .atomic import atomic_write_json
from .errors import UsageError

MACHINES_JSON = "machines.json"
MACHINES_LOCK = "machines.lock"  # in locks/


def check_machines(ckpt: Path, machine: int, machines: int) -> None:
    """Record this machine in the dir; refuse another machine count on a dir holding part of the keys (module doc)."""
    # Machines that start together read and rewrite the same file: one at a time, or one's index is lost.
    with locks.waiting_for(ckpt / locks.LOCKS_DIR / MACHINES_LOCK):
        _check_machines(ckpt, machine, machines)


def _check_machines(ckpt: Path, machine: int, machines: int) -> None:
    path = ckpt / MACHINES_JSON
    count, indices = None, set()  # none yet (a new dir, or one of an earlier version): recorded below
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
            count, indices = int(recorded["machines"]), {int(i) for i in recorded["indices"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            store.quarantine(ckpt, path, f"unreadable ({type(e).__name__})",
                             then="the machine count is recorded anew from this run")
    if count == machines:
        if machine not in indices:
            atomic_write_json(path, {"machines": machines, "indices": sorted(indices | {machine})})
        return
    holds_work = bool(store.list_parts(ckpt) or store.list_failure_files(ckpt))
    if count is not None and holds_work and indices != set(range(count)) and not _same_keys(count, indices, machine,
                                                                                          machines):
        index = str(min(indices)) if len(indices) == 1 else "<one of those>"
        raise UsageError(
            f"{ckpt} holds the keys of machine {', '.join(map(str, sorted(indices)))} of {count} (Slurm array tasks, "
            f"nodes of a multi-node torchrun, or --num-workers), but this run is machine {machine} of {machines}: its "
            f"keys are another set, so keys in the other machines' dirs would be captioned again and some of this "
            f"dir's by no one. Relaunch it as one of {count} (a resubmitted array task: runs/slurm_array.sbatch with "
            f"MACHINES={count}; a node: the same torchrun --nnodes and --node-rank; any of them, with any number of "
            f"GPUs: --num-workers {count} --worker-index {index}), or use a new --checkpoint-dir")
    # A dir whose machines covered every key stays the whole run under the new count: recorded as one machine
    # of it, a later relaunch with yet another count (or the first one) was refused though every key is here.
    whole = count is not None and indices == set(range(count))
    atomic_write_json(path, {"machines": machines, "indices": list(range(machines)) if whole else [machine]})


def _same_keys(count: int, indices: set[int], machine: int, machines: int) -> bool:
    """Whether machine of machines takes exactly the keys of indices of count (CRC32 residues): an array task's
    dir shared by its nodes (machine task + tasks x node, workers.py) relaunched on one node)."""
    span = math.lcm(count, machines)
    return all((r % count in indices) == (r % machines == machine) for r in range(span))
