"""Many processes and many machines: torchrun / accelerate ranks, worker slices, merge with coverage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dummy_runs import clear_launch_env

from batched_image_inference import main
from vlm_caption import store, workers
from vlm_caption.config import RunConfig
from vlm_caption.errors import EXIT_COVERAGE, EXIT_OK, UsageError

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def keys_in(ckpt: Path) -> list[str]:
    return [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]


def args_for(model: Path, data: Path, ckpt: Path, *extra: str) -> list[str]:
    """Splitting, merging and coverage do not depend on the model: the dummy backend, unless `extra` says."""
    return ["--model", str(model), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--max-tokens", "6", "--batch-size", "2", "--checkpoint-every", "4", "--num-loader-workers", "1",
            "--backend", "dummy", *extra]


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("clean") / "data", n=24, broken=False, seed=3)


@pytest.fixture(scope="module")
def expected_keys(clean_data):
    import pyarrow.parquet as pq

    return sorted(pq.read_table(clean_data / "full_metadata.parquet", columns=["key"]).column("key").to_pylist())


def launch(launcher: list[str], args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, str(REPO / "batched_image_inference.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


TORCHRUN = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
ACCELERATE = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.parametrize("launcher", [TORCHRUN, ACCELERATE], ids=["torchrun", "accelerate"])
def test_two_ranks_cover_the_same_keys_as_one_process(launcher, tiny_model_dir, clean_data, expected_keys, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = launch(launcher, args_for(tiny_model_dir, clean_data, ckpt), tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    keys = keys_in(ckpt)
    assert sorted(keys) == expected_keys  # every key once
    assert {p.worker for p in store.list_parts(ckpt)} == {0, 1}  # both ranks worked
    import pyarrow.parquet as pq

    assert pq.read_table(ckpt / store.MERGED, columns=["key"]).column("key").to_pylist() == expected_keys


def test_killed_rank_then_rerun_with_another_world_size_completes(tiny_model_dir, clean_data, expected_keys, tmp_path):
    import psutil

    ckpt = tmp_path / "ckpt"
    args = args_for(tiny_model_dir, clean_data, ckpt, "--max-tokens", "40", "--min-tokens", "40",
                    "--backend", "transformers")  # slow enough to be killed mid-run
    proc = launch(TORCHRUN, args, tmp_path)
    deadline = time.monotonic() + 180
    while not store.list_parts(ckpt) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "batched_image_inference" in " ".join(c.cmdline())]
    assert ranks, "no rank process found"
    os.kill(ranks[-1].pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert 0 < len(keys_in(ckpt)) < len(expected_keys)
    # A single process picks up the rest: done keys come from every rank's parts.
    assert main(args) == EXIT_OK
    assert sorted(keys_in(ckpt)) == expected_keys


def test_worker_slices_in_separate_dirs_merge_with_full_coverage(tiny_model_dir, clean_data, expected_keys, tmp_path,
                                                                 capsys):
    dirs = [tmp_path / f"machine{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        assert main(args_for(tiny_model_dir, clean_data, d, "--num-workers", "2", "--worker-index", str(i))) == EXIT_OK
    assert not set(keys_in(dirs[0])) & set(keys_in(dirs[1]))

    code = main(["--merge-only", "--data-dir", str(clean_data), "--checkpoint-dir", *map(str, dirs), "--no-push"])
    assert code == EXIT_OK
    import json

    import pyarrow.parquet as pq

    coverage = json.loads((dirs[0] / "coverage.json").read_text())
    assert coverage["missing"] == 0 and coverage["duplicated"] == 0 and coverage["captioned"] == len(expected_keys)
    assert pq.read_table(dirs[0] / store.MERGED, columns=["key"]).column("key").to_pylist() == expected_keys

    # One machine's slice alone: the other half is reported missing, by key, and the exit code says so.
    capsys.readouterr()
    code = main(["--merge-only", "--data-dir", str(clean_data), "--checkpoint-dir", str(dirs[1]), "--no-push"])
    out = capsys.readouterr().out
    assert code == EXIT_COVERAGE
    missing = sorted(keys_in(dirs[0]))
    assert f"{len(missing)} missing" in out and missing[0] in out
    assert json.loads((dirs[1] / "coverage.json").read_text())["missing_keys"] == missing


def test_merge_reports_a_key_captioned_twice(tiny_model_dir, clean_data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    main(args_for(tiny_model_dir, clean_data, a, "--max-images", "3"))
    main(args_for(tiny_model_dir, clean_data, b, "--max-images", "3"))
    code = main(["--merge-only", "--data-dir", str(clean_data), "--max-images", "3", "--checkpoint-dir", str(a),
                 str(b), "--no-push"])
    assert code == EXIT_COVERAGE
    assert "3 captioned more than once" in capsys.readouterr().out
    import pyarrow.parquet as pq

    merged = pq.read_table(a / store.MERGED, columns=["key"]).column("key").to_pylist()
    assert len(merged) == len(set(merged)) == 3  # the merged file keeps one row per key


def test_worker_slice_defaults_from_slurm_and_torch_distributed(monkeypatch):
    clear_launch_env(monkeypatch)
    assert RunConfig().worker_slice() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert RunConfig().worker_slice() == (3, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # arrays numbered 1..4
    assert RunConfig().worker_slice() == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")  # 8 GPUs on each of 4 machines
    assert RunConfig().worker_slice() == (2 + 4 * 1, 32)
    assert RunConfig(num_workers=2, worker_index=1).worker_slice() == (1 + 2 * 1, 16)  # flags beat Slurm
    with pytest.raises(UsageError):
        RunConfig(num_workers=2, worker_index=2).worker_slice()
    with pytest.raises(UsageError):
        RunConfig(num_workers=2).worker_slice()


def test_worker_slice_from_srun_tasks_stepped_arrays_and_partial_environments(monkeypatch):
    clear_launch_env(monkeypatch)
    # srun -n 4: each task a worker. The batch script itself (no SLURM_STEP_NUM_TASKS) is one process.
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert RunConfig().worker_slice() == (0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert RunConfig().worker_slice() == (2, 4)
    # srun -n 4, each task a torchrun --standalone of 8 GPUs: tasks x local ranks.
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert RunConfig().worker_slice() == (2 + 4 * 5, 32)
    # A multi-node torchrun (ranks already count across the 4 nodes): the srun level is not counted twice;
    # the node (21 // 8) is the low digit, the local rank (21 % 8) the high one.
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("RANK", "21")
    assert RunConfig().worker_slice() == (2 + 4 * 5, 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # RANK=$SLURM_PROCID set by hand: the same
    assert RunConfig().worker_slice() == (21, 32)
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var)
    # A stepped array, --array=0-14:2: tasks 0, 2, ..., 14 are slices 0..7.
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    assert RunConfig().worker_slice() == (3, 8)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    with pytest.raises(UsageError, match="maps to no slice"):
        RunConfig().worker_slice()
    # One task of a bigger array resubmitted (sbatch --array=3): it would caption every key; refused.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    with pytest.raises(UsageError, match="--worker-index 3"):
        RunConfig().worker_slice()
    assert RunConfig(num_workers=8, worker_index=3).worker_slice() == (3, 8)
    clear_launch_env(monkeypatch)
    # Half a torchrun environment: WORLD_SIZE=4 alone would caption a quarter of the keys and exit 0.
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="without RANK"):
        RunConfig().worker_slice()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert RunConfig().worker_slice() == (0, 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "0")  # garbage: it ran as one process of one
    with pytest.raises(UsageError, match="outside WORLD_SIZE=0"):
        RunConfig().worker_slice()


def test_the_gpu_of_a_process_is_its_place_on_the_machine(monkeypatch):
    clear_launch_env(monkeypatch)
    assert workers.local_index() == 0
    monkeypatch.setenv("SLURM_LOCALID", "3")  # the batch script: one process, GPU 0
    assert workers.local_index() == 0
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun -n 8 on one node
    assert workers.local_index() == 3
    monkeypatch.setenv("LOCAL_RANK", "5")  # torchrun's own count wins
    assert workers.local_index() == 5


def test_merge_refuses_dirs_of_different_runs(tiny_model_dir, clean_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(args_for(tiny_model_dir, clean_data, a, "--max-images", "2"))
    main(args_for(tiny_model_dir, clean_data, b, "--max-images", "2", "--max-tokens", "3"))
    with pytest.raises(UsageError, match="different runs"):
        main(["--merge-only", "--data-dir", str(clean_data), "--checkpoint-dir", str(a), str(b), "--no-push"])
    # Another data dir than the runs captioned: refused before the merge would write a file of 0 rows.
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other_data"
    shutil.copytree(clean_data, other)
    meta = pq.read_table(other / "full_metadata.parquet")
    keys = pa.array(["x" + k for k in meta.column("key").to_pylist()])
    pq.write_table(meta.set_column(meta.schema.get_field_index("key"), "key", keys), other / "full_metadata.parquet")
    merged = (a / store.MERGED).read_bytes()
    with pytest.raises(UsageError, match="none of the 2 captioned keys of the checkpoint dir"):
        main(["--merge-only", "--data-dir", str(other), "--checkpoint-dir", str(a), "--no-push"])
    assert (a / store.MERGED).read_bytes() == merged  # a finished merge is not overwritten with nothing
    # A typo among the dirs (or an unmatched glob) is refused, not merged as a dir whose keys are all missing.
    (tmp_path / "empty").mkdir()
    for bad, says in ((tmp_path / "typo", "does not exist"), (tmp_path / "ck_d*", "does not exist"),
                      (tmp_path / "empty", "holds no run")):
        with pytest.raises(UsageError, match=says):
            main(["--merge-only", "--data-dir", str(clean_data), "--checkpoint-dir", str(a), str(bad), "--no-push"])
        assert bad.name == "empty" or not bad.exists()


def test_device_map_spreading_is_refused_with_several_processes_per_machine(monkeypatch):
    clear_launch_env(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UsageError, match="one process per machine"):
        RunConfig(device_map="auto", backend="dummy").validate()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process on each of 8 machines: each may spread
    assert workers.ranks_per_machine() == 1


def test_a_worker_ending_non_zero_under_torchrun_waits_for_the_dirs_other_workers(tmp_path, monkeypatch, capsys):
    """torchrun stops every rank when one exits non-zero: a rank ending with 3 must not leave while another
    still holds the dir; its own hold goes first, so two waiting ranks do not wait for each other."""
    import threading

    from vlm_caption import endings
    from vlm_caption.locks import DirLock

    monkeypatch.setattr(endings, "TORCHRUN_WAIT_POLL_S", 0.01)
    busy, ending = DirLock(tmp_path, 1, 2), DirLock(tmp_path, 0, 2)
    assert busy.take_worker() is None and ending.take_worker() is None
    polls, done = [], threading.Event()
    holders = ending.holders

    def counting_holders():
        found = holders()
        polls.append(found)
        return found

    monkeypatch.setattr(ending, "holders", counting_holders)
    waiter = threading.Thread(target=lambda: (endings.wait_for_the_dir(ending, 3), done.set()))
    waiter.start()
    deadline = time.monotonic() + 60
    while len(polls) < 3 and waiter.is_alive() and time.monotonic() < deadline:  # it looked, found worker 1
        time.sleep(0.01)
    assert not done.is_set() and all(polls)
    relaunch = DirLock(tmp_path, 0, 2)
    assert relaunch.take_worker() is None  # its own worker id is free while it waits
    relaunch.release()
    busy.release()
    waiter.join(timeout=30)
    assert done.is_set() and polls[-1] == []
    assert "exit 3 waits for the other workers" in capsys.readouterr().out


def test_torchrun_ranks_ending_with_3_let_each_other_finish(tiny_model_dir, tmp_path):
    """Every rank exits 3 (an unreadable shard); the first done used to make torchrun kill the other mid-run."""
    import pyarrow.parquet as pq

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=24, broken=False, seed=3, shard_size=8)
    (data / "full_metadata.parquet").unlink()  # the shard parquets are read instead; one of them is broken
    *readable, broken = sorted((data / "images").glob("*.parquet"))
    broken.write_bytes(broken.read_bytes()[:100])
    ckpt = tmp_path / "ckpt"
    proc = launch(TORCHRUN, args_for(tiny_model_dir, data, ckpt, "--max-tokens", "30", "--min-tokens", "30",
                                     "--backend", "transformers"), tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # torchrun reports a rank's non-zero exit as its own 1
    expected = [k for s in readable for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]
    assert sorted(keys_in(ckpt)) == sorted(expected), out[-3000:]  # every readable key captioned once
    assert {p.worker for p in store.list_parts(ckpt)} == {0, 1}
    assert "exit 3 waits for the other workers" in out and "interrupted" not in out, out[-3000:]


def test_a_worker_starting_while_another_writes_run_json_joins_the_run(tmp_path, monkeypatch):
    """Worker 1 finds no run.json, worker 0 writes it and holds the dir, worker 1's exclusive try fails: it
    read the dir again and joins instead of refusing the same settings as "other settings"."""
    settings = RunConfig(backend="dummy", model="m").run_settings()
    first = store.CheckpointStore(tmp_path, 0, num_workers=2)
    run_id = first.open_run(settings, overwrite=False, wait_for_leader=False)
    real, calls = store.read_run_json_safe, []

    def stale_once(d):  # worker 1's first look happened before worker 0's write
        calls.append(d)
        return (None, "missing") if len(calls) == 1 else real(d)

    monkeypatch.setattr(store, "read_run_json_safe", stale_once)
    second = store.CheckpointStore(tmp_path, 1, num_workers=2)
    try:
        assert second.open_run(settings, overwrite=False, wait_for_leader=False) == run_id
    finally:
        first.lock.release()
        second.lock.release()


def test_a_worker_starting_while_another_is_still_writing_run_json_waits_and_joins(tmp_path, monkeypatch):
    """Workers of a Slurm array start together on a new dir: worker 0 holds the dir while it writes run.json,
    worker 1 finds neither run.json nor the lock free. It refused with "other settings (run unknown)" (exit 2,
    seen under load in test_workers_sharing_a_dir_merge_once_at_the_end); it waits for run.json now."""
    import threading

    settings = RunConfig(backend="dummy", model="m").run_settings()
    real, writing = store.CheckpointStore._write_run_json, threading.Event()

    def slow_write(self, *args):  # worker 0 holds run.lock exclusively for a while before run.json exists
        writing.set()
        time.sleep(0.5)
        return real(self, *args)

    monkeypatch.setattr(store.CheckpointStore, "_write_run_json", slow_write)
    first, second = (store.CheckpointStore(tmp_path, w, num_workers=2) for w in (0, 1))
    ran: list[str] = []
    leader = threading.Thread(target=lambda: ran.append(first.open_run(settings, overwrite=False)))
    leader.start()
    try:
        assert writing.wait(10)
        assert second.open_run(settings, overwrite=False, wait_for_leader=False) == store.run_id_for(settings)
        leader.join(10)
        assert ran == [store.run_id_for(settings)]
    finally:
        first.lock.release()
        second.lock.release()


def test_every_launch_level_combination_gives_each_worker_index_once(monkeypatch):
    """Array tasks x srun tasks x torchrun ranks: the indices are exactly 0..N-1 (a level added instead of
    multiplied would give some twice and leave others to nobody)."""
    clear_launch_env(monkeypatch)
    arrays, tasks, ranks = 3, 2, 4
    seen = []
    for a in range(arrays):
        for t in range(tasks):
            for r in range(ranks):
                monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(a))
                monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(arrays))
                monkeypatch.setenv("SLURM_PROCID", str(t))
                monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(tasks))
                monkeypatch.setenv("RANK", str(r))
                monkeypatch.setenv("WORLD_SIZE", str(ranks))
                monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
                index, count = RunConfig().worker_slice()
                assert count == arrays * tasks * ranks
                seen.append(index)
    assert sorted(seen) == list(range(arrays * tasks * ranks))


def test_of_two_holders_only_the_last_one_out_merges(tmp_path):
    from vlm_caption.locks import DirLock

    a, b = DirLock(tmp_path, 0, 2), DirLock(tmp_path, 1, 2)
    assert a.take_run(exclusive=False) and b.take_run(exclusive=False)
    try:
        assert a.last_one_out() is False  # b still holds the dir
        assert b.last_one_out() is True
    finally:
        a.release()
        b.release()
