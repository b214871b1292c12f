"""Pushing while captioning: a daemon thread that commits a worker's new parts, so captioning never waits
for the Hub, within the run's commit budget (pipeline computes the interval)."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import FatalError
from .hub import HubClient
from .hub_retry import HubUnavailable

log = logging.getLogger(__name__)


class BackgroundPusher:
    """Pushes from a daemon thread, so captioning never waits for the Hub.

    A push starts once push_every rows are pending and min_push_interval seconds have passed since the last
    push attempt (the Hub rate-limits commits; after a failed attempt the interval is waited out too).
    Worker w of num_workers makes its first attempt no earlier than w/num_workers of an interval after the
    start: equal workers started together would otherwise all commit in the same seconds and race for the
    head. Worker 0 (so a single-worker run) and the final push at close() never wait for it.
    """

    def __init__(self, client: HubClient, checkpoint_dir: Path | str, run_id: str, worker: int,
                 push_every: int = 500, min_push_interval: float = 120.0, num_workers: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.checkpoint_dir, self.run_id, self.worker = client, Path(checkpoint_dir), run_id, worker
        self.push_every, self.min_push_interval = push_every, min_push_interval
        self.rows_pushed, self.last_error = 0, None
        self.refused: str | None = None  # the Hub's last refusal (401/403/404...): rerunning as is will not help
        self._clock = clock  # tests pass a fake one
        phase = (worker % max(1, num_workers)) / max(1, num_workers)  # no num_workers given: never delayed
        self._next_attempt = clock() + min_push_interval * phase
        self._pending_rows, self._closing = 0, False
        self._final, self._final_ok = False, False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"hub-push-w{worker:03d}", daemon=True)
        self._thread.start()

    def notify(self, rows_written: int) -> None:
        """Called after each part is written; never blocks on the Hub."""
        with self._cond:
            self._pending_rows += rows_written
            self._cond.notify()

    def _wait_for_trigger(self) -> int | None:
        """Rows pending once a push is due; None when closing."""
        with self._cond:
            while not self._closing:
                due_in = self._next_attempt - self._clock()
                if self._pending_rows >= self.push_every and due_in <= 0:
                    self._next_attempt = self._clock() + self.min_push_interval
                    return self._pending_rows
                self._cond.wait(timeout=due_in if self._pending_rows >= self.push_every else None)
            return None

    def _run(self) -> None:
        while (snapshot := self._wait_for_trigger()) is not None:
            if self._push():
                with self._cond:  # rows notified during the push stay counted
                    self._pending_rows = max(0, self._pending_rows - snapshot)
        self._final_ok = self._push(final=True) if self._final else False

    def _push(self, final: bool = False) -> bool:
        try:
            self.rows_pushed += self.client.push(self.checkpoint_dir, self.run_id, self.worker)
            self.last_error = None
            return True
        except HubUnavailable as e:
            self.last_error = str(e)
            if final:  # nothing is captioned after this push: say where the rows are
                log.warning("Hub unavailable at the final push; the parts stay pending for the next run or "
                            "--push-only: %s", e)
            else:
                log.warning("Hub unavailable, captioning goes on; pending parts go at the next trigger: %s", e)
        # The thread must outlive any failure (a revoked token, a full disk): log it, close() reports it.
        except Exception as e:  # noqa: BLE001
            self.last_error = self.client.describe(e)
            if isinstance(e, FatalError):  # not HubUnavailable (caught above): the Hub said no (scrubbed line)
                self.refused = str(e)
            log.error("Hub push failed, captioning goes on: %s", self.last_error)
            if not isinstance(e, (FatalError, OSError)):  # likely a bug of ours: where it is, with -v
                log.debug("the failed push's traceback", exc_info=True)
        return False

    def close(self, final: bool = True, timeout: float | None = None) -> bool:
        """Wait for a push in flight; with final, push all that is pending. True when that push went through.

        With a timeout (after SIGTERM / Ctrl-C) the process does not wait longer for the Hub: what is not
        pushed by then stays in the parts, for the next run or --push-only.
        """
        with self._cond:
            self._closing, self._final = True, final
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("Hub: the final push did not finish within %.0f s; the rest stays pending for the next "
                        "run or --push-only", timeout)
            return False
        return self._final_ok
