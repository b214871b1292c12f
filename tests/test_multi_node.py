"""A torchrun across machines (ranks of several nodes, WORLD_SIZE > LOCAL_WORLD_SIZE), each node with its own
checkpoint dir: the ranks of a node set their dir up without rank 0 of the whole job, which is elsewhere."""
from __future__ import annotations

import pytest
from dummy_runs import clear_launch_env, dummy_args, merged_rows

from batched_image_inference import main
from vlm_caption import store
from vlm_caption.errors import EXIT_OK, UsageError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("nodes") / "data", n=16, broken=False, seed=4)


def as_rank(monkeypatch, rank: int, local_rank: int, per_node: int = 2) -> None:
    """What torchrun --nnodes 2 --nproc-per-node 2 sets for global rank `rank` (4 ranks, 2 a node)."""
    clear_launch_env(monkeypatch)
    for var, value in (("RANK", rank), ("WORLD_SIZE", 2 * per_node), ("LOCAL_RANK", local_rank),
                       ("LOCAL_WORLD_SIZE", per_node), ("GROUP_RANK", rank // per_node), ("GROUP_WORLD_SIZE", 2)):
        monkeypatch.setenv(var, str(value))


def dir_keys(ckpt) -> list[str]:
    return [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]


def test_the_ranks_of_a_second_node_set_up_its_own_dir(data, tmp_path, monkeypatch):
    """Ranks 2 and 3 (the second node) waited 600 s for "worker 0 to write run.json" in their node-local dir,
    which rank 0 (on the first node, in its own dir) never writes, then failed with exit 1. The node's local
    rank 0 writes it now, and its local rank 1 joins the run it wrote."""
    real = store.CheckpointStore.open_run

    def short_wait(self, settings, overwrite, wait_for_leader=False, leader_timeout=600.0, **kwargs):
        return real(self, settings, overwrite, wait_for_leader, leader_timeout=3.0, **kwargs)  # the failure, in 3 s

    monkeypatch.setattr(store.CheckpointStore, "open_run", short_wait)
    ckpt = tmp_path / "node1"
    as_rank(monkeypatch, rank=2, local_rank=0)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    run_id = store.read_run_json(ckpt)["run_id"]
    as_rank(monkeypatch, rank=3, local_rank=1)  # the node's other rank waits for its leader's run.json, and joins
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert store.read_run_json(ckpt)["run_id"] == run_id
    keys = dir_keys(ckpt)
    assert {p.worker for p in store.list_parts(ckpt)} == {1, 3}  # node 1 of 2: workers 1 + 2 x local rank
    assert keys and len(keys) == len(set(keys))


def test_a_rank_set_by_hand_without_a_local_rank_still_waits_for_rank_0(monkeypatch):
    from vlm_caption import workers

    clear_launch_env(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not workers.leads_its_machine()
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's rank 1 of a second node
    assert workers.leads_its_machine()
    clear_launch_env(monkeypatch)
    assert workers.leads_its_machine()  # one process, no launcher


def test_a_nodes_own_dir_relaunched_alone_is_refused_and_finishes_as_that_node(data, tmp_path, monkeypatch, capsys):
    """Node 1's dir of a 2-node torchrun recorded "machine 0 of 1": relaunched as one plain process it was
    allowed and captioned every key, node 0's again (--merge-only: captioned more than once). The node is a
    machine of the run now: its dir records machine 1 of 2, a plain relaunch is refused in one line saying how
    to relaunch it, and a relaunch as that machine (any number of GPUs) captions only the node's keys."""
    dirs = [tmp_path / "n0", tmp_path / "n1"]
    for rank in range(4):
        as_rank(monkeypatch, rank=rank, local_rank=rank % 2)
        assert main(dummy_args(data, dirs[rank // 2])) == EXIT_OK
    done = dir_keys(dirs[1])
    clear_launch_env(monkeypatch)
    with pytest.raises(UsageError, match="machine 1 of 2.*--nnodes 2 --node-rank 1.*--num-workers 2 --worker-index 1"):
        main(dummy_args(data, dirs[1]))
    assert sorted(dir_keys(dirs[1])) == sorted(done)  # nothing captioned by the refused run
    as_rank(monkeypatch, rank=1, local_rank=0, per_node=1)  # the same node, relaunched with 1 GPU a node
    assert main(dummy_args(data, dirs[1], "--overwrite")) == EXIT_OK
    assert sorted(dir_keys(dirs[1])) == sorted(done)  # (--overwrite: recaptioned, the same keys)
    clear_launch_env(monkeypatch)  # or by hand, as machine 1 of 2
    assert main(dummy_args(data, dirs[1], "--overwrite", "--num-workers", "2", "--worker-index", "1")) == EXIT_OK
    assert sorted(dir_keys(dirs[1])) == sorted(done)
    capsys.readouterr()
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", *map(str, dirs)]) == EXIT_OK
    assert "0 missing, 0 captioned more than once" in capsys.readouterr().out


def test_a_dir_shared_by_the_nodes_is_the_whole_run(data, tmp_path, monkeypatch, capsys):
    """Both nodes in one dir: it holds every key, so any later launch of it is allowed and captions nothing."""
    ckpt = tmp_path / "shared"
    for rank in range(4):
        as_rank(monkeypatch, rank=rank, local_rank=rank % 2)
        assert main(dummy_args(data, ckpt)) == EXIT_OK
    done = sorted(dir_keys(ckpt))
    assert len(done) == len(set(done)) == 16
    clear_launch_env(monkeypatch)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert sorted(dir_keys(ckpt)) == done
    capsys.readouterr()
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(ckpt)]) == EXIT_OK
    assert "0 missing, 0 captioned more than once" in capsys.readouterr().out


def test_node_and_local_rank_make_the_worker_and_a_node_is_a_machine(monkeypatch):
    from vlm_caption import workers

    seen = []
    for node in range(3):
        for local in range(4):
            clear_launch_env(monkeypatch)
            for var, value in (("RANK", node * 4 + local), ("WORLD_SIZE", 12), ("LOCAL_RANK", local),
                               ("LOCAL_WORLD_SIZE", 4), ("GROUP_RANK", node), ("SLURM_ARRAY_TASK_ID", 1),
                               ("SLURM_ARRAY_TASK_COUNT", 2)):
                monkeypatch.setenv(var, str(value))
            worker, count = workers.worker_slice(None, None)
            assert count == 24 and workers.machine_slice(None, None) == (1 + 2 * node, 6) == (worker % 6, 6)
            seen.append(worker)
    assert sorted(seen) == list(range(1, 24, 2))  # array task 1's keys, each worker once
    monkeypatch.setenv("WORLD_SIZE", "14")  # 4 processes a node do not make 14
    with pytest.raises(UsageError, match="same --nproc-per-node"):
        workers.worker_slice(None, None)


def under_torchrun_on_node(monkeypatch, rank: int, per_node: int = 2) -> None:
    """as_rank, started by the torchrun agent of the rank's node: its lock files name that node's launcher."""
    from vlm_caption import locks

    as_rank(monkeypatch, rank=rank, local_rank=rank % per_node, per_node=per_node)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setattr(locks, "_launcher", lambda: f"launched by the agent of node {rank // per_node}")


def test_a_nodes_local_rank_0_ending_first_in_its_own_dir_leaves_the_merge_to_its_local_rank_1(
        data, tmp_path, monkeypatch, capsys):
    """Node 1's local rank 0 finished before its local rank 1 reached the node's dir: sibling_workers gave []
    for ranks spanning nodes, so it merged half the node's keys alone and wrote the card (rank 1 merged again)."""
    ckpt = tmp_path / "node1"
    under_torchrun_on_node(monkeypatch, rank=2)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    out = capsys.readouterr().out
    assert not (ckpt / store.MERGED).exists(), out
    assert "1 other worker of this launch (3)" in out and "not started yet" in out, out  # node 1: workers 1, 3
    under_torchrun_on_node(monkeypatch, rank=3)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert "merged into" in capsys.readouterr().out
    assert sorted(r["key"] for r in merged_rows(ckpt)) == sorted(dir_keys(ckpt))
    assert {p.worker for p in store.list_parts(ckpt)} == {1, 3}


def test_in_a_dir_shared_by_the_nodes_each_node_waits_for_its_own_ranks_only(data, tmp_path, monkeypatch, capsys):
    """In one dir for both nodes, a node's local rank 0 ending first leaves the merge to its local rank 1 too;
    the other node's ranks (another launcher, whose lock files never name this one) are no siblings: counted as
    not started, the last rank of the run would never merge."""
    ckpt = tmp_path / "shared"
    for rank in (0, 2):  # each node's local rank 0, first
        under_torchrun_on_node(monkeypatch, rank=rank)
        assert main(dummy_args(data, ckpt)) == EXIT_OK
        out = capsys.readouterr().out
        assert not (ckpt / store.MERGED).exists(), out
        assert f"1 other worker of this launch ({rank // 2 + 2})" in out, out
    under_torchrun_on_node(monkeypatch, rank=1)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    under_torchrun_on_node(monkeypatch, rank=3)  # the last rank of the run
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert "merged into" in capsys.readouterr().out
    assert sorted(r["key"] for r in merged_rows(ckpt)) == sorted(dir_keys(ckpt))
    assert len(dir_keys(ckpt)) == 16


def test_an_array_tasks_dir_shared_by_its_nodes_resumes_on_one_node(data, tmp_path, monkeypatch, capsys):
    """Array task 1 of 2 on two nodes sharing the task's dir: it records machines 1 and 3 of 4 (node-major). The
    task resubmitted on one node is machine 1 of 2: exactly the dir's keys (CRC32 mod 2 = 1), so it resumes; it
    was refused as 'another set' though before nodes were machines any node count was. Another array size
    (task 1 of 3) is still refused."""
    ckpt = tmp_path / "task-1"
    for rank in range(4):
        as_rank(monkeypatch, rank=rank, local_rank=rank % 2)
        for var, value in (("SLURM_ARRAY_TASK_ID", 1), ("SLURM_ARRAY_TASK_COUNT", 2), ("SLURM_ARRAY_TASK_MIN", 0)):
            monkeypatch.setenv(var, str(value))
        assert main(dummy_args(data, ckpt)) == EXIT_OK
    done = sorted(dir_keys(ckpt))
    assert done and len(done) == len(set(done))
    clear_launch_env(monkeypatch)
    assert main(dummy_args(data, ckpt, "--num-workers", "2", "--worker-index", "1")) == EXIT_OK
    assert sorted(dir_keys(ckpt)) == done  # nothing captioned again, nothing new
    with pytest.raises(UsageError, match="machine 1 of 2.*this run is machine 1 of 3"):
        main(dummy_args(data, ckpt, "--num-workers", "3", "--worker-index", "1"))


def test_a_node_of_a_multi_node_array_task_is_told_how_to_relaunch_as_that_node(data, tmp_path, monkeypatch):
    """Array task 1 of 2 on two nodes, a dir per node: node 1's dir holds machine 3 of 4. Resubmitted on one node,
    the refusal advised MACHINES=4 (array task 1 with MACHINES=4 is machine 1 of 4, node 0's keys; on two nodes
    machine 1 or 5 of 8). It now names the node of the task and --num-workers 4 --worker-index 3, which resumes."""
    array = (("SLURM_ARRAY_TASK_ID", 1), ("SLURM_ARRAY_TASK_COUNT", 2), ("SLURM_ARRAY_TASK_MIN", 0))
    dirs = [tmp_path / "task-1-n0", tmp_path / "task-1-n1"]
    for rank in range(4):
        as_rank(monkeypatch, rank=rank, local_rank=rank % 2)
        for var, value in array:
            monkeypatch.setenv(var, str(value))
        assert main(dummy_args(data, dirs[rank // 2])) == EXIT_OK
    done = sorted(dir_keys(dirs[1]))
    clear_launch_env(monkeypatch)
    with pytest.raises(UsageError) as e:
        main(dummy_args(data, dirs[1], "--num-workers", "2", "--worker-index", "1"))
    line = str(e.value)
    assert "machine 3 of 4 (array task 1 of 2 on node 1 of 2 of a multi-node torchrun)" in line
    assert "--nnodes 2 --node-rank 1 with --num-workers 2 --worker-index 1" in line
    assert "--num-workers 4 --worker-index 3" in line and "with MACHINES" not in line
    assert main(dummy_args(data, dirs[1], "--num-workers", "4", "--worker-index", "3")) == EXIT_OK  # as advised
    assert sorted(dir_keys(dirs[1])) == done


def test_a_rank_whose_leader_never_comes_names_the_rank_it_waited_for(tmp_path, monkeypatch):
    """The wait's end said 'waited 600 s for worker 0 to write run.json'; on a second node the rank that sets the
    dir up is that node's LOCAL_RANK 0 (worker 1 here), not worker 0."""
    from vlm_caption.config import RunConfig
    from vlm_caption.errors import FatalError

    as_rank(monkeypatch, rank=3, local_rank=1)
    settings = RunConfig(model="dummy-model", backend="dummy", data_dir=str(tmp_path)).run_settings()
    writer = store.CheckpointStore(tmp_path / "ckpt", 3, num_workers=4)
    with pytest.raises(FatalError, match="for LOCAL_RANK 0 of this machine") as e:
        writer.open_run(settings, overwrite=False, wait_for_leader=True, leader_timeout=0.3)
    assert "worker 0" not in str(e.value)
