"""SIGTERM (what Slurm and Kubernetes send before SIGKILL) and SIGINT (Ctrl-C) stop a run the same way.

While captioning, the first signal only asks to stop: generate ends at its next token, the batch in flight and
the rows waiting for the second try of a flagged caption (retry_pool.py) are dropped (captioned again on
resume), the finished captions are written to a part, a bounded final push runs, and the process exits 128 +
the signal number. Anywhere else, and on a second signal, the signal raises Interrupted at once (atomic writes
leave no half file behind).

A signal within SAME_STOP_S of the first is the same stop delivered twice, not a second one: Slurm signals every
process of the job at its time limit and torchrun (or srun) forwards the signal it got to its workers as well,
and a terminal's Ctrl-C reaches torchrun's workers both directly and through torchrun. Taken as "stop at once",
that double delivery dropped every finished caption not yet in a part and the final push.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)
SAME_STOP_S = 2.0  # a launcher forwards the signal within milliseconds; a person sends a second one later


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; exit code 128 + signum, like a shell reports it."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Installs the handlers in the main thread for the duration of a `with` block."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received while graceful
        self._graceful = False
        self._first_at: float | None = None  # when the first signal came (time.monotonic)
        self._previous: dict[int, object] = {}
        self._said = threading.Lock()  # held once taken: the stop is said once, by the first thread to see it

    @property
    def requested(self) -> bool:
        if self.signum is not None and self._said.acquire(blocking=False):
            log.warning("%s received: stopping after writing the captions already made (send it again to stop "
                        "at once)", signal.Signals(self.signum).name)
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at < SAME_STOP_S:
            return  # the first signal again, forwarded by a launcher (module doc): the stop under way goes on
        if self._first_at is None:
            self._first_at = now
        if self._graceful and self.signum is None:
            # No logging here: the handler runs between two bytecodes of the main thread, which may be inside a
            # write to stderr ("reentrant call" RuntimeError). The loop checks `requested` and says it there.
            self.signum = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def graceful(self):
        """Inside, a first signal sets `requested` instead of raising; the loop checks it."""
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    def raise_if_requested(self) -> None:
        if self.requested:
            raise Interrupted(self.signum)
