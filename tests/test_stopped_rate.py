"""What a run stopped by SIGTERM (a Slurm time limit, a preemption) leaves for the operator's next decision."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from signalled_runs import signal_when_ready

from vlm_caption import store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("stopped") / "data", n=600, broken=False, seed=3, shard_size=200)


def args(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "batched_image_inference.py"), "--model", "dummy-model", "--backend", "dummy",
            "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push", "--max-tokens", "40",
            "--batch-size", "1", "--checkpoint-every", "20", "--num-loader-workers", "1", *extra]


def test_a_dry_run_after_a_run_stopped_by_sigterm_estimates_from_its_rate(data, tmp_path):
    """User impact: on a Slurm cluster every job of a long run may end at its time limit (SIGTERM, exit 143);
    the README's Signals section has the stopped run print its rate and what is left ("stopped: this run
    captioned N images at R img/s; ..."), but it writes no run_summary.json, so the rate is lost: the next
    `--dry-run` of the dir prints "estimated time: unknown (no earlier run in this checkpoint dir to measure a rate
    from)", which is false (a run captioned hundreds of images there), and an operator sizing the next job's
    time limit gets nothing. Expected: a run stopped by a signal keeps its measured rate (run_summary.json,
    whose counts it can write as a finished run does), and --dry-run estimates from it."""
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args(data, ckpt), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ready(output: list[str]) -> None:
        deadline = time.monotonic() + 300
        while len(store.list_parts(ckpt)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(store.list_parts(ckpt)) >= 3, "".join(output)[-2000:]

    code, out, _ = signal_when_ready(proc, ready, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    said = re.search(r"stopped: this run captioned (\d+) images at ([\d.]+) img/s", out)
    assert said, out[-2000:]  # the stopped run measured a rate and said it

    dry = subprocess.run(args(data, ckpt, "--dry-run"), env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    estimate = next(line for line in dry.stdout.splitlines() if "estimated time" in line)
    assert f"at the last measured {said.group(2)} img/s" in estimate, (estimate, out[-1500:])
    assert not (ckpt / store.SUMMARY).exists()  # (only the end of a run writes the summary)


def test_a_rate_that_cannot_be_written_is_a_warning_not_the_run_s_end(tmp_path, caplog):
    """A directory where last_rate.json goes made the stopped run end with exit 2 instead of 143."""
    from vlm_caption.endings import measured_rate, save_rate

    (tmp_path / store.RATE).mkdir()
    save_rate(tmp_path, 12.5)
    assert "could not write" in caplog.text and measured_rate(tmp_path) is None
