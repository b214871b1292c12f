"""What a newcomer meets first, run as they would run it: --help of the shell scripts, and the scripts
started with a Python that lacks the dependencies (outside the venv)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_caption.cli import missing_dependency_line

REPO = Path(__file__).resolve().parent.parent
SETUP_HINT = "run ./setup.sh, then `source vlm-caption/bin/activate` (or use ./run_captioning.sh)"


def _run(cmd: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_setup_help_prints_usage_and_sets_up_nothing(tmp_path):
    shutil.copy(REPO / "setup.sh", tmp_path)
    shutil.copy(REPO / "requirements.txt", tmp_path)
    for flag in ("--help", "-h"):
        proc = _run(["bash", str(tmp_path / "setup.sh"), flag], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ./setup.sh") and "1-3 minutes" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requirements.txt", "setup.sh"]  # no venv made
    bad = _run(["bash", str(tmp_path / "setup.sh"), "--bogus"], cwd=tmp_path)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_setup_shows_its_phases():
    text = (REPO / "setup.sh").read_text()
    assert "--quiet" not in text  # pip's own output shows progress during the minutes of the first install
    assert 'step 3 "installing requirements.txt into ./$VENV: about 1-3 minutes' in text


def test_run_captioning_help_lists_demo_even_without_a_venv(tmp_path):
    shutil.copy(REPO / "run_captioning.sh", tmp_path)  # no venv and no setup.sh next to it
    proc = _run(["bash", str(tmp_path / "run_captioning.sh"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--demo" in proc.stdout and "--demo-dir" in proc.stdout and "No venv yet" in proc.stdout
    assert not (tmp_path / "vlm-caption").exists()


@pytest.mark.skipif(not (REPO / "vlm-caption" / "bin" / "python").is_file(), reason="no ./vlm-caption venv here")
def test_run_captioning_help_lists_demo_and_the_script_flags(tmp_path):
    proc = _run(["bash", str(REPO / "run_captioning.sh"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--demo" in proc.stdout and "--max-images" in proc.stdout


@pytest.mark.parametrize("script, args", [
    ("batched_image_inference.py", ["--help"]),
    ("download_data.py", ["--source", "rows.csv", "--output", "OUT"]),
    ("test_pipeline.py", ["--help"]),
])
def test_scripts_without_the_dependencies_say_run_setup(script, args, tmp_path):
    """`python -S` leaves the venv's site-packages out: as if run with a system python3 lacking torch etc."""
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = _run([sys.executable, "-S", script, *args], cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"{script}: error: the package ") and SETUP_HINT in proc.stderr


def test_our_own_missing_module_keeps_its_traceback():
    assert missing_dependency_line(ModuleNotFoundError("x", name="vlm_caption.nope")) is None
    assert missing_dependency_line(ModuleNotFoundError("x", name="torch.cuda"), prog="p").startswith(
        "p: error: the package 'torch' is not installed")
