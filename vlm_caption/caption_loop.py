"""The captioning loop: plan.todo_keys through the backend into parts, on three threads.

- the generate thread (the caller's) only generates: it reads the loader, hands each batch to the backend
  (Batches: out-of-memory back-off; or stream_loop with --decode-loop continuous) and posts its results, the
  rows with a flagged caption once their second try is made (retry_pool: gathered across batches);
- the assembler thread assembles the next batch (stacked, pinned, copied) while the current one runs;
- the writer thread decodes captions, builds rows and writes parts and failures, in order.

Errors of the writer thread (a full disk) surface on the generate thread at its next step. Signals
(interrupts.StopSignals) are checked between batches; the pusher (hub_pusher) is told of every part written.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import dataset, loader, prompt_plan, rows as rowcols, store, stream_loop
from .backends import CaptionBackend, make_backend
from .batches import Batches, Result, Retries, assemble_all, failure_row
from .cli import duration, plural
from .config import RunConfig, public_model_name
from .endings import save_rate
from .interrupts import StopSignals
from .retry_pool import RetryPool

if TYPE_CHECKING:
    from .pipeline import RunStats

log = logging.getLogger("vlm_caption.pipeline")  # the messages users know, under the name they had


def caption_all(cfg: RunConfig, plan: dataset.WorkPlan, writer: store.CheckpointStore, stats: RunStats,
                pusher, backend: CaptionBackend | None = None, stop: StopSignals | None = None,
                settings: dict | None = None) -> None:
    """Caption plan.todo_keys into parts. `backend` lets benchmarks pass a model already in memory.

    On a signal (see interrupts.py) the batch in flight is dropped, every finished caption and failure is
    written, and Interrupted is raised. `settings`: the run's, as its run.json records them; read again here, a
    --prompts-file or --prompt-file edited since the run opened (for the next experiment, while this one scanned
    its data) captioned with prompts the run does not record."""
    CaptionLoop(cfg, plan, writer, stats, pusher, backend, stop, settings).run()


class CaptionLoop:
    """One call of caption_all: its buffers, threads and batches as named fields, its steps as methods."""

    def __init__(self, cfg: RunConfig, plan: dataset.WorkPlan, writer: store.CheckpointStore, stats: RunStats,
                 pusher, backend: CaptionBackend | None, stop: StopSignals | None, settings: dict | None) -> None:
        from .pipeline import plan_columns

        self.cfg, self.plan, self.writer, self.stats, self.pusher = cfg, plan, writer, stats, pusher
        settings = settings or cfg.run_settings()
        self.extra, self.specs, self.also = plan_columns(cfg, settings)
        if backend is None:
            longest = prompt_plan.longest_prompt(self.specs, plan.rows(Path(cfg.data_dir), self.extra, self.also))
            backend = make_backend(cfg.backend, model=settings["model"], prompt=longest,
                                   max_tokens=cfg.max_tokens, min_tokens=cfg.min_tokens, temperature=cfg.temperature,
                                   top_p=cfg.top_p, seed=cfg.seed, dtype=cfg.dtype, device_map=cfg.device_map,
                                   attn_implementation=cfg.attn_implementation,
                                   max_auto_batch_size=cfg.max_auto_batch_size, compile=cfg.compile,
                                   decode_loop=cfg.decode_loop, decode_attention=cfg.decode_attention,
                                   vision_attention=cfg.vision_attention,
                                   vision_overlap=cfg.vision_overlap, quantize=cfg.quantize,
                                   kv_cache_dtype=cfg.kv_cache_dtype,
                                   retry_repetition_penalty=cfg.retry_repetition_penalty)
        self.backend = backend
        self.stop = stop or StopSignals()
        self.upcoming: list = []  # [items, its assembly's future]: the next batch, assembled while this one generates
        self.batches = Batches(cfg, backend, should_stop=lambda: self.stop.requested, specs=self.specs,
                               on_back_off=self.drop_upcoming)
        log.info("batch size %d (%s)", self.batches.size, "--batch-size" if cfg.batch_size else
                 "auto: the backend's start for this device; it halves on out-of-memory")
        # Rows with a flagged caption wait for their second try, gathered across batches (0: no second try).
        self.retry_pool = RetryPool(backend, self.specs, backend.retry_rows if cfg.retry_repetition_penalty > 0
                                    else 0, batch_rows=lambda: self.batches.size,
                                    post=lambda results, retries: self.later(self.record, results, retries),
                                    should_stop=self.batches.should_stop)
        self.rows: list[dict] = []  # captioned rows not yet in a part (the writer thread's)
        self.failures: list[dict] = []  # failure rows not yet written (the writer thread's)
        # The generate thread only generates. The next batch is assembled (stacked, pinned, copied) on one
        # background thread while the current one runs; captions are decoded, rows built and parts written on
        # another, in order (with the second try on, a batch's texts are decoded on the generate thread to judge
        # them: milliseconds a batch). Their errors (a full disk) surface on the generate thread at its next step.
        self.assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="assemble")
        self.post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self.posted: deque[Future] = deque()  # the writer thread's jobs, oldest first
        self.model_name = public_model_name(backend.model_name, cfg.backend)  # a local dir's path names its owner
        self.flag_columns = rowcols.flag_columns(self.specs)
        self.loaded = loader.prefetch(plan.rows(Path(cfg.data_dir), self.extra, self.also, plan.unreadable_shards),
                                      backend.prepare,
                                      workers=cfg.num_loader_workers or loader.default_loader_workers(),
                                      window=max(4 * self.batches.size, 16), max_bytes=loader.default_ahead_bytes(),
                                      target_size=backend.target_size)
        self.ready: list | None = None  # [items, their assembly's future (None: assembled inline)], being assembled
        self.progress = None  # the tqdm bar, open while run() runs

    def run(self) -> None:
        """The loop, on the generate thread: every image read, batched, captioned and written; then the last flush."""
        from tqdm import tqdm

        batch: list[loader.Loaded] = []
        stop = self.stop
        with tqdm(total=self.plan.todo, unit="img", desc="captioning", mininterval=2.0, smoothing=0.1) as progress, \
                self.assembler, self.post:
            self.progress = progress
            try:
                with stop.graceful():
                    for item in itertools.chain(self.continuous(self.loaded), self.loaded):
                        if stop.requested:
                            break
                        if item.error is not None:
                            self.later(self.record_failure, item)
                        else:
                            batch.append(item)
                            if len(batch) >= self.batches.size:
                                self.next_batch(batch)
                                batch = []
                    if batch and not stop.requested:
                        self.next_batch(batch)
                    if self.ready is not None and not stop.requested:
                        self.run_batch(*self.ready)
                    if not stop.requested:
                        self.timed(self.retry_pool.flush)  # the last rows waiting for their second try
                    self.drain()  # inside: a signal now asks to stop instead of cutting the wait short
                    if not stop.requested:  # the last part, inside too: a signal raised mid-write lost its rows
                        self.flush(force=True)
                stop.raise_if_requested()
            except KeyboardInterrupt:  # (and Interrupted) every caption made is kept; the batch in flight and the
                # rows waiting for a retry are redone on resume
                self.loaded.close()  # stop the loader threads before writing
                self.drain()
                self.say_dropped()
                self.flush(force=True)
                self.say_stopped()
                raise
        report = getattr(self.backend, "decoding_report", None)  # (the transformers backend's: its loop, cache, steps)
        self.stats.decoding = {"batch_size": self.batches.size, **self.retry_pool.report(),
                               **(report(self.batches.size) if report is not None else {})}

    # ------------------------------------------------------------ the generate thread

    def next_batch(self, items: list[loader.Loaded]) -> None:
        """Generate thread: start assembling `items` on the assembler thread, then caption the batch before it."""
        assembling = [items, self.assembler.submit(assemble_all, self.backend, self.specs, items)]
        self.upcoming[:] = [assembling]
        if self.ready is not None:
            self.run_batch(*self.ready)
        self.ready = assembling

    def run_batch(self, batch: list[loader.Loaded], assembled: Future | None) -> None:
        """Generate thread: one batch through Batches (out-of-memory back-off), timed as generate time."""
        self.timed(lambda: self.captioned(self.batches.caption(batch, assembled)))

    def timed(self, work: Callable[[], None]) -> None:
        started = time.monotonic()
        work()
        self.stats.generate_s += time.monotonic() - started

    def captioned(self, results: list[Result]) -> None:
        """Generate thread: the rows posted to the writer thread, those with a flagged caption after its retry."""
        if not self.stop.requested:  # else generate was cut short: incomplete captions, resume redoes them
            self.retry_pool.add(results)

    def say_dropped(self) -> None:
        """Generate thread, stopping on a signal: the rows that waited for a retry go like the batch in flight."""
        if self.retry_pool.waiting:
            log.info("%d captioned rows waiting for the second try of a flagged caption are not written; resume "
                     "captions them again", len(self.retry_pool.waiting))

    def say_stopped(self) -> None:
        """Stopped by a signal, every finished row written: what this run did, and what is left at its rate (a
        Slurm job at its time limit: how much longer the next one needs)."""
        stats, failed = self.stats, sum(self.stats.failed.values())
        rate = stats.rates()["captioning_img_per_s"]
        left = max(self.plan.todo - stats.captioned - failed, 0)
        if rate:  # the next job's --dry-run estimates from it
            save_rate(self.writer.dir, rate)
        log.info("stopped: this run captioned %s%s%s; %d of this worker's %d left%s", plural(stats.captioned, "image"),
                 f" at {rate:.2f} img/s" if rate else "", f", {failed} failed" if failed else "", left,
                 self.plan.todo, f" (~{duration(left / rate)} at that rate)" if rate and left else "")

    def continuous(self, items) -> list[loader.Loaded]:
        """--decode-loop continuous: all of `items` through the backend's stream; what it leaves goes in batches."""
        backend, batches = self.backend, self.batches
        chunk_rows = getattr(backend, "stream_chunk_rows", lambda slots: None)(batches.size)
        if not chunk_rows:
            return []
        started, waited = time.monotonic(), []  # (waiting for the loader is not generate time, as in batches)
        try:
            return stream_loop.stream(backend, self.specs, items, batches.size, chunk_rows, assembler=self.assembler,
                                      should_stop=batches.should_stop,
                                      on_failure=lambda i: self.later(self.record_failure, i),
                                      on_chunk=lambda chunk, caps: self.captioned([(chunk, caps, None)]),
                                      on_handed_back=lambda chunk: self.captioned(batches.caption(chunk)),
                                      on_wait=waited.append)
        finally:
            self.stats.generate_s += time.monotonic() - started - sum(waited)

    def drop_upcoming(self) -> None:
        """Generate thread, after an out-of-memory error: the next batch was assembled at the old size, which the
        smaller retries will not use (Batches.caption); its device tensors go as soon as the assembly is done."""
        upcoming = self.upcoming
        if upcoming and upcoming[-1][1] is not None:
            future, upcoming[-1][1] = upcoming[-1][1], None
            if not future.cancel():
                future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().clear())

    def later(self, fn, *args) -> None:
        """Generate thread: post fn(*args) to the writer thread; the errors of its finished jobs are raised here."""
        posted = self.posted
        posted.append(self.post.submit(fn, *args))
        while posted and posted[0].done():
            posted.popleft().result()

    def drain(self) -> None:
        """Generate thread: wait for every job posted to the writer thread, raising its errors."""
        # Popped once done: a signal raising mid-wait leaves the job queued, so the next drain waits for it
        # before anything else touches the rows (else two threads could write parts at once).
        posted = self.posted
        while posted:
            posted[0].result()
            posted.popleft()

    # ------------------------------------------------------------ the writer thread

    def record(self, results: list[Result], retries: list[Retries]) -> None:
        """Writer thread: a batch's captions as rows (or failure rows), counted, then flushed when enough."""
        stats, specs = self.stats, self.specs
        for (items, caps, error), redone in zip(results, retries):
            for i, item in enumerate(items):
                if caps is None:
                    self.failures.append(failure_row(item.row, "generate", error))
                    stats.failed["generate"] += 1
                    continue
                out = {k: item.row.get(k) for k in self.writer.schema.names if k in item.row}
                values = rowcols.row_values([c[i] for c in caps], [r.get(i) for r in redone], specs)
                self.rows.append({**out, **values, "caption_model": self.model_name})
                stats.flags.update(values[rowcols.FLAGS_COLUMN])
                for name, column in self.flag_columns.items():
                    stats.flags_by_prompt.setdefault(name, Counter()).update(values[column])
                stats.captioned += 1
                stats.tokens += sum(c[i].tokens for c in caps) + sum(r[i].tokens for r in redone if i in r)
        stats.batch_done()  # the steady rate is measured from here (model loading and warm-up left out)
        self.progress.update(sum(len(items) for items, _, _ in results))
        self.progress.set_postfix(tok_s=f"{stats.rates()['tokens_per_s']:.0f}", failed=sum(stats.failed.values()),
                                  refresh=False)
        self.flush()

    def record_failure(self, item: loader.Loaded) -> None:
        """Writer thread: an image the loader could not read, as a failure row of its stage."""
        self.failures.append(failure_row(item.row, item.error.stage, str(item.error)))
        self.stats.failed[item.error.stage] += 1
        self.progress.update(1)
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Writer thread (the generate thread once it is drained): rows to a part, failures to the failures file."""
        # Rows leave the buffer before the write: a second Ctrl-C mid-write can cost them (captioned again on
        # resume) but never write them twice.
        rows, failures, cfg = self.rows, self.failures, self.cfg
        if rows and (force or len(rows) >= cfg.checkpoint_every):
            finished = rows[:]
            rows.clear()
            self.writer.write_part(finished)
            if self.pusher is not None:
                self.pusher.notify(len(finished))
        if failures and (force or len(failures) >= cfg.checkpoint_every):
            finished = failures[:]
            failures.clear()
            self.writer.write_failures(finished)
