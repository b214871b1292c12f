"""The runs/ scripts' --help and the settings they read from the environment, checked before any launcher starts
(no accelerate, torchrun or Slurm here: stand-ins that record that they were started)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _checkout(tmp_path: Path, script: str) -> Path:
    """A checkout holding `script`, the real batched_image_inference.py and a venv of stand-ins: its python runs
    this interpreter, its accelerate / torchrun only leave a mark that they were started."""
    checkout = tmp_path / "checkout"
    (checkout / "runs").mkdir(parents=True)
    shutil.copy(REPO / "runs" / script, checkout / "runs")
    (checkout / "batched_image_inference.py").symlink_to(REPO / "batched_image_inference.py")
    venv_bin = checkout / "vlm-caption" / "bin"
    venv_bin.mkdir(parents=True)
    stand_ins = {"python": f'#!/bin/sh\nexec {sys.executable} "$@"\n',
                 "accelerate": f"#!/bin/sh\ntouch {tmp_path / 'launched'}\n",
                 "torchrun": f"#!/bin/sh\ntouch {tmp_path / 'launched'}\n"}
    for name, text in stand_ins.items():
        (venv_bin / name).write_text(text)
        (venv_bin / name).chmod(0o755)
    return checkout


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MACHINES", "REPO", "VENV", "GPUS"))}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("flag", ["--help", "--help-all"])
def test_the_one_node_script_prints_its_help_once_and_launches_nothing(tmp_path, flag):
    """`runs/one_node_8gpus.sh --help` went to `accelerate launch --num_processes 8`: eight processes, each
    printing batched_image_inference.py's help (on a GPU machine, eight CUDA inits first)."""
    checkout = _checkout(tmp_path, "one_node_8gpus.sh")
    proc = subprocess.run(["bash", str(checkout / "runs" / "one_node_8gpus.sh"), flag], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "launched").exists()
    assert proc.stdout.startswith("Usage: ") and "GPUS" in proc.stdout and "MODEL" in proc.stdout
    assert proc.stdout.count("usage: batched_image_inference.py") == 1, proc.stdout
    assert ("--worker-index" in proc.stdout) == (flag == "--help-all")


def test_the_array_script_says_what_it_does_without_an_array_task(tmp_path):
    """`bash runs/slurm_array.sbatch --help` was refused as "not a job array task" (exit 2)."""
    checkout = _checkout(tmp_path, "slurm_array.sbatch")
    proc = subprocess.run(["bash", str(checkout / "runs" / "slurm_array.sbatch"), "--help"], cwd=checkout,
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "sbatch --array=0-7 runs/slurm_array.sbatch" in proc.stdout and "MACHINES=N" in proc.stdout
    assert "#SBATCH" not in proc.stdout and "set -euo" not in proc.stdout
    assert not (tmp_path / "launched").exists()


@pytest.mark.parametrize("machines, task", [("eight", "3"), ("0", "0"), ("8", "8")])
def test_a_machines_value_that_cannot_be_the_arrays_size_is_one_line(tmp_path, machines, task):
    """MACHINES=eight reached torchrun as `--num-workers eight`: every rank's usage error, then torchrun's
    ChildFailedError traceback, exit 1; MACHINES=8 on task 8 (past the array 0-7) the same."""
    checkout = _checkout(tmp_path, "slurm_array.sbatch")
    env = _env(SLURM_SUBMIT_DIR=str(checkout), SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_COUNT="1", GPUS="1",
               MACHINES=machines)
    copy = tmp_path / "slurm_script"  # Slurm runs a copy from its spool dir
    copy.write_text((checkout / "runs" / "slurm_array.sbatch").read_text())
    proc = subprocess.run(["bash", str(copy), "--backend", "dummy"], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and f"MACHINES={machines}" in lines[0], proc.stderr
    assert not (tmp_path / "launched").exists()
