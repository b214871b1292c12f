"""Launchers (Slurm, torchrun): a resubmitted array task on another number of GPUs, a changed array size, a rank
ending before its sibling started, more ranks than GPUs, a signal forwarded twice. Each launch is emulated by the
variables Slurm and torchrun set, one worker process after another (main in-process)."""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from dummy_runs import clear_launch_env, dummy_args

from batched_image_inference import main
from vlm_caption import dataset, store, workers
from vlm_caption.errors import EXIT_OK


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("relaunch") / "data", n=24, broken=False, seed=5)


def launched_as(monkeypatch, task: int, tasks: int, rank: int = 0, world: int = 1) -> None:
    """The environment of torchrun rank `rank` of `world` in Slurm array task `task` of `tasks` (--array=0-N)."""
    clear_launch_env(monkeypatch)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", str(tasks))
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    if world > 1:
        for var, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world), ("LOCAL_WORLD_SIZE", world)):
            monkeypatch.setenv(var, str(value))


def run_task(monkeypatch, data: Path, ckpt: Path, task: int, tasks: int, rank: int = 0, world: int = 1) -> int:
    launched_as(monkeypatch, task, tasks, rank, world)
    return main(dummy_args(data, ckpt))


def test_an_array_tasks_keys_do_not_depend_on_its_number_of_gpus_or_srun_tasks(monkeypatch):
    keys = [f"{i:09d}" for i in range(400)]

    def task_keys(task: int, tasks: int, world: int, srun: int = 1) -> set[str]:
        mine = set()
        for t in range(srun):
            for rank in range(world):
                launched_as(monkeypatch, task, tasks, rank, world)
                if srun > 1:
                    monkeypatch.setenv("SLURM_PROCID", str(t))
                    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(srun))
                worker, num = workers.worker_slice(None, None)
                mine |= {k for k in keys if dataset.worker_of(k, num) == worker}
        return mine

    for task in range(3):
        on_8 = task_keys(task, 3, 8)
        assert on_8 == task_keys(task, 3, 4) == task_keys(task, 3, 1) == task_keys(task, 3, 2, srun=3)
        assert on_8 == {k for k in keys if dataset.worker_of(k, 3) == task}


def test_a_task_resubmitted_on_fewer_gpus_captions_no_key_of_another_task(monkeypatch, data, tmp_path, capsys):
    """Task 0 ran on 2 GPUs; task 1's rank 1 never got to work (the node went down) and task 1 was resubmitted
    on a node with 1 GPU. Its dir must take the same keys: before, it took half of task 0's keys again."""
    dirs = [tmp_path / "task-0", tmp_path / "task-1"]
    assert run_task(monkeypatch, data, dirs[0], 0, 2, rank=0, world=2) == EXIT_OK
    assert run_task(monkeypatch, data, dirs[0], 0, 2, rank=1, world=2) == EXIT_OK
    assert run_task(monkeypatch, data, dirs[1], 1, 2, rank=0, world=2) == EXIT_OK
    assert run_task(monkeypatch, data, dirs[1], 1, 2, world=1) == EXIT_OK  # the resubmission
    clear_launch_env(monkeypatch)
    capsys.readouterr()
    code = main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", *map(str, dirs)])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "0 missing, 0 captioned more than once" in out


def test_a_dir_relaunched_with_another_array_size_is_refused_before_any_work(monkeypatch, data, tmp_path, capsys):
    """`sbatch --array=2-3` to rerun tasks 2 and 3 of a 0-3 array makes them slices 0 and 1 of 2: their dirs
    then took another set of keys, half of them already in the other tasks' dirs (merge: exit 4), silently."""
    from vlm_caption.cli import run_main
    from vlm_caption.errors import EXIT_USAGE

    dirs = [tmp_path / f"task-{t}" for t in range(4)]
    for t in range(4):
        launched_as(monkeypatch, t, 4)
        assert main(dummy_args(data, dirs[t], "--max-images", "12")) == EXIT_OK  # a first pass
    parts_before = sorted(p.name for p in (dirs[2] / "parts").iterdir())
    for var, value in (("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "2")):
        monkeypatch.setenv(var, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, dummy_args(data, dirs[2]), prog="batched_image_inference.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == EXIT_USAGE and len(err) == 1, err
    assert "machine 2 of 4" in err[0] and "MACHINES=4" in err[0], err
    assert sorted(p.name for p in (dirs[2] / "parts").iterdir()) == parts_before  # nothing captioned
    clear_launch_env(monkeypatch)  # finishing task 2 by hand without --num-workers: the same refusal
    with pytest.raises(SystemExit) as exc:
        run_main(main, dummy_args(data, dirs[2]), prog="batched_image_inference.py")
    assert exc.value.code == EXIT_USAGE and "machine 2 of 4" in capsys.readouterr().err
    # What the refusal says to do: the array's size by hand (MACHINES=4 in runs/slurm_array.sbatch).
    for t in range(4):
        launched_as(monkeypatch, t, 1)  # sbatch --array=T with MACHINES=4: an array of one, flags given
        assert main(dummy_args(data, dirs[t], "--num-workers", "4", "--worker-index", str(t))) == EXIT_OK
    clear_launch_env(monkeypatch)
    capsys.readouterr()
    assert main(["--merge-only", "--data-dir", str(data), "--checkpoint-dir", *map(str, dirs)]) == EXIT_OK
    assert "0 missing, 0 captioned more than once" in capsys.readouterr().out


def test_a_rank_ending_before_its_sibling_started_leaves_the_merge_to_it(data, tmp_path, monkeypatch, capsys):
    """torchrun rank 0 finished (its slice done, or it simply won the race) before rank 1 had reached the dir:
    it was "last out", merged half the keys and wrote the card, and rank 1 merged and wrote it again later."""
    import pyarrow.parquet as pq

    clear_launch_env(monkeypatch)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("RANK", "0")
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    out = capsys.readouterr().out
    assert not (ckpt / store.MERGED).exists(), out
    assert "1 other worker of this launch (1)" in out and "not started yet" in out
    monkeypatch.setenv("RANK", "1")
    assert main(dummy_args(data, ckpt)) == EXIT_OK
    assert "merged into" in capsys.readouterr().out
    expected = sorted(pq.read_table(data / "full_metadata.parquet", columns=["key"]).column("key").to_pylist())
    assert pq.read_table(ckpt / store.MERGED, columns=["key"]).column("key").to_pylist() == expected


def test_more_ranks_than_gpus_is_said(monkeypatch, caplog):
    """torchrun --nproc-per-node 16 on 8 GPUs: ranks 8-15 silently took GPUs 0-7 again (a second model copy on each)."""
    import torch

    from vlm_caption import model_loading

    clear_launch_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for var, value in (("RANK", "11"), ("LOCAL_RANK", "11"), ("WORLD_SIZE", "16"), ("LOCAL_WORLD_SIZE", "16")):
        monkeypatch.setenv(var, value)
    with caplog.at_level(logging.WARNING):
        assert model_loading.choose_device().index == 3
    assert any("16 processes on this machine" in r.getMessage() and "8 GPU(s)" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    monkeypatch.setenv("LOCAL_RANK", "3")  # a process with a GPU of its own says nothing
    with caplog.at_level(logging.WARNING):
        assert model_loading.choose_device().index == 3
    assert not caplog.records


def test_the_same_signal_forwarded_by_a_launcher_is_not_a_second_stop(monkeypatch):
    """At a Slurm time limit every process of the job gets SIGTERM, and torchrun (or srun) forwards its own to
    each worker a few milliseconds later. That second delivery used to count as "stop at once": every finished
    caption not yet in a part and the final push were dropped. Only a signal sent later is a second one."""
    from vlm_caption import interrupts
    from vlm_caption.interrupts import Interrupted, StopSignals

    monkeypatch.setattr(interrupts, "SAME_STOP_S", 0.5, raising=False)
    with StopSignals() as stop:
        try:
            with stop.graceful():
                os.kill(os.getpid(), signal.SIGTERM)  # Slurm's
                time.sleep(0.02)
                os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, forwarded
                time.sleep(0.05)
                assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaching the worker directly and through torchrun
            time.sleep(0.05)  # still inside the window: the flush and the last push go on
        except Interrupted:
            pytest.fail("the same stop delivered twice stopped the run at once, before its captions were written")
        time.sleep(0.5)
        with pytest.raises(Interrupted):  # a signal sent later is a second stop: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)


def test_machines_starting_together_on_one_dir_all_get_recorded(tmp_path, monkeypatch):
    """machines.json is read, changed and rewritten by each machine of a run sharing a dir: ones that start
    together take turns (a lock in locks/), or a machine's index is lost and a later full dir looks partial."""
    import json
    import threading

    from vlm_caption import atomic, dir_scope

    real = atomic.atomic_write_json

    def slow_write(path, value):  # widens the window between the read and the write
        time.sleep(0.05)
        real(path, value)

    monkeypatch.setattr(dir_scope, "atomic_write_json", slow_write)
    threads = [threading.Thread(target=dir_scope.check_machines, args=(tmp_path, m, 4)) for m in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorded = json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text())
    assert recorded == {"machines": 4, "indices": [0, 1, 2, 3], "nodes": 1}


def test_a_whole_dir_split_another_way_stays_whole_for_later_relaunches(tmp_path, monkeypatch):
    """Machines 0-3 of 4 filled one dir: a run as machine 2 of 8 on it is fine, and so is a plain rerun after."""
    import json

    from vlm_caption import dir_scope, store

    monkeypatch.setattr(store, "list_parts", lambda ckpt: ["a part"])  # the dir holds work
    for m in range(4):
        dir_scope.check_machines(tmp_path, m, 4)
    dir_scope.check_machines(tmp_path, 2, 8)
    dir_scope.check_machines(tmp_path, 0, 1)  # was refused: "holds the keys of machine 2 of 8"
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text()) == {"machines": 1, "indices": [0], "nodes": 1}


def test_an_unreadable_machines_json_is_set_aside_with_a_warning(tmp_path, caplog):
    import json

    from vlm_caption import dir_scope, store

    (tmp_path / dir_scope.MACHINES_JSON).write_text('{"machines": 4, "indi')  # cut short
    with caplog.at_level("WARNING"):
        dir_scope.check_machines(tmp_path, 1, 2)
    assert "machines.json is unreadable (JSONDecodeError)" in caplog.text and "recorded anew" in caplog.text
    assert [p.name.split(".json")[0] for p in (tmp_path / store.QUARANTINE_DIR).iterdir()] == ["machines"]
    assert json.loads((tmp_path / dir_scope.MACHINES_JSON).read_text()) == {"machines": 2, "indices": [1], "nodes": 1}


def fake_nvidia_smi(tmp_path, monkeypatch, listing: str, code: int = 0) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{listing}'\nexit {code}\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


def test_a_gpu_machine_whose_torch_cannot_use_its_gpus_is_refused(tmp_path, monkeypatch, tiny_model_dir,
                                                                  sample_data_dir):
    """nvidia-smi lists GPUs but torch sees none (this CPU torch here; a CPU-only wheel or an old driver there):
    a big model is one line before its weights load, not hours of a rented GPU spent on a CPU run (the limit
    lowered here to the tiny model's size); the tiny model itself, the demo's, runs."""
    import torch

    from vlm_caption import model_loading
    from vlm_caption.errors import UsageError
    from vlm_caption.model_loading import gpus_torch_cannot_use

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_nvidia_smi(tmp_path, monkeypatch, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\\nGPU 1: NVIDIA H100 (UUID: GPU-2)\\n")
    problem = gpus_torch_cannot_use()
    assert problem and "nvidia-smi lists 2 GPU(s)" in problem and "CUDA_VISIBLE_DEVICES=" in problem
    assert ("CPU-only build" in problem) == (torch.version.cuda is None)
    ckpt = tmp_path / "ckpt"
    args = ["--model", str(tiny_model_dir), "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(ckpt),
            "--no-push", "--max-images", "2"]
    assert main(args) == EXIT_OK  # a model a CPU runs in seconds
    parts = sorted(ckpt.glob("parts/*"))
    monkeypatch.setattr(model_loading, "BIG_FOR_A_CPU", 0)
    with pytest.raises(UsageError, match="cannot use them"):
        main([*args, "--max-images", "4"])
    assert parts and sorted(ckpt.glob("parts/*")) == parts

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU on purpose
    assert gpus_torch_cannot_use() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake_nvidia_smi(tmp_path, monkeypatch, "No devices were found\\n", code=6)  # a Slurm job given no GPU
    assert gpus_torch_cannot_use() is None
    # A driver updated without a reboot: the GPUs are there and nothing can use them.
    fake_nvidia_smi(tmp_path, monkeypatch, "Failed to initialize NVML: Driver/library version mismatch\\n", code=18)
    assert "version mismatch" in (gpus_torch_cannot_use() or "")


def test_a_big_model_on_the_cpu_is_said(tiny_model_dir, monkeypatch, caplog):
    """On a machine without GPUs the CPU is the only choice: a model past BIG_FOR_A_CPU parameters is said,
    with what to expect, before its weights load (here the limit is lowered to the tiny model's size)."""
    import torch

    from vlm_caption import model_loading

    monkeypatch.setattr(model_loading, "BIG_FOR_A_CPU", 0)
    monkeypatch.setattr(model_loading, "gpus_torch_cannot_use", lambda: None)  # whatever this host's nvidia-smi says
    with caplog.at_level(logging.WARNING):
        model_loading.load_model(str(tiny_model_dir), torch.device("cpu"))
    assert any("no GPU" in r.getMessage() and "minutes per image" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("device_map", [None, "auto", "balanced", "sequential", "balanced_low_0"])
def test_a_device_map_strategy_does_not_slip_past_the_gpu_check(tiny_model_dir, monkeypatch, device_map):
    """Every accelerate strategy puts the whole model on the CPU when torch sees no GPU: only --device-map cpu
    says the CPU is meant (balanced/sequential went to the CPU without a word)."""
    import torch

    from vlm_caption import model_loading
    from vlm_caption.errors import UsageError

    monkeypatch.setattr(model_loading, "BIG_FOR_A_CPU", 0)
    monkeypatch.setattr(model_loading, "gpus_torch_cannot_use", lambda: "nvidia-smi lists 8 GPU(s) but ...")
    with pytest.raises(UsageError, match="nvidia-smi lists 8"):
        model_loading.load_model(str(tiny_model_dir), torch.device("cpu"), device_map=device_map)


def test_the_one_node_script_takes_a_checkpoint_dir_of_yours(data, tmp_path):
    """runs/one_node_8gpus.sh gave --checkpoint-dir ./checkpoints itself: one of yours was refused as "several
    --checkpoint-dir values". The launcher here is a stand-in that runs the script's command as one process."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    checkout = tmp_path / "checkout"
    (checkout / "runs").mkdir(parents=True)
    shutil.copy(repo / "runs" / "one_node_8gpus.sh", checkout / "runs")
    (checkout / "batched_image_inference.py").symlink_to(repo / "batched_image_inference.py")
    (checkout / "vlm-caption" / "bin").mkdir(parents=True)
    fake = checkout / "vlm-caption" / "bin" / "accelerate"  # drops the launcher's own flags, runs the script
    fake.write_text("#!/bin/sh\nwhile [ \"$1\" != batched_image_inference.py ]; do shift; done\n"
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    ckpt = tmp_path / "mine"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE") and not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(checkout / "runs" / "one_node_8gpus.sh"), *dummy_args(data, ckpt)[2:]],
                          env={**env, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MODEL": "dummy-model"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (ckpt / store.MERGED).is_file() and not (checkout / "checkpoints").exists()


@pytest.mark.parametrize("problem", ["no venv", "GPUS=0"])
def test_the_one_node_script_says_what_is_missing_in_one_line(tmp_path, problem):
    """A checkout without ./setup.sh: was 'vlm-caption/bin/accelerate: No such file or directory', exit 127."""
    import shutil
    import subprocess

    checkout = tmp_path / "checkout"
    (checkout / "runs").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "runs" / "one_node_8gpus.sh", checkout / "runs")
    env = dict(os.environ)
    if problem == "GPUS=0":
        (checkout / "vlm-caption" / "bin").mkdir(parents=True)
        (checkout / "vlm-caption" / "bin" / "accelerate").write_text("#!/bin/sh\nexit 9\n")
        (checkout / "vlm-caption" / "bin" / "accelerate").chmod(0o755)
        env["GPUS"] = "0"
    proc = subprocess.run(["bash", str(checkout / "runs" / "one_node_8gpus.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert ("setup.sh" if problem == "no venv" else "GPUS=0") in lines[0]
