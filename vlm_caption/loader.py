"""Loading images in the background: decode + prepare in threads, a window ahead, in input order.

`dataset` chooses the rows and opens an image safely (`load_image`); this runs that and the backend's
`prepare` for many rows at once, so the generate loop never waits for a JPEG.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from .dataset import ImageLoadError, load_image
from .images import MODEL_IMAGE_SIZE
from .schema import IMAGE_PATH


def default_loader_workers() -> int:
    """Loader workers for `--num-loader-workers auto`: the cores this process may use, minus one for
    the generate loop, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@dataclass
class Loaded:
    row: dict[str, Any]
    inputs: Any = None  # what `prepare` returned (preprocessed tensors)
    error: ImageLoadError | None = None


def prefetch(rows: Iterable[dict[str, Any]], prepare: Callable[[Image.Image], Any], *,
             workers: int, window: int, target_size: int = MODEL_IMAGE_SIZE) -> Iterator[Loaded]:
    """Decode + preprocess images in `workers` threads, `window` ahead, yielding in input order.

    Pillow's decode and copies and torch's resize and normalise (image_prep, the fast path) run with the
    GIL released; per image little but Python glue holds it, so threads keep the generate loop fed
    without pickling tensors across processes (see BENCHMARKS.md, "Loader").
    """
    def work(row: dict[str, Any]) -> Loaded:
        try:
            return Loaded(row, inputs=prepare(load_image(row[IMAGE_PATH], target_size)))
        except ImageLoadError as e:
            return Loaded(row, error=e)
        except (OSError, ValueError, RuntimeError) as e:  # the processor refusing an odd image
            return Loaded(row, error=ImageLoadError("decode", f"preprocess failed: {type(e).__name__}: {e}"))

    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loader") as pool:
        try:
            for row in rows:
                pending.append(pool.submit(work, row))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # closed early (a signal): drop the queued images instead of decoding them all first
            for future in pending:
                future.cancel()

