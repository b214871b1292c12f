"""loader.prefetch holds a bounded number of bytes ahead: on a GPU each prepared item is a whole decoded image
(the card resizes), and a window of 4 x 256 of them is ~11 GB of 2.7 MP art, far more for big PNG scans."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from dummy_runs import clear_launch_env
from PIL import Image

from vlm_caption import loader
from vlm_caption.schema import IMAGE_PATH

MB = 2**20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two images; prepare() turns the 8 px one into 1 MB, the 16 px one into 3 MB."""
    folder = tmp_path_factory.mktemp("img")
    for side in (8, 16):
        Image.new("RGB", (side, side), (10, 20, 30)).save(folder / f"{side}.png")
    return folder


def prepare(image):
    time.sleep(0.002)
    return np.zeros(MB if image.width == 8 else 3 * MB, dtype=np.uint8)


def most_ahead(rows, **kw) -> tuple[int, list[str]]:
    """The most MB pulled from `rows` and not yet yielded, with a consumer slower than the loader (as the
    pipeline is while a batch generates); and the keys as yielded."""
    ahead, worst, keys = [], 0, []

    def counted():
        for row in rows:
            ahead.append(row["mb"])
            yield row

    for item in loader.prefetch(counted(), prepare, workers=2, window=40, **kw):
        assert item.error is None and item.nbytes == item.inputs.nbytes == item.row["mb"] * MB
        worst = max(worst, sum(ahead))
        ahead.pop(0)
        keys.append(item.row["key"])
        time.sleep(0.01)
    return worst, keys


def rows(images, sides):
    return [{"key": f"k{i}", IMAGE_PATH: images / f"{side}.png", "mb": 1 if side == 8 else 3}
            for i, side in enumerate(sides)]


def test_the_bytes_ahead_are_capped_not_only_the_count(images):
    same = rows(images, [8] * 60)
    uncapped, keys = most_ahead(same)
    assert uncapped >= 35 and keys == [r["key"] for r in same]  # the count window alone: ~40 MB ahead
    capped, keys = most_ahead(same, max_bytes=6 * MB)
    # 6 MB: 6 ready or queued, plus the one just queued and the one being yielded (all one size: exact)
    assert capped <= 8 and keys == [r["key"] for r in same]
    mixed = rows(images, [8, 16] * 30)  # the cap counts queued images at the mean size seen so far
    capped, keys = most_ahead(mixed, max_bytes=12 * MB)
    # Whichever images finished first, the mean is >= 1 MB: <= 13 queued, alternating 3 and 1 MB, + 1 yielded
    assert capped <= 30 and keys == [r["key"] for r in mixed]
    assert most_ahead(mixed)[0] >= 70  # uncapped: 40 images, 80 MB


def test_the_default_cap_is_a_share_of_the_usable_memory(monkeypatch):
    real = loader.usable_memory_bytes()
    assert real is None or real > 2**28  # this machine's memory (or its cgroup limit) reads as a size
    monkeypatch.setattr(loader, "usable_memory_bytes", lambda: 64 * 2**30)
    assert loader.default_ahead_bytes() == 8 * 2**30  # a 64 GiB Slurm job: 8 GiB of images ahead
    monkeypatch.setattr(loader, "usable_memory_bytes", lambda: 2 * 2**30)
    assert loader.default_ahead_bytes() == 2**30  # at least 1 GiB, however small the machine
    monkeypatch.setattr(loader, "usable_memory_bytes", lambda: None)
    assert loader.default_ahead_bytes() == 8 * 2**30  # unknown: 8 GiB


def test_the_ranks_or_srun_tasks_of_one_machine_share_its_cores_and_its_memory_cap(monkeypatch):
    """torchrun's 8 ranks in one 64-core, 256 GiB Slurm job each took 63 decode threads and 1/8 of the job's
    memory: 8 x 63 threads on 64 cores, and images ahead up to the whole limit."""
    clear_launch_env(monkeypatch)
    monkeypatch.setattr(loader, "usable_memory_bytes", lambda: 256 * 2**30)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert (loader.default_loader_workers(), loader.default_ahead_bytes()) == (63, 32 * 2**30)  # one process
    for var, value in (("RANK", 3), ("WORLD_SIZE", 8), ("LOCAL_RANK", 3), ("LOCAL_WORLD_SIZE", 8),
                       ("TORCHELASTIC_RUN_ID", "job")):
        monkeypatch.setenv(var, str(value))
    assert (loader.default_loader_workers(), loader.default_ahead_bytes()) == (7, 4 * 2**30)
    assert 8 * loader.default_ahead_bytes() <= 256 * 2**30 // loader.AHEAD_SHARE_OF_MEMORY
    clear_launch_env(monkeypatch)  # srun --ntasks 12 over 2 nodes: the busier node runs 8 in one job's memory
    for var, value in (("SLURM_PROCID", "9"), ("SLURM_STEP_NUM_TASKS", "12"), ("SLURM_STEP_TASKS_PER_NODE", "8,4")):
        monkeypatch.setenv(var, value)
    # Slurm binds each srun task to its own cores (--cpus-per-task): what it sees is its share already
    assert (loader.default_loader_workers(), loader.default_ahead_bytes()) == (63, 4 * 2**30)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x6)")
    assert loader.default_ahead_bytes() == 16 * 2**30


def test_a_fifo_or_a_device_in_place_of_an_image_fails_its_row_instead_of_hanging(tmp_path):
    """open() of a FIFO waits for a writer: the loader thread, and so the whole run, hung for ever."""
    os.mkfifo(tmp_path / "1.jpg")
    (tmp_path / "2.jpg").symlink_to("/dev/zero")
    import threading

    rows = [{"key": k, IMAGE_PATH: tmp_path / f"{k}.jpg"} for k in ("1", "2")]
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(loader.prefetch(rows, lambda img: img, workers=1, window=2)))
    reader.start()
    reader.join(10)
    if reader.is_alive():  # a writer lets the blocked open() return, so that the test fails instead of hanging
        os.close(os.open(tmp_path / "1.jpg", os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert [(i.error.stage, str(i.error)) for i in out] == [("load", "1.jpg is not a regular file"),
                                                            ("load", "2.jpg is not a regular file")]
