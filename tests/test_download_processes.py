"""No process of a download imports torch: img2dataset reaches it only through webdataset's optional torch
shims and they never use it, so each process starts in half the CPU and memory
(benchmarks/bench_download_start.py). The parent blocks it only while importing img2dataset: datasets'
load_dataset imports torch whenever its name is in sys.modules, so a block there for good broke every Hub
source. No process loads albumentations or wandb either, which img2dataset imports and never uses as
download.py calls it (a spawned process then starts in a third of the CPU it took with torch kept out alone:
download_workers.defer_unused_imports).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from tests.test_download_exit_codes import CLI_ARGS, REPO_ROOT, _source, server  # noqa: F401  (fixture)


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
