"""A torchrun across machines (ranks of several nodes, WORLD_SIZE > LOCAL_WORLD_SIZE), each node with its own
checkpoint dir: the ranks of a node set their dir up without rank 0 of the whole job, which is elsewhere."""
from __future__ import annotations

import pytest
from dummy_runs import clear_launch_env, dummy_args

from batched_image_inference import main
from vlm_caption import store
from vlm_caption.errors import EXIT_OK


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("nodes") / "data", n=16, broken=False, seed=4)


def as_rank(monkeypatch, rank: int, local_rank: int) -> None:
    """What torchrun --nnodes 2 --nproc-per-node 2 sets for global rank `rank` (4 ranks, 2 a node)."""
    clear_launch_env(monkeypatch)
    for var, value in (("RANK", rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", 2)):
        monkeypatch.setenv(var, str(value))


def test_the_ranks_of_a_second_node_set_up_its_own_dir(data, tmp_path, monkeypatch):
    """Ranks 2 and 3 (the second node) waited 600 s for "worker 0 to write run.json" in their node-local dir,
    which rank 0 (on the first node, in its own dir) never writes, then failed with exit 1. The node's local
    rank 0 writes it now, and its local rank 1 joins the run it wrote."""
    real = store.CheckpointStore.open_run

    def short_wait(self, settings, overwrite, wait_for_leader=False, leader_timeout=600.0):
        return real(self, settings, overwrite, wait_for_leader, leader_timeout=3.0)  # the failure, in 3 s

    monkeypatch.setattr(store.CheckpointStore, "open_run", short_wait)
    ckpt = tmp_path / "node1"
    as_rank(monkeypatch, rank=2, local_rank=0)
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    run_id = store.read_run_json(ckpt)["run_id"]
    as_rank(monkeypatch, rank=3, local_rank=1)  # the node's other rank waits for its leader's run.json, and joins
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert store.read_run_json(ckpt)["run_id"] == run_id
    keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    assert {p.worker for p in store.list_parts(ckpt)} == {2, 3}
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
