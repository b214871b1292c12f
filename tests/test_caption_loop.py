"""caption_loop.py, the loop split from pipeline.py: the names and log lines users and benchmarks know stay."""
from __future__ import annotations

import logging

from dummy_runs import dummy_args

from batched_image_inference import main
from vlm_caption import caption_loop, pipeline
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK


def test_the_loop_logs_under_the_pipelines_name_and_pipeline_still_offers_caption_all(sample_data_dir, tmp_path,
                                                                                      caplog):
    """The log format prints the logger's name: moved with the loop, "vlm_caption.pipeline: batch size 4 ..."
    became "vlm_caption.caption_loop: ..." (a changed line for whoever greps a run's log)."""
    with caplog.at_level(logging.INFO, logger="vlm_caption"):
        assert main(dummy_args(sample_data_dir, tmp_path / "ckpt", "--max-images", "8")) in (EXIT_OK, EXIT_ITEMS_FAILED)
    said = [(r.name, r.getMessage()) for r in caplog.records if r.getMessage().startswith("batch size ")]
    assert said == [("vlm_caption.pipeline", "batch size 4 (--batch-size)")]
    assert pipeline.caption_all is caption_loop.caption_all  # benchmarks/bench_captioning.py calls it there
