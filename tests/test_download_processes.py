"""No process of a download imports torch: img2dataset reaches it only through webdataset's optional torch
shims and they never use it, so each process starts in half the CPU and memory
(benchmarks/bench_download_start.py). The parent blocks it only while importing img2dataset: datasets'
load_dataset imports torch whenever its name is in sys.modules, so a block there for good broke every Hub
source. No process loads albumentations or wandb either, which img2dataset imports and never uses as
download.py calls it (a spawned process then starts in a third of the CPU it took with torch kept out alone:
download_workers.defer_unused_imports). And none outlives the run: a SIGTERM takes img2dataset's own way out,
and a parent killed outright takes its spawned processes with it (download_workers.exit_with_parent).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.image_server import ImageServer, Route
from tests.test_download_exit_codes import (CLI_ARGS, REPO_ROOT, _group, _jpeg, _source,  # noqa: F401
                                           server)  # (a fixture)


def test_download_processes_run_without_torch_and_a_dataset_source_still_loads(server, tmp_path):  # noqa: F811
    ds_dir = tmp_path / "hf_dataset"  # a local dataset dir takes datasets.load_dataset, as a Hub id does
    ds_dir.mkdir()
    shutil.copy(_source(tmp_path, server, ["/img/0.jpg", "/img/1.jpg"]), ds_dir / "train.parquet")
    # -X importtime: every process (spawned ones inherit the flag) lists each module it imports on stderr
    proc = subprocess.run([sys.executable, "-X", "importtime", "download_data.py", "--source", str(ds_dir),
                           "--output", str(tmp_path / "out"), *CLI_ARGS], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "valid images:        2" in proc.stdout, proc.stdout
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", proc.stderr, re.M)
    assert imported.count("img2dataset") >= 2  # once a process: the parent and at least one it spawned
    # torch._C is what a real import of torch loads (a blocked one is listed too, as torch alone)
    assert imported.count("torch._C") == 0 and imported.count("datasets") == 1
    assert "albumentations.augmentations" not in imported and "wandb.sdk" not in imported


def test_a_download_killed_outright_leaves_no_process_behind(tmp_path):
    """SIGKILL to download_data.py alone (the OOM killer's way, or a job step's): img2dataset's logger process,
    which waits for its parent's word to stop, ran on for good, adopted by init. Each spawned process now
    exits within seconds of the parent (download_workers.exit_with_parent), saying why."""
    with slow_download(tmp_path) as proc:
        proc.kill()
        proc.wait(timeout=60)
        assert_group_ends(proc.pid, within_s=30)
        err = proc.stderr.read()  # (its spawned processes wrote to the same pipe: all of it is there now)
    assert proc.returncode == -signal.SIGKILL
    assert re.search(r"download_data.py worker \d+: its parent \(pid \d+\) is gone; exiting", err), err
    assert "Traceback" not in err, err


def test_a_deferred_module_is_loaded_when_it_is_used():
    """The stand-in for a module img2dataset imports but does not use: img2dataset imports as before, and a
    read of the module (a resize mode, a wandb run) loads the real one there and then."""
    code = ("import sys; from vlm_caption.download_workers import defer_unused_imports; defer_unused_imports(); "
            "import img2dataset.resizer as r; assert 'albumentations.augmentations' not in sys.modules; "
            "t = r.A.LongestMaxSize(max_size=8); import albumentations; "
            "assert type(t).__module__.startswith('albumentations.') and albumentations.LongestMaxSize is type(t); "
            "import wandb.sdk")
    in_a_fresh_python(code)


def test_torch_is_importable_after_img2dataset_and_one_already_imported_stays():
    code = ("import sys; from vlm_caption.download_workers import torch_kept_out\n"
            "with torch_kept_out():\n    import img2dataset\n"
            "assert 'torch' not in sys.modules; import torch; torch.zeros(1)\n"
            "with torch_kept_out():\n    assert sys.modules['torch'] is torch\n"
            "assert sys.modules['torch'] is torch")
    in_a_fresh_python(code)


def in_a_fresh_python(code: str) -> None:
    """Runs `code` where nothing is imported yet; its asserts are the test's."""
    proc = subprocess.run([sys.executable, "-c", code + "\nprint('ok')"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_sigterm_mid_download_exits_143_and_leaves_no_process(tmp_path):
    """Slurm's SIGTERM takes img2dataset's own way out (its pool and logger process end with it), like Ctrl-C."""
    with slow_download(tmp_path) as proc:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert_group_ends(proc.pid, within_s=20)  # the pool's workers and the logger process go with it
    assert "Traceback" not in err, err
    assert not (tmp_path / "out" / "images" / "_tmp").exists()


@contextlib.contextmanager
def slow_download(tmp_path: Path):
    """download_data.py in a session of its own (its spawned processes in its group), once img2dataset has asked
    for an image that takes 30 s to come; killed with its group if the test leaves it running."""
    slow = {f"/slow/{i}.jpg": Route(_jpeg(i), delay_seconds=30) for i in range(4)}
    with ImageServer(slow) as srv:
        source = _source(tmp_path, srv, list(slow))
        proc = subprocess.Popen([sys.executable, "download_data.py", "--source", str(source), "--output",
                                 str(tmp_path / "out"), "--processes", "1", "--threads", "4", "--timeout", "60",
                                 "--retries", "0", "--validate-workers", "1"], cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while srv.request_count() == 0 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert srv.request_count() > 0, "img2dataset never asked for an image"
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def assert_group_ends(pgid: int, within_s: float) -> None:
    """Every process of the group ends within the time, else they are killed and the test fails."""
    gone = time.monotonic() + within_s
    while left := _group(pgid):
        if time.monotonic() > gone:
            os.killpg(pgid, signal.SIGKILL)
            raise AssertionError(f"processes of the download outlived it: {left}")
        time.sleep(0.2)
