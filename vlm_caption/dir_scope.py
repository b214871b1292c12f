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
number of GPUs or srun tasks inside a machine may change. The refusal says how to relaunch the dir's machine:
machines.json also records the nodes per machine count (machine = array task + array size x node), since
MACHINES=<count> was wrong advice for a task of a multi-node array (array task 1 of 2 on 2 nodes is machine 1
or 3 of 4: resubmitted as task 1 with MACHINES=4 it takes another slice). A file without them is an earlier
version's, whose count has no nodes in it: such a dir is relaunched on one node per machine. A node's own dir
given another node's rank by a relaunch (torchrun's c10d rendezvous numbers nodes by join order) is refused: the
dir records which launch claimed each index, and a node whose array task's other indices were all claimed by
earlier launches waits a while for a node of its own launch to claim one (a dir the nodes share) before refusing.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from . import locks, store
from .atomic import atomic_write_json
from .errors import UsageError

log = logging.getLogger(__name__)
MACHINES_JSON = "machines.json"
MACHINES_LOCK = "machines.lock"  # in locks/
NODE_CLAIM_WAIT_S = 120.0  # how long a node waits for another node of its launch to show the dir is shared


def check_machines(ckpt: Path, machine: int, machines: int, nodes: int = 1, launch: str | None = None) -> None:
    """Record this machine in the dir; refuse another machine count on a dir holding part of the keys (module doc).
    nodes: of the multi-node torchrun this machine is a node of (1 without one): machines = array size x nodes.
    launch: which torchrun launch this is (workers.launch_id), recorded as each node's claim of its index."""
    deadline, waited = time.monotonic() + NODE_CLAIM_WAIT_S, False
    while True:
        # Machines that start together read and rewrite the same file: one at a time, or one's index is lost.
        with locks.waiting_for(ckpt / locks.LOCKS_DIR / MACHINES_LOCK):
            swapped = _check_machines(ckpt, machine, machines, nodes, launch)
        if swapped is None:
            return
        if time.monotonic() >= deadline:
            raise swapped
        if not waited:
            waited = True
            log.warning("%s holds other nodes' keys, claimed by an earlier launch: waiting up to %.0f s for a node "
                        "of this launch to come to it (a dir the nodes share), else this relaunch swapped the nodes",
                        ckpt, NODE_CLAIM_WAIT_S)
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))


def _check_machines(ckpt: Path, machine: int, machines: int, nodes: int, launch: str | None) -> UsageError | None:
    """None once recorded; the refusal of a node swap while no node of this launch has shown the dir shared."""
    path = ckpt / MACHINES_JSON
    count, indices, known, launches = _read_record(ckpt, path)
    if count == machines:
        maybe_swapped = machine not in indices and nodes > 1 and known == nodes
        if maybe_swapped and _swapped(ckpt, machine, count // nodes, indices, launches, launch):
            return _node_swap(ckpt, machine, count, indices, nodes)
        claiming = launch is not None and nodes > 1  # a node of a multi-node torchrun
        claims = {**launches, machine: launch} if claiming else launches
        if machine not in indices:  # the same count split another way (array size x nodes): nodes no longer one
            atomic_write_json(path, _record(machines, sorted(indices | {machine}), known if known == nodes else None,
                                            claims))
        elif claims != launches or claiming and known != nodes:  # (a dir run by hand first: now a node's own)
            atomic_write_json(path, _record(machines, sorted(indices), nodes if claiming else known, claims))
        return None
    if (count is not None and _holds_work(ckpt) and indices != set(range(count))
            and not _same_keys(count, indices, machine, machines)):
        raise UsageError(
            f"{ckpt} holds the keys of machine {', '.join(map(str, sorted(indices)))} of {count}"
            f"{_launch(count, indices, known)}, but this run is machine {machine} of {machines}"
            f"{_launch(machines, {machine}, nodes)}: its keys are another set, so keys in the other machines' dirs "
            f"would be captioned again and some of this dir's by no one. Relaunch it as "
            f"{_relaunch(count, indices, known)}, or use a new --checkpoint-dir")
    # A dir whose machines covered every key stays the whole run under the new count: recorded as one machine
    # of it, a later relaunch with yet another count (or the first one) was refused though every key is here.
    whole = count is not None and indices == set(range(count))
    claims = {machine: launch} if launch is not None and nodes > 1 and not whole else {}
    atomic_write_json(path, _record(machines, list(range(machines)) if whole else [machine], nodes, claims))
    return None


def _read_record(ckpt: Path, path: Path) -> tuple[int | None, set[int], int | None, dict[int, str]]:
    """(machine count, indices, nodes, launches) of machines.json; nothing recorded where there is none (a new
    dir, or an earlier version's) or it cannot be read (set aside with a warning)."""
    if not path.exists():
        return None, set(), None, {}
    try:
        recorded = json.loads(path.read_text())
        count, indices = int(recorded["machines"]), {int(i) for i in recorded["indices"]}
        known = None if recorded.get("nodes") is None else int(recorded["nodes"])
        launches = {int(i): str(run) for i, run in (recorded.get("launches") or {}).items()}
        if (count < 1 or known is not None and (known < 1 or count % known) or not all(0 <= i < count for i in indices)
                or not launches.keys() <= indices):  # edited by hand: "nodes": 0 was a ZeroDivisionError
            raise ValueError("a number out of range")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # (1e999 is infinity)
        store.quarantine(ckpt, path, f"unreadable ({type(e).__name__})",
                         then="the machine count is recorded anew from this run")
        return None, set(), None, {}
    return count, indices, known, launches


def _holds_work(ckpt: Path) -> bool:
    return bool(store.list_parts(ckpt) or store.list_failure_files(ckpt))


def _swapped(ckpt: Path, machine: int, tasks: int, indices: set[int], launches: dict[int, str],
             launch: str | None) -> bool:
    """Whether this node may be a node's own dir given another node's rank: torchrun's c10d rendezvous
    (--rdzv-backend c10d) numbers nodes in the order they join, so a relaunch may swap them, and each node's dir
    then captioned the other's keys again and left its own to no one. So: the dir holds work of other nodes of
    this machine's array task (a new array task sharing the dir is no swap), each claimed by another launch (a
    node of this launch arriving after the others wrote work is a dir the nodes share; an index claimed by no
    known launch, an earlier version's record or a launch outside torchrun, is not told apart)."""
    siblings = {i for i in indices if i % tasks == machine % tasks}
    return (launch is not None and bool(siblings) and all(launches.get(i) not in (None, launch) for i in siblings)
            and _holds_work(ckpt))


def _node_swap(ckpt: Path, machine: int, count: int, indices: set[int], nodes: int) -> UsageError:
    return UsageError(
        f"{ckpt} holds the keys of machine {', '.join(map(str, sorted(indices)))} of {count}"
        f"{_launch(count, indices, nodes)}, and no other node of this launch came to it within "
        f"{NODE_CLAIM_WAIT_S:.0f} s, but this node came up as machine {machine}{_launch(count, {machine}, nodes)}: "
        f"torchrun's c10d rendezvous numbers nodes in the order they join, so this dir would caption another node's "
        f"keys again and leave its own to no one. Give each node with a dir of its own a fixed rank: torchrun "
        f"--rdzv-backend static --master-addr <first node> --master-port <port> --nnodes {nodes} --node-rank <its "
        f"node>, relaunching this dir as {_relaunch(count, indices, nodes)}; or let the nodes share one "
        f"--checkpoint-dir")


def _record(machines: int, indices: list[int], nodes: int | None, launches: dict[int, str]) -> dict:
    return {"machines": machines, "indices": indices, **({} if nodes is None else {"nodes": nodes}),
            **({"launches": {str(i): run for i, run in sorted(launches.items())}} if launches else {})}


def _launch(count: int, indices: set[int], nodes: int | None) -> str:
    """' (array task T of A on node N of NODES)' for one machine of a multi-node run, else ''."""
    if nodes is None or nodes <= 1 or count % nodes or len(indices) != 1:
        return ""
    tasks, [i] = count // nodes, indices
    task = f"array task {i % tasks} of {tasks} on " if tasks > 1 else ""
    return f" ({task}node {i // tasks} of {nodes} of a multi-node torchrun)"


def _relaunch(count: int, indices: set[int], nodes: int | None) -> str:
    """How to start again a run that takes exactly the keys of machines `indices` of `count`, `nodes` of which
    per array task (None: not recorded, a file of an earlier version, which numbered no nodes: its count is the
    array's size or --num-workers). machine = array task + array size x node (workers.py)."""
    one = _one_machine(count, indices)
    by_hand = ("any of them, with any number of GPUs on one machine: "
               + (f"--num-workers {one[1]} --worker-index {one[0]}" if one else
                  f"--num-workers {count} --worker-index <one of those>"))
    if nodes is None or count % nodes:  # not recorded: an earlier version's file, whose count has no nodes in it
        return (f"one of {count} on one node each (a resubmitted array task: MACHINES={count} sbatch --array=<task> "
                f"runs/slurm_array.sbatch; a dir an earlier version wrote, which did not count the nodes of a "
                f"multi-node torchrun, is not split over nodes; {by_hand})")
    tasks = count // nodes
    if one is not None and (nodes == 1 or one[1] == tasks):  # an array task's dir (shared by all its nodes)
        array = (f"a resubmitted array task: MACHINES={one[1]} sbatch --array={one[0]} runs/slurm_array.sbatch"
                 if one[1] > 1 else "one machine")
        again = f", or again on {nodes} nodes (torchrun --nnodes {nodes})" if nodes > 1 else ""
        return f"task {one[0]} of {one[1]} ({array}{again}; {by_hand})"
    if nodes > 1 and len(indices) == 1:  # one node's own dir of a multi-node run
        [i] = indices
        array = (f" with --num-workers {tasks} --worker-index {i % tasks} where array task {i % tasks} of {tasks} "
                 f"is resubmitted alone (not MACHINES={count})" if tasks > 1 else "")
        return (f"node {i // tasks} of {nodes} (the same torchrun --nnodes {nodes} --node-rank {i // tasks}{array}; "
                f"{by_hand})")
    shape = f"{tasks} array tasks x {nodes} nodes" if nodes > 1 else f"an array of {count} tasks"
    return f"one of {count} ({shape}, as first launched; {by_hand})"


def _one_machine(count: int, indices: set[int]) -> tuple[int, int] | None:
    """(machine, machines) of the fewest machines whose one machine takes exactly these keys, else None."""
    for machines in range(1, count + 1):
        if count % machines == 0:
            for machine in range(machines):
                if _same_keys(count, indices, machine, machines):
                    return machine, machines
    return None


def _same_keys(count: int, indices: set[int], machine: int, machines: int) -> bool:
    """Whether machine of machines takes exactly the keys of indices of count (CRC32 residues): an array task's
    dir shared by its nodes (machine task + tasks x node, workers.py) relaunched on one node)."""
    span = math.lcm(count, machines)
    return all((r % count in indices) == (r % machines == machine) for r in range(span))
