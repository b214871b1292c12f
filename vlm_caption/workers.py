"""Which slice of the keys this process captions, from how it was launched.

Three launch levels nest, outermost first; each multiplies the number of workers:

    machine   a Slurm job array task (SLURM_ARRAY_TASK_*), or --num-workers/--worker-index given by hand,
              times the node of a multi-node torchrun (GROUP_RANK of WORLD_SIZE / LOCAL_WORLD_SIZE) inside it
    task      a Slurm step started with `srun -n N` (SLURM_PROCID of SLURM_STEP_NUM_TASKS)
    rank      torchrun / accelerate launch (RANK of WORLD_SIZE; LOCAL_RANK of LOCAL_WORLD_SIZE across nodes)

worker = machine + machines * (task + tasks * rank): the outer levels are the low digits, so the keys of a
machine (worker % machines: what a Slurm array task's or a node's own checkpoint dir holds) and of a task do
not depend on how many processes run inside them. A resubmitted array task on a node with another number of
GPUs (or srun tasks) takes the same keys; with the outer level as the high digit it took another set,
captioning keys of other tasks' dirs again and leaving some of its own to nobody. A multi-node torchrun's node
is a machine: its ranks are numbered by node then local rank (the srun level, which started the nodes, is not
counted twice), so its dir records "machine <node> of <nodes>" (dir_scope.py) and a relaunch of that dir alone
is refused unless it is that machine (torchrun --nnodes/--node-rank as before, or --num-workers/--worker-index
with any number of GPUs). Before, the global RANK was the worker: a node's dir recorded one machine and a plain
relaunch of it captioned every key, other nodes' again. RANK set by hand with no LOCAL_WORLD_SIZE (ranks that
count across machines, node unknown) stays the worker as is, in place of the task level.
"""
from __future__ import annotations

import os

from .errors import UsageError


def _env_ints(*names: str) -> list[int | None]:
    values = [os.environ.get(n) for n in names]
    try:
        return [None if v is None else int(v) for v in values]
    except ValueError:
        raise UsageError(f"{' / '.join(names)} in the environment are not integers: "
                         f"{', '.join(f'{n}={v}' for n, v in zip(names, values))}") from None


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun / accelerate launch, else (0, 1)."""
    rank, world = _env_ints("RANK", "WORLD_SIZE")
    if rank is None and world not in (None, 1) or world is None and rank not in (None, 0):
        raise UsageError(f"{'WORLD_SIZE' if rank is None else 'RANK'} is set without "
                         f"{'RANK' if rank is None else 'WORLD_SIZE'}: torchrun sets both; set both or neither")
    rank, world = 0 if rank is None else rank, 1 if world is None else world  # WORLD_SIZE=0: refused below
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def leads_its_machine() -> bool:
    """Whether this process sets a new checkpoint dir up (writes run.json) while the other ranks of its machine
    wait for it: torchrun's rank 0 of this machine (LOCAL_RANK 0), not of the whole job. The ranks of a multi-node
    torchrun on another node than rank 0's, each node with its own dir, waited 10 minutes for a run.json that
    no rank of their dir would write, then failed. Several machines' leaders of one shared dir take turns
    (store.CheckpointStore.open_run). A RANK without LOCAL_RANK (set by hand) leads as rank 0 only."""
    local_rank = _env_ints("LOCAL_RANK")[0]
    return (distributed_rank()[0] if local_rank is None else local_rank) == 0


def _ranks_span_machines(world: int) -> bool:
    local_world = _env_ints("LOCAL_WORLD_SIZE")[0]
    return world > 1 and (local_world is None or world > local_world)


def srun_slice() -> tuple[int, int] | None:
    """(task, tasks) of this process in a Slurm step of several tasks (`srun -n N`), else None. The batch
    script itself (sbatch --ntasks N, no srun) is one process: it has no SLURM_STEP_NUM_TASKS."""
    task, tasks = _env_ints("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
    if task is None or tasks is None or tasks <= 1:
        return None
    if not 0 <= task < tasks:
        raise UsageError(f"SLURM_PROCID={task} is outside SLURM_STEP_NUM_TASKS={tasks}")
    return task, tasks


def array_slice() -> tuple[int, int] | None:
    """(index, count) of this task in a Slurm job array, when there is one: --array=A-B[:STEP]."""
    task_id, count, first, step = _env_ints("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                            "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
    if task_id is None or count is None:
        return None
    first, step = first or 0, step or 1
    if count == 1 and task_id != 0:
        # A rerun of one task of a bigger array (sbatch --array=3): alone, it would caption every key.
        raise UsageError(f"this Slurm array has one task, id {task_id}: if it reruns task {task_id} of a bigger "
                         f"array, pass --num-workers <that array's size> --worker-index {task_id} "
                         "(runs/slurm_array.sbatch: MACHINES=<size>); for one machine, submit without --array")
    index, off_step = divmod(task_id - first, step)
    if off_step or not 0 <= index < count:
        raise UsageError(f"Slurm array task {task_id} (of {count}, from {first} step {step}) maps to no slice: "
                         "use --array=A-B or A-B:STEP, or pass --num-workers/--worker-index")
    return index, count


def node_slice() -> tuple[int, int] | None:
    """(node, nodes) of this process in a torchrun across machines (WORLD_SIZE > LOCAL_WORLD_SIZE), else None:
    GROUP_RANK (torchrun's --node-rank) of WORLD_SIZE / LOCAL_WORLD_SIZE."""
    rank, world = distributed_rank()
    local_world, group_rank, group_world = _env_ints("LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
    if local_world is None or world <= local_world:
        return None
    if local_world < 1 or world % local_world or group_world not in (None, world // local_world):
        raise UsageError(f"WORLD_SIZE={world} is not LOCAL_WORLD_SIZE={local_world} processes on each of "
                         f"{group_world or 'its'} nodes: start the same --nproc-per-node on every node")
    nodes = world // local_world
    node = rank // local_world if group_rank is None else group_rank
    if not 0 <= node < nodes:
        raise UsageError(f"GROUP_RANK={node} is outside the {nodes} nodes of WORLD_SIZE={world}")
    return node, nodes


def _rank_in_node(rank: int, local_world: int) -> int:
    local_rank = _env_ints("LOCAL_RANK")[0]
    local_rank = rank % local_world if local_rank is None else local_rank
    if not 0 <= local_rank < local_world:
        raise UsageError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
    return local_rank


def worker_slice(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """(worker_index, num_workers) of this process over every machine, task and rank (module doc)."""
    if num_workers is not None and num_workers < 1:  # before "together": 0 is the mistake to name
        raise UsageError(f"--num-workers must be 1 or more, got {num_workers}")
    if (num_workers is None) != (worker_index is None):
        raise UsageError("give --num-workers and --worker-index together")
    rank, world = distributed_rank()
    index, count = machine_slice(num_workers, worker_index)  # a node of a multi-node torchrun included
    if node_slice() is not None:  # ranks numbered within the node; the node is part of the machine
        local_world = ranks_per_machine()
        return index + count * _rank_in_node(rank, local_world), count * local_world
    if num_workers is not None or _ranks_span_machines(world):  # by hand: Slurm's own levels are not read
        tasks = (0, 1)
    else:
        tasks = srun_slice() or (0, 1)
    return index + count * (tasks[0] + tasks[1] * rank), count * tasks[1] * world


def launch_id() -> str | None:
    """Which launch of a torchrun this process is of, the same on all its nodes (dir_scope's node claims): its
    rendezvous id (--rdzv-id), and where there is one the Slurm job's id, requeue count and step (a requeued job
    keeps its id, a --rdzv-id of $SLURM_JOB_ID with it, and a job may `srun torchrun` twice). None outside
    torchrun."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    job, env = os.environ.get("SLURM_JOB_ID"), os.environ.get
    return run if job is None else (f"{run} (Slurm job {job}, requeued {env('SLURM_RESTART_COUNT', '0')}, step "
                                    f"{env('SLURM_STEP_ID', 'batch')})")


def under_torchrun() -> bool:
    """Started by torchrun's elastic agent (accelerate launch uses it too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def ranks_per_machine() -> int:
    """How many torchrun / accelerate processes share this machine (1 without them)."""
    world, local_world = _env_ints("WORLD_SIZE", "LOCAL_WORLD_SIZE")
    return local_world if local_world is not None else world or 1


def srun_tasks_per_node() -> int:
    """The most tasks of this Slurm step on one node (SLURM_STEP_TASKS_PER_NODE, e.g. "8(x2),4"), else 1."""
    most = 1
    for part in os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        count = part.split("(")[0].strip()
        if count.isdigit():
            most = max(most, int(count))
    return most if srun_slice() is not None else 1


def processes_per_machine() -> int:
    """How many captioning processes share this machine's memory: torchrun / accelerate ranks, or the tasks
    of one srun step (on its busiest node), each of which may run ranks of its own."""
    return ranks_per_machine() * srun_tasks_per_node()


def local_index() -> int:
    """This process's place among the processes of its machine: which GPU it takes."""
    local_rank, local_id = _env_ints("LOCAL_RANK", "SLURM_LOCALID")
    if local_rank is not None:
        return local_rank
    return local_id if srun_slice() is not None and local_id is not None else 0


def machine_slice(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """(index, count) of this machine (a Slurm array task, or --num-workers/--worker-index given by hand, times
    the node of a multi-node torchrun): its keys are those whose CRC32 mod count is index (worker_slice),
    whatever runs inside it."""
    if num_workers is not None and worker_index is not None:
        if num_workers < 1 or not 0 <= worker_index < num_workers:
            raise UsageError(f"--worker-index must be in [0, --num-workers), got {worker_index} of {num_workers}")
        index, count = worker_index, num_workers
    else:
        index, count = array_slice() or (0, 1)
    node, nodes = node_slice() or (0, 1)
    return index + count * node, count * nodes


def sibling_workers(worker: int, num_workers: int) -> list[int]:
    """The worker ids of the torchrun / accelerate ranks started with this one on this machine (this one
    included): the same launcher, so each one's lock file names it (locks.DirLock.not_started). Across nodes,
    this node's local ranks (worker = machine + machines x LOCAL_RANK, worker_slice), whether the node has a dir
    of its own or shares one with the others: another node's ranks have another launcher (counted as not
    started, the last rank of a shared dir would never merge). Before, a node's local rank 0 ending before its
    local rank 1 reached the dir merged it alone. [] when not under a launcher, or when its ranks span machines
    with no LOCAL_WORLD_SIZE to tell the node's ones."""
    rank, world = distributed_rank()
    if not under_torchrun() or world == 1:
        return []
    if node_slice() is not None:
        local_world = ranks_per_machine()
        local_rank, stride = _rank_in_node(rank, local_world), num_workers // local_world
        return [worker + stride * (r - local_rank) for r in range(local_world)]
    if _ranks_span_machines(world):
        return []
    stride = num_workers // world  # worker = outer + outer workers x rank (worker_slice)
    return [worker + stride * (r - rank) for r in range(world)]


def usable_cores() -> int:
    """The cores this process may use: a Slurm job's or taskset's share of the machine, not all of its cores
    (os.cpu_count), which would start one download or decode process per core of a big node."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1
