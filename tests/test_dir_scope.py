"""The refusal of another machine count on a checkpoint dir (dir_scope.py) says how to relaunch the dir's own
machine. machines.json records the nodes per count: machine = array task + array size x node, so a count of 4
may be an array of 4 or of 2 tasks on 2 nodes each, where MACHINES=4 was wrong advice."""
from __future__ import annotations

import json

import pytest
from dummy_runs import clear_launch_env

from vlm_caption import dir_scope, store, workers
from vlm_caption.errors import UsageError


@pytest.fixture
def holds_work(monkeypatch):
    monkeypatch.setattr(store, "list_parts", lambda ckpt: ["a part"])


def refusal(ckpt, machine: int, machines: int, nodes: int = 1) -> str:
    with pytest.raises(UsageError) as e:
        dir_scope.check_machines(ckpt, machine, machines, nodes)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_an_array_task_of_one_node_is_told_its_array_size(tmp_path, holds_work):
    dir_scope.check_machines(tmp_path, 1, 2)
    line = refusal(tmp_path, 1, 4)
    assert "Relaunch it as task 1 of 2 (a resubmitted array task: MACHINES=2 sbatch --array=1" in line
    assert "--num-workers 2 --worker-index 1" in line and "--nnodes" not in line


def test_an_array_tasks_dir_shared_by_its_nodes_is_told_the_array_size_not_the_machine_count(tmp_path, monkeypatch):
    """Array task 1 of 2 on 2 nodes sharing a dir (machines 1 and 3 of 4): MACHINES=4 was advised."""
    for machine in (1, 3):  # both nodes record themselves as they start, before either has written a part
        dir_scope.check_machines(tmp_path, machine, 4, nodes=2)
    monkeypatch.setattr(store, "list_parts", lambda ckpt: ["a part"])
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text()) == {"machines": 4, "indices": [1, 3],
                                                                            "nodes": 2}
    line = refusal(tmp_path, 1, 8, nodes=2)  # resubmitted with MACHINES=4 on its 2 nodes
    assert "this run is machine 1 of 8 (array task 1 of 4 on node 0 of 2" in line
    assert "task 1 of 2 (a resubmitted array task: MACHINES=2 sbatch --array=1" in line
    assert "again on 2 nodes (torchrun --nnodes 2)" in line and "MACHINES=4" not in line
    assert "--num-workers 2 --worker-index 1" in line
    dir_scope.check_machines(tmp_path, 1, 2)  # as advised: the dir's keys exactly


def test_a_node_of_a_torchrun_without_an_array_is_told_its_node_rank(tmp_path, holds_work):
    dir_scope.check_machines(tmp_path, 1, 2, nodes=2)
    line = refusal(tmp_path, 0, 1)
    assert "machine 1 of 2 (node 1 of 2 of a multi-node torchrun)" in line
    assert "node 1 of 2 (the same torchrun --nnodes 2 --node-rank 1;" in line and "MACHINES" not in line


def test_a_file_without_nodes_is_an_earlier_versions_and_its_dir_goes_on_one_node_per_machine(tmp_path, holds_work):
    """An earlier version counted no nodes: its array task's dir shared by the nodes of a multi-node torchrun
    (machine 3 of 4 there) is refused on those nodes today (machine 3 of 8); the line says how it goes on."""
    (tmp_path / dir_scope.MACHINES_JSON).write_text(json.dumps({"machines": 4, "indices": [3]}))  # an older run's
    line = refusal(tmp_path, 3, 8, nodes=2)
    assert "one of 4 on one node each (a resubmitted array task: MACHINES=4 sbatch --array=<task>" in line
    assert "--num-workers 4 --worker-index 3" in line and "--node-rank" not in line


def test_one_count_split_another_way_forgets_the_nodes(tmp_path):
    """4 machines as 2 tasks x 2 nodes, then as an array of 4: the indices' nodes are no longer one number."""
    dir_scope.check_machines(tmp_path, 3, 4, nodes=2)
    dir_scope.check_machines(tmp_path, 1, 4)
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text()) == {"machines": 4, "indices": [1, 3]}


@pytest.fixture
def no_wait(monkeypatch):
    """A node of a swapped launch refuses at once, not after waiting for another node of its launch."""
    monkeypatch.setattr(dir_scope, "NODE_CLAIM_WAIT_S", 0.0)


def test_a_nodes_own_dir_given_another_nodes_rank_is_refused_and_told_the_static_rendezvous(tmp_path, holds_work,
                                                                                            no_wait):
    """torchrun's c10d rendezvous numbers nodes by join order: a relaunch gave node A's own dir (machine 0 of 2)
    rank 1, and it captioned node B's keys again (B's dir, A's)."""
    dir_scope.check_machines(tmp_path, 0, 2, nodes=2, launch="job-1")
    with pytest.raises(UsageError) as e:
        dir_scope.check_machines(tmp_path, 1, 2, nodes=2, launch="job-2")
    line = str(e.value)
    assert "holds the keys of machine 0 of 2 (node 0 of 2 of a multi-node torchrun)" in line and "\n" not in line
    assert "this node came up as machine 1 (node 1 of 2 of a multi-node torchrun)" in line
    assert "--rdzv-backend static" in line and "node 0 of 2 (the same torchrun --nnodes 2 --node-rank 0;" in line
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text()) == {
        "machines": 2, "indices": [0], "nodes": 2, "launches": {"0": "job-1"}}  # not recorded
    dir_scope.check_machines(tmp_path, 0, 2, nodes=2)  # finished by hand (--num-workers 2 --worker-index 0)
    with pytest.raises(UsageError, match="c10d rendezvous"):  # ... which keeps the dir a node's own
        dir_scope.check_machines(tmp_path, 1, 2, nodes=2, launch="job-3")
    dir_scope.check_machines(tmp_path, 0, 2, nodes=2, launch="job-3")  # relaunched as its own node


def test_nodes_that_share_a_dir_are_never_refused(tmp_path, monkeypatch):
    """A node of the same launch coming after another wrote work (a slow start; keyless rows are failed before the
    model loads), the next array task's nodes, a new launch whose nodes swapped, a dir first run by hand."""
    late, array, by_hand = tmp_path / "late", tmp_path / "array", tmp_path / "by_hand"
    for ckpt in (late, array, by_hand):
        ckpt.mkdir()
    monkeypatch.setattr(store, "list_parts", lambda ckpt: ["a part"])
    dir_scope.check_machines(late, 0, 2, nodes=2, launch="job-1")
    dir_scope.check_machines(late, 1, 2, nodes=2, launch="job-1")  # the same launch: the nodes share it
    for machine in (1, 0):  # relaunched, ranks swapped: every key of the run is in the dir
        dir_scope.check_machines(late, machine, 2, nodes=2, launch="job-2")
    for task in (0, 1):  # 2 array tasks of 2 nodes each, one dir: machine = task + 2 x node
        for node in (0, 1):
            dir_scope.check_machines(array, task + 2 * node, 4, nodes=2, launch=f"task-{task}")
    assert json.loads((array / dir_scope.MACHINES_JSON).read_text())["indices"] == [0, 1, 2, 3]
    dir_scope.check_machines(by_hand, 0, 2)  # --num-workers 2 --worker-index 0 on one machine
    dir_scope.check_machines(by_hand, 1, 2, nodes=2, launch="job-1")  # a 2-node torchrun now shares it
    assert json.loads((by_hand / dir_scope.MACHINES_JSON).read_text())["indices"] == [0, 1]


def test_a_node_of_a_new_launch_waits_for_the_other_nodes_of_its_launch(tmp_path, monkeypatch, caplog):
    """A dir the nodes share, whose node 1 never reached it before: relaunched, node 1 may come before node 0.
    It waits for a node of its own launch to claim the dir's other index, then goes on."""
    import threading

    monkeypatch.setattr(store, "list_parts", lambda ckpt: ["a part"])
    dir_scope.check_machines(tmp_path, 0, 2, nodes=2, launch="job-1")
    node0 = threading.Timer(1.0, dir_scope.check_machines, (tmp_path, 0, 2), {"nodes": 2, "launch": "job-2"})
    node0.start()
    dir_scope.check_machines(tmp_path, 1, 2, nodes=2, launch="job-2")  # waits for node 0, then records itself
    node0.join()
    assert "waiting up to 120 s for a node of this launch to come to it (a dir the nodes share)" in caplog.text
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text())["launches"] == {"0": "job-2", "1": "job-2"}


def as_rank(monkeypatch, rank: int, group_rank: int, launch: str) -> None:
    """torchrun --nnodes 2 --nproc-per-node 2: global rank `rank` on the node that got `group_rank`."""
    clear_launch_env(monkeypatch)
    for var, value in (("RANK", rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", rank % 2), ("LOCAL_WORLD_SIZE", 2),
                       ("GROUP_RANK", group_rank), ("GROUP_WORLD_SIZE", 2), ("TORCHELASTIC_RUN_ID", "none"),
                       ("SLURM_JOB_ID", 7), ("SLURM_RESTART_COUNT", launch)):  # (a requeued job)
        monkeypatch.setenv(var, str(value))


def test_a_relaunch_whose_rendezvous_swapped_the_nodes_is_refused_and_no_key_is_captioned_twice(
        tmp_path, monkeypatch, capsys, no_wait):
    from dummy_runs import dummy_args

    from batched_image_inference import main
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=16, broken=False, seed=4)
    dirs = {"A": tmp_path / "nodeA", "B": tmp_path / "nodeB"}
    for node, group in {"A": 0, "B": 1}.items():  # first launch: node A joined first
        for local in range(2):
            as_rank(monkeypatch, 2 * group + local, group, launch="0")
            assert main(dummy_args(data, dirs[node], "--max-images", "6")) == 0  # preempted
    for node, group in {"A": 1, "B": 0}.items():  # requeued: node B joined first
        as_rank(monkeypatch, 2 * group, group, launch="1")
        with pytest.raises(UsageError, match="c10d rendezvous numbers nodes in the order they join"):
            main(dummy_args(data, dirs[node]))
    for node, group in {"A": 0, "B": 1}.items():  # as advised: a fixed --node-rank per node
        for local in range(2):
            as_rank(monkeypatch, 2 * group + local, group, launch="2")
            assert main(dummy_args(data, dirs[node])) == 0
    clear_launch_env(monkeypatch)
    capsys.readouterr()
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", str(dirs["A"]), str(dirs["B"])]) == 0
    out = capsys.readouterr().out
    assert "16 rows" in out and "0 captioned more than once" in out, out


def test_a_dir_run_by_hand_then_claimed_by_a_node_is_that_nodes_own(tmp_path, holds_work, no_wait):
    """--num-workers 2 --worker-index 0 first (nodes 1 recorded), then node 0 of a 2-node torchrun: the claim kept
    "nodes": 1, so a requeue that swapped the nodes went by in this dir (and was refused in the other)."""
    dir_scope.check_machines(tmp_path, 0, 2)
    dir_scope.check_machines(tmp_path, 0, 2, nodes=2, launch="job-1")
    with pytest.raises(UsageError, match="c10d rendezvous"):
        dir_scope.check_machines(tmp_path, 1, 2, nodes=2, launch="job-2")


def test_two_srun_steps_of_one_job_are_two_launches(monkeypatch):
    """`srun torchrun --rdzv-id $SLURM_JOB_ID` twice in one job (a rerun after exit 3): one launch id hid a swap."""
    clear_launch_env(monkeypatch)
    for var, value in (("TORCHELASTIC_RUN_ID", "7"), ("SLURM_JOB_ID", "7"), ("SLURM_STEP_ID", "0")):
        monkeypatch.setenv(var, value)
    first = workers.launch_id()
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert workers.launch_id() != first and first == "7 (Slurm job 7, requeued 0, step 0)"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert workers.launch_id() == "7 (Slurm job 7, requeued 1, step 1)"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert workers.launch_id() is None  # not under torchrun: no claim


@pytest.mark.parametrize("edit", ['"nodes": 0', '"nodes": false', '"machines": 1e999', '"indices": [5]',
                                  '"launches": {"1": "x"}', '"launches": [1]'])
def test_a_machines_json_edited_out_of_range_is_set_aside(tmp_path, holds_work, edit):
    """"nodes": 0 was a ZeroDivisionError traceback (building a refusal line), 1e999 (JSON's way to write
    infinity) an OverflowError: like any unreadable file, it goes to quarantine/ and the count is recorded anew."""
    key = edit.split('"')[1]
    record = {"machines": 2, "indices": [0], "nodes": 2}
    text = json.dumps({k: v for k, v in record.items() if k != key})
    (tmp_path / dir_scope.MACHINES_JSON).write_text(text[:-1] + ", " + edit + "}")
    dir_scope.check_machines(tmp_path, 0, 1)  # one plain process
    recorded = json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text())
    assert recorded == {"machines": 1, "indices": [0], "nodes": 1}
    assert list((tmp_path / store.QUARANTINE_DIR).iterdir())
