"""Loading images in the background: decode + prepare in threads, a window ahead, in input order.

`dataset` chooses the rows and opens an image safely (`load_image`); this runs that and the backend's
`prepare` for many rows at once, so the generate loop never waits for a JPEG.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from . import workers
from .dataset import ImageLoadError, load_image
from .images import MODEL_IMAGE_SIZE
from .schema import IMAGE_PATH

log = logging.getLogger(__name__)
AHEAD_SHARE_OF_MEMORY = 8  # decoded images held ahead: at most 1/8 of the memory, by all processes of a machine


def default_loader_workers() -> int:
    """Loader workers for `--num-loader-workers auto`: this process's share of the usable cores (torchrun's
    ranks of one machine inherit one set of cores: 8 ranks each taking all 64 ran 8 x 63 threads), minus one
    for the generate loop, at least one. srun tasks are not divided: Slurm binds each to its own cores."""
    return max(1, workers.usable_cores() // workers.ranks_per_machine() - 1)


def usable_memory_bytes() -> int | None:
    """The memory this machine's processes may use: the machine's, or a smaller cgroup limit (a Slurm job's
    --mem, a container's); None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not on Linux/macOS
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            limits.append(int(text))
    return min(limits) if limits else None


def default_ahead_bytes() -> int:
    """How many bytes of prepared images `prefetch` may hold ahead: on a GPU these are whole decoded images
    (the card resizes), 4 x 256 of them at batch 256, ~11 GB of 2.7 MP art and far more for big PNG
    scans; this process's part of a share of the usable memory (the processes of a machine share one
    memory and one job limit), at least 1 GiB."""
    usable = usable_memory_bytes()
    share = usable // AHEAD_SHARE_OF_MEMORY if usable else 8 * 2**30
    return max(2**30, share // workers.processes_per_machine())


@dataclass
class Loaded:
    row: dict[str, Any]
    inputs: Any = None  # what `prepare` returned (preprocessed tensors)
    error: ImageLoadError | None = None
    nbytes: int = 0  # the size of `inputs` (a tensor's or array's nbytes)


def prefetch(rows: Iterable[dict[str, Any]], prepare: Callable[[Image.Image], Any], *,
             workers: int, window: int, target_size: int = MODEL_IMAGE_SIZE,
             max_bytes: int | None = None) -> Iterator[Loaded]:
    """Decode + preprocess images in `workers` threads, `window` ahead, yielding in input order; with
    `max_bytes`, no further image is queued while those ready plus those queued (at the mean size so far)
    would hold more than that.

    Pillow's decode and copies and torch's resize and normalise (image_prep, the fast path) run with the
    GIL released; per image little but Python glue holds it, so threads keep the generate loop fed
    without pickling tensors across processes (see BENCHMARKS.md, "Loader").
    """
    def work(row: dict[str, Any]) -> Loaded:
        try:
            inputs = prepare(load_image(row[IMAGE_PATH], target_size))
            return Loaded(row, inputs=inputs, nbytes=int(getattr(inputs, "nbytes", 0)))
        except ImageLoadError as e:
            return Loaded(row, error=e)
        except (OSError, ValueError, RuntimeError) as e:  # the processor refusing an odd image
            return Loaded(row, error=ImageLoadError("decode", f"preprocess failed: {type(e).__name__}: {e}"))

    pending: deque[Future] = deque()
    lock = threading.Lock()
    # Finished images: all so far (for the mean size) and those waiting here to be yielded.
    seen = {"count": 0, "bytes": 0, "waiting": 0, "waiting_bytes": 0}
    capped = False

    def finished(future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with lock:
            nbytes = future.result().nbytes
            seen["count"] += 1
            seen["bytes"] += nbytes
            seen["waiting"] += 1
            seen["waiting_bytes"] += nbytes

    def take() -> Loaded:
        item = pending.popleft().result()
        with lock:
            seen["waiting"] -= 1
            seen["waiting_bytes"] -= item.nbytes
        return item

    def over_bytes() -> bool:
        """The images waiting plus those queued or being decoded (at the mean size so far) pass max_bytes.
        The queued ones count: the pool works through them while the caller is away generating."""
        if max_bytes is None:
            return False
        with lock:
            if not seen["count"]:  # no size known yet: no more than the threads can start
                return len(pending) >= 2 * workers
            mean = seen["bytes"] / seen["count"]
            return seen["waiting_bytes"] + (len(pending) - seen["waiting"]) * mean > max_bytes

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loader") as pool:
        try:
            for row in rows:
                future = pool.submit(work, row)
                future.add_done_callback(finished)
                pending.append(future)
                while pending and (len(pending) >= window or over_bytes()):
                    if not capped and seen["count"] and len(pending) < window:
                        capped = True
                        log.info("loader: %d images ahead hold about %.1f GiB, the cap: reading fewer ahead",
                                 len(pending), max_bytes / 2**30)
                    yield take()
            while pending:
                yield take()
        finally:  # closed early (a signal): drop the queued images instead of decoding them all first
            for future in pending:
                future.cancel()
