"""Batches of images through a captioning backend: out-of-memory back-off, and the one row that breaks
generation found and recorded as failed, so no row is lost."""
from __future__ import annotations

import logging
import re
from concurrent.futures import Future
from typing import Any, Callable, Optional

from . import loader, prompt_plan
from .backends import CaptionBackend
from .config import RunConfig
from .errors import FatalError, brief, described

log = logging.getLogger(__name__)

MAX_FAILED_BATCHES_IN_A_ROW = 20  # then the model, not the data, is broken
# What a generate call may raise for one batch (torch's out of memory is a RuntimeError): caught, never fatal
GENERATE_ERRORS = (RuntimeError, ValueError, IndexError, MemoryError)

Result = tuple[list[loader.Loaded], Any, Optional[str]]  # (items, their captions or None, the error)
Retries = list[dict[int, Any]]  # per prompt: index in a Result's items -> the retry of a flagged caption


class Batches:
    """Batch size with out-of-memory back-off: halve and retry the same rows; no row is lost."""

    def __init__(self, cfg: RunConfig, backend: CaptionBackend, should_stop=None,
                 specs: list[prompt_plan.PromptSpec] | None = None, on_back_off: Callable[[], None] | None = None):
        self.size = cfg.batch_size or backend.default_batch_size
        self.backend = backend
        self.specs = specs or prompt_plan.run_specs(cfg.run_settings())  # one generate per prompt per chunk
        self.should_stop = should_stop  # generate ends early when it turns true (a signal)
        self.on_back_off = on_back_off  # lets go of the next batch's assembly, made at the old size
        self.failed_in_a_row = 0

    def caption(self, items: list[loader.Loaded], assembled: Future | None = None) -> list[Result]:
        """(items, their captions per prompt or None, error) per chunk, in order; generate runs on chunks of
        self.size, once per prompt. `assembled`: the backend's assemblies of all `items`, one per prompt, made
        in the background."""
        results: list[Result] = []
        start = 0
        ready = None
        while start < len(items):
            chunk = items[start:start + self.size]
            try:
                ready = assembled.result() if assembled is not None and len(chunk) == len(items) else None
                keys = [i.row["key"] for i in chunk]
                caps = [self.backend.generate(keys, ready[j] if ready is not None else [i.inputs for i in chunk],
                                              should_stop=self.should_stop, prompts=prompts_for(spec, chunk))
                        for j, spec in enumerate(self.specs)]
            except GENERATE_ERRORS as e:
                if self.backend.is_out_of_memory(e) and len(chunk) > 1:
                    if ready is not None:  # the whole batch's assembly (on the device) is not used again:
                        ready.clear()  # its tensors go before the smaller retries need the memory
                    if self.on_back_off is not None:
                        self.on_back_off()
                    self.backend.free_memory()
                    self.size = max(1, len(chunk) // 2)
                    log.warning("out of memory with a batch of %d; retrying as batches of %d (%s)", len(chunk),
                                self.size, memory_note(e))
                    continue  # the same rows again, smaller
                results += self._one_by_one(chunk, e)
            else:
                self.failed_in_a_row = 0
                results.append((chunk, caps, None))  # captions are decoded later, off this thread
            start += len(chunk)
        return results

    def _one_by_one(self, chunk: list[loader.Loaded], error: BaseException):
        if len(chunk) > 1:  # find the row that breaks generation; the others still get captions
            return [r for item in chunk for r in self.caption([item])]
        self.failed_in_a_row += 1
        message = described(error)
        if self.failed_in_a_row >= MAX_FAILED_BATCHES_IN_A_ROW:
            raise FatalError(f"generation failed {self.failed_in_a_row} times in a row, last: {message}")
        return [(chunk, None, message)]


# torch's CUDA message: memory free only in pieces is what README's Troubleshooting acts on.
_RESERVED = re.compile(r"([\d.]+ \w?i?B) is allocated by PyTorch, and ([\d.]+ \w?i?B) is reserved by PyTorch but "
                       r"unallocated")


def memory_note(error: BaseException) -> str:
    """What an out-of-memory error says that the operator can act on, in a few words."""
    found = _RESERVED.search(str(error))
    if found is None:
        return brief(described(error), 300)
    return (f"torch: {found.group(1)} allocated, {found.group(2)} reserved but unallocated; when that is large, "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may keep the batch size")


def prompts_for(spec: prompt_plan.PromptSpec, items: list[loader.Loaded]) -> list[str]:
    return [spec.render(i.row) for i in items]


def assemble_all(backend: CaptionBackend, specs: list[prompt_plan.PromptSpec], items: list[loader.Loaded]) -> list:
    """The backend's assembly of `items` for each prompt (the images are prepared once, for all prompts)."""
    return [backend.assemble([i.inputs for i in items], prompts_for(spec, items)) for spec in specs]


def failure_row(row: dict[str, Any], stage: str, error: str) -> dict[str, Any]:
    return {"key": row["key"], "original_key": row.get("original_key"), "url": row.get("url"),
            "stage": stage, "error": error[:2000]}
