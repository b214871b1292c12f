"""Many workers, one repo: first pushes staggered over the commit interval, lost races backed off with full
jitter up to a deadline (a scale review saw 779 commit POSTs for 61 commits and workers giving up)."""
from __future__ import annotations

import logging
import threading
import time

from hub_parts import COMMIT, REPO, RUN, Writer, assert_hub_matches, ckpt, client, sleeps  # noqa: F401  (fixtures)

from vlm_caption import hub
from vlm_caption.hub_pusher import BackgroundPusher


class _Recorder:
    """A client whose push only records that it was called."""

    def __init__(self):
        self.pushes, self.pushed = 0, threading.Event()

    def push(self, checkpoint_dir, run_id, worker) -> int:
        self.pushes += 1
        self.pushed.set()
        return 1

    def describe(self, error) -> str:
        return str(error)


def test_first_push_waits_for_the_workers_phase_in_the_interval(tmp_path):
    now = [1000.0]  # a fake clock: nothing here becomes due by real time passing
    clients = [_Recorder() for _ in range(4)]
    pushers = [BackgroundPusher(c, tmp_path, RUN, w, push_every=1, min_push_interval=64.0, num_workers=4,
                                clock=lambda: now[0]) for w, c in enumerate(clients)]
    for p in pushers:
        p.notify(1)
    assert clients[0].pushed.wait(10)  # worker 0 is never delayed
    now[0] += 16  # a quarter of the interval: worker 1's turn
    pushers[1].notify(0)
    assert clients[1].pushed.wait(10)
    assert pushers[2].close(final=False) is False and clients[2].pushes == 0  # due at +32 s: not yet
    assert pushers[3].close(final=True) is True and clients[3].pushes == 1  # the final push does not wait
    for p in pushers[:2]:
        p.close(final=False)
    assert [c.pushes for c in clients] == [1, 1, 0, 1]


def test_a_single_worker_is_never_delayed(tmp_path):
    recorder = _Recorder()
    pusher = BackgroundPusher(recorder, tmp_path, RUN, 0, push_every=1, min_push_interval=3600.0,
                              num_workers=1, clock=lambda: 0.0)
    pusher.notify(1)
    assert recorder.pushed.wait(10)
    pusher.close(final=False)
