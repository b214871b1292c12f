"""The second try of flagged captions, gathered across batches into few `generate` calls.

A caption flagged `empty`, `repetition` or `invalid_json` (rows.RETRY_FLAGS) is generated once more with the
retry's settings. On a GPU a call costs nearly the same at 1 row as at 64: 200 decode steps bound by reading
the weights and launching kernels, ~4 s for the 4B on an H100, and a retry runs padded to GPU_MIN_BUCKET rows
anyway. One call after every batch of 512 (~15 s) that holds a flagged caption would cost a run up to ~25 %.

So a batch's rows go to the writer at once, except those with a flagged caption: they wait here until
`backend.retry_rows` of them (64 on a GPU; 1 on a CPU, where a call's cost follows its rows) are retried
together, one call per prompt, and the last ones at the end of the run. Waiting rows are in no part yet: a
signal drops them with the batch in flight, and resume captions them again (so no row is written twice, and
none keeps a first caption that a finished run would have retried). They keep their loaded images: under 64
of them after each batch, ~0.7 GB of host memory at the GPU loader's ~11 MB a decoded image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import loader
from .backends import Caption, CaptionBackend
from .batches import GENERATE_ERRORS, Result, Retries, prompts_for
from .prompt_plan import PromptSpec
from .rows import wants_retry

log = logging.getLogger(__name__)

Post = Callable[[list[Result], list[Retries]], None]  # rows (and their retries) to the writer thread


@dataclass
class _Waiting:
    item: loader.Loaded
    caps: list[Caption]  # its first caption for each prompt
    flagged: list[bool]  # per prompt: that caption is generated once more


@dataclass
class RetryPool:
    """Rows with a flagged caption, held until `rows` of them are retried in one call per prompt; the others
    of their batch posted at once; `rows` 0: no second try. `batch_rows()`: the run's batch size now (it halves
    on out of memory), the most rows a call takes. Generate thread only."""
    backend: CaptionBackend
    specs: Sequence[PromptSpec]
    rows: int
    batch_rows: Callable[[], int]
    post: Post
    should_stop: Callable[[], bool]
    waiting: list[_Waiting] = field(default_factory=list)
    calls: int = 0  # generate calls of retries (one per prompt per gathering), for run_summary.json
    retried: int = 0  # captions generated once more

    def add(self, results: list[Result]) -> None:
        """A batch's results: its failed chunks and its rows without a flagged caption posted, the others kept;
        retried once `rows` wait."""
        ready: list[Result] = []
        for items, caps, error in results:
            if caps is None or not self.rows:  # (rows 0: --retry-repetition-penalty 0, no second try)
                ready.append((items, caps, error))
                continue
            flagged = [[wants_retry(c[i], spec) for c, spec in zip(caps, self.specs)] for i in range(len(items))]
            clean = [i for i, f in enumerate(flagged) if not any(f)]
            if clean:
                ready.append(([items[i] for i in clean], [[c[i] for i in clean] for c in caps], None))
            self.waiting += [_Waiting(items[i], [c[i] for c in caps], f) for i, f in enumerate(flagged) if any(f)]
        if ready:
            self.post(ready, [[{} for _ in self.specs] for _ in ready])
        if len(self.waiting) >= min(self.rows, self.batch_rows()):
            self.flush()

    def flush(self) -> None:
        """Retry every waiting row (calls of at most batch_rows() rows) and post them; on a signal they stay."""
        while self.waiting and not self.should_stop():
            group = self.waiting[:max(1, self.batch_rows())]
            retries = [self._retry(group, j, spec) for j, spec in enumerate(self.specs)]
            if self.should_stop():  # generate was cut short: the retries are incomplete, resume redoes the rows
                return
            del self.waiting[:len(group)]
            self.post([([w.item for w in group], [[w.caps[j] for w in group] for j in range(len(self.specs))],
                        None)], [retries])

    def _retry(self, group: list[_Waiting], j: int, spec: PromptSpec) -> dict[int, Caption]:
        """The second try of prompt j's flagged captions in `group`: index -> its retry. A failed call (out of
        memory, say) keeps the first captions: it is logged, never a failure of the row."""
        redo = [i for i, w in enumerate(group) if w.flagged[j]]
        if not redo:
            return {}
        items = [group[i].item for i in redo]
        self.calls += 1
        try:
            again = self.backend.generate([i.row["key"] for i in items], [i.inputs for i in items],
                                          should_stop=self.should_stop, retry=True, prompts=prompts_for(spec, items))
        except GENERATE_ERRORS as e:
            if self.backend.is_out_of_memory(e):
                self.backend.free_memory()
            log.warning("the retry of %d flagged captions failed (%s: %s); their first captions are kept",
                        len(redo), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return {}
        self.retried += len(redo)
        return dict(zip(redo, again))

    def report(self) -> dict[str, Any]:
        """What run_summary.json's decoding says of the retries."""
        return {"retry_gathered_rows": self.rows, "retry_calls": self.calls, "retried_captions": self.retried}
