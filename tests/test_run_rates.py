"""run_summary.json's rates: what they count and what they leave out."""
from __future__ import annotations

import json
import time
import types

from batched_image_inference import main
from vlm_caption import pipeline, store
from vlm_caption.errors import EXIT_OK
from vlm_caption.hub_pusher import BackgroundPusher


def test_the_final_hub_push_is_not_captioning_time(hub_stub, sample_data_dir, tmp_path, monkeypatch):
    """A last commit the Hub answered after 120 s (a multi-worker end of run on a slow Hub) made a run of 600
    img/s report "0.12 img/s captioning", the rate the time estimates read. A clock that jumps 1000 s while the
    final push runs must not reach that rate."""
    jump = [0.0]
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + jump[0]))
    real_close = BackgroundPusher.close

    def slow_close(self, *args, **kwargs):
        jump[0] = 1000.0
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(BackgroundPusher, "close", slow_close)
    ckpt = tmp_path / "ckpt"
    code = main(["--backend", "dummy", "--model", "dummy-model", "--data-dir", str(sample_data_dir),
                 "--checkpoint-dir", str(ckpt), "--hf-repo", "tester/rates", "--hub-endpoint", hub_stub.endpoint,
                 "--min-push-interval", "0", "--batch-size", "4", "--checkpoint-every", "8",
                 "--num-loader-workers", "1"])
    assert code == EXIT_OK
    this = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]
    assert hub_stub.commits_applied >= 1 and this["captioned"] > 4
    # captioned after the first batch, over at most the seconds counted: under 1000 s, so not the push's
    assert this["captioning_img_per_s"] * 1000 > this["captioned"] - 4
    assert this["wall_s"] >= 1000  # the whole run's wall time still holds the push
