"""The refusal of another machine count on a checkpoint dir (dir_scope.py) says how to relaunch the dir's own
machine. machines.json records the nodes per count: machine = array task + array size x node, so a count of 4
may be an array of 4 or of 2 tasks on 2 nodes each, where MACHINES=4 was wrong advice."""
from __future__ import annotations

import json

import pytest

from vlm_caption import dir_scope, store
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


def test_an_array_tasks_dir_shared_by_its_nodes_is_told_the_array_size_not_the_machine_count(tmp_path, holds_work):
    """Array task 1 of 2 on 2 nodes sharing a dir (machines 1 and 3 of 4): MACHINES=4 was advised."""
    for machine in (1, 3):
        dir_scope.check_machines(tmp_path, machine, 4, nodes=2)
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
