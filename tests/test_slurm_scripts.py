"""runs/slurm_array.sbatch as Slurm runs it: a copy of the file started in the submit directory, with the array
variables set (no Slurm here: bash with that environment and an nvidia-smi that lists fake GPUs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "runs" / "slurm_array.sbatch"


def sbatch_env(tmp_path: Path, submit_dir: Path, **extra: str) -> dict[str, str]:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\necho 'GPU 1: fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REPO", "VENV", "MACHINES"))}
    env.update({"PATH": f"{fake}:{env['PATH']}", "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_ARRAY_TASK_ID": "0",
                "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_JOB_ID": "7",
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra})
    return env


def run_script(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    copy = cwd / "slurm_script"  # Slurm runs a copy from its spool dir: the script cannot find itself
    copy.write_text(SCRIPT.read_text())
    return subprocess.run(["bash", str(copy), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_submitted_from_another_directory_says_how_to_find_the_checkout(tmp_path):
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    proc = run_script(sbatch_env(tmp_path, elsewhere), elsewhere)
    assert proc.returncode == 2, proc.stderr  # was 127: "vlm-caption/bin/torchrun: No such file or directory"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "REPO=" in lines[0] and str(elsewhere) in lines[0], proc.stderr


def test_the_log_goes_to_a_folder_slurm_finds(tmp_path):
    """Slurm opens --output before the script runs and does not create its folder: `mkdir -p logs` inside the
    script came too late, and the first job of a fresh checkout failed with no log at all."""
    output = re.search(r"^#SBATCH --output=(\S+)$", SCRIPT.read_text(), re.M).group(1)
    assert "/" not in output or (REPO / output.rsplit("/", 1)[0]).is_dir()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_array_script_captions_every_key_of_its_task(tmp_path, where):
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=12, broken=False, seed=9)
    ckpt = tmp_path / "ckpt" / "task-0"
    submit = REPO if where == "checkout" else tmp_path
    extra = {} if where == "checkout" else {"REPO": str(REPO)}
    env = sbatch_env(tmp_path, submit, VENV=str(Path(sys.executable).parent.parent),
                     CHECKPOINTS=str(ckpt.parent), **extra)
    if where == "checkout":  # a node in MIG mode: each GPU lists its instances under it ("wc -l" counted 4)
        (tmp_path / "fakebin" / "nvidia-smi").write_text(
            "#!/bin/sh\necho 'GPU 0: fake'\necho '  MIG 3g.40gb Device 0: (UUID: MIG-a)'\n"
            "echo 'GPU 1: fake'\necho '  MIG 3g.40gb Device 0: (UUID: MIG-b)'\n")
    else:  # Slurm's own count of this task's GPUs wins over what nvidia-smi lists (2 fake GPUs)
        env["SLURM_GPUS_ON_NODE"] = "2"
        (tmp_path / "fakebin" / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")
    proc = run_script(env, tmp_path, "--backend", "dummy", "--model", "dummy-model", "--no-push", "--data-dir",
                      str(data), "--batch-size", "2", "--num-loader-workers", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    keys = pq.read_table(ckpt / "all_captions.parquet", columns=["key"]).column("key").to_pylist()
    expected = pq.read_table(data / "full_metadata.parquet", columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected)
    assert {p.name[:13] for p in (ckpt / "parts").iterdir()} == {"captions-w000", "captions-w001"}  # 2 "GPUs"


def test_a_node_without_gpus_says_so_in_one_line(tmp_path):
    env = sbatch_env(tmp_path, REPO, VENV=str(Path(sys.executable).parent.parent))
    (tmp_path / "fakebin" / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")  # lists none (a CPU partition)
    proc = run_script(env, tmp_path, "--backend", "dummy")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no GPU" in lines[0], proc.stderr  # was a traceback, 1


def test_a_rerun_of_a_task_whose_dir_holds_another_slice_is_refused(tmp_path):
    """MACHINES=4 --array=3 after a first array of 1-4: task 3 was slice 2 there, and slice 3 would caption task 4's
    keys into its dir (and leave slice 2's to no one); exit 2, one line. Its own slice runs."""
    import json

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=9)
    task = tmp_path / "ckpt" / "task-3"
    task.mkdir(parents=True)
    (task / "machines.json").write_text(json.dumps({"machines": 4, "indices": [2]}))
    env = sbatch_env(tmp_path, REPO, VENV=str(Path(sys.executable).parent.parent), CHECKPOINTS=str(task.parent),
                     MACHINES="4", SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MIN="3", SLURM_ARRAY_TASK_COUNT="1")
    args = ("--backend", "dummy", "--model", "dummy-model", "--no-push", "--data-dir", str(data), "--batch-size", "2")
    proc = run_script(env, tmp_path, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "another slice than 3 of 4" in lines[0], proc.stderr
    (task / "machines.json").write_text(json.dumps({"machines": 4, "indices": [3]}))
    proc = run_script(env, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_submitted_without_array_says_how_in_one_line(tmp_path):
    """`sbatch runs/slurm_array.sbatch` without --array (or bash on it): was bash's 'SLURM_ARRAY_TASK_ID: unbound
    variable', exit 1."""
    env = sbatch_env(tmp_path, REPO, VENV=str(Path(sys.executable).parent.parent))
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_JOB_ID"):
        env.pop(name)
    proc = run_script(env, tmp_path, "--backend", "dummy")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--array=0-N" in lines[0], proc.stderr
