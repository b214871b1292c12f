"""The captioning loop with continuous batching (--decode-loop continuous): images go to the backend in chunks,
which join its decoding batch as rows finish (continuous.py); each chunk comes back whole, and from there
on its rows go the way a batch's do (retries of flagged captions, rows, parts).

Chunks are read from the loader and assembled on the assembler thread, one or two ahead; the generate thread
only prefills and decodes. If the stream fails (out of memory for the ring, say), the images of every
unfinished chunk go back to the caller, which captions them and the rest in batches (with their
out-of-memory back-off): nothing is lost or captioned twice.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Executor, Future, wait
from typing import Any, Callable, Iterator

from . import loader
from .batches import GENERATE_ERRORS, assemble_all
from .errors import described

log = logging.getLogger(__name__)

AHEAD = 2  # chunks read and assembled ahead of the one joining


def stream(backend, specs: list, items: Iterator[loader.Loaded], slots: int, chunk_rows: int, *,
           assembler: Executor, should_stop: Callable[[], bool], on_failure: Callable[[loader.Loaded], None],
           on_chunk: Callable[[list[loader.Loaded], list], None],
           on_handed_back: Callable[[list[loader.Loaded]], None],
           on_wait: Callable[[float], None] = lambda seconds: None) -> list[loader.Loaded]:
    """Caption `items` through backend.caption_stream, `slots` rows decoding at once.

    on_failure(item) for each image the loader could not read, on_chunk(items, captions per prompt) for each
    chunk done, on_handed_back(items) for each chunk the stream handed back or could not assemble (to be captioned
    in batches at once: kept to the end, such rows would hold their images), on this thread. Returns the images
    not captioned because the stream failed (to be captioned in batches), else []. A stop request ends it at once;
    its unfinished chunks are dropped (redone on resume).
    """
    ahead: deque[Future] = deque()  # (chunk, loader failures, its assemblies or None, input over)
    chunks: dict[int, list] = {}  # chunk id -> [its items, captions per prompt (None until done)]
    joining: deque[tuple[tuple[int, int], Any]] = deque()  # ((chunk id, prompt index), assembly) to prefill
    over, made = False, 0
    not_the_streams: list[BaseException] = []  # errors of the loader and of the callbacks (the writer's): raised
    # as the batch path raises them, never taken for a failed stream (batches would skip the rows they cost)

    def outside(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:
            not_the_streams.append(e)
            raise

    def read() -> tuple[list[loader.Loaded], list[loader.Loaded], list | None, bool]:  # on the assembler thread
        chunk, failed, over_now = [], [], True
        for item in items:
            (failed if item.error is not None else chunk).append(item)
            if len(chunk) >= chunk_rows or should_stop():
                over_now = False
                break
        try:
            return chunk, failed, assemble_all(backend, specs, chunk) if chunk else None, over_now
        except GENERATE_ERRORS:
            return chunk, failed, None, over_now

    def take(future: Future) -> None:
        nonlocal over, made
        began = time.monotonic()
        chunk, failed, assemblies, over_now = future.result()
        on_wait(time.monotonic() - began)  # seconds waiting for the loader: not generate time
        for item in failed:
            on_failure(item)
        over = over or over_now
        if chunk and assemblies is None:  # batches find the row that breaks it (kept to the end of the stream,
            on_handed_back(chunk)  # every such chunk of an hours-long run would hold its images till then)
        elif chunk:
            made += 1
            chunks[made] = [chunk, [None] * len(specs)]
            joining.extend(((made, j), assembly) for j, assembly in enumerate(assemblies))

    def next_chunk(wait: bool):
        while not joining:
            while not over and len(ahead) < AHEAD:
                ahead.append(assembler.submit(read))
            if not ahead:
                return None
            if not wait and not ahead[0].done():
                return None  # rows are decoding: they do not wait for the loader
            outside(take, ahead.popleft())
        return joining.popleft()

    try:
        for (cid, j), captions in backend.caption_stream(next_chunk, slots, should_stop):
            if cid not in chunks:  # handed back for another of its prompts: captioned in batches already
                continue
            if captions is None:  # handed back (a prompt too long for the stream)
                outside(on_handed_back, chunks.pop(cid)[0])
                continue
            chunks[cid][1][j] = captions
            if all(c is not None for c in chunks[cid][1]):
                done, caps = chunks.pop(cid)
                outside(on_chunk, done, caps)
    except GENERATE_ERRORS as e:
        if e in not_the_streams:
            raise
        reason = described(e)
        if should_stop():  # the stop goes on (its exit code, the captions made written): as a stop, no batches
            log.warning("continuous decoding failed while stopping (%s); its unfinished chunks are redone on "
                        "resume", reason)
            return []
        log.warning("continuous decoding failed (%s); the rest is captioned in batches", reason)
        backend.free_memory()
        left = [item for chunk, _ in chunks.values() for item in chunk]
        while ahead:  # read already: their images are the caller's now (their assemblies are let go of)
            chunk, failed, _, _ = ahead.popleft().result()
            for item in failed:
                on_failure(item)
            left += chunk
        return left
    finally:  # a read still running iterates `items`, which the caller reads or closes next (a generator closed
        # while another thread runs it raises "generator already executing"): it ends first; a queued one never starts
        for future in ahead:
            future.cancel()
        wait(ahead)
    # A stop request: the chunks read ahead are dropped, as a batch in flight is, and so is a loader error one of
    # them met (the batch path stops before it reads on): raised, it made the stop a traceback, nothing flushed
    return []
