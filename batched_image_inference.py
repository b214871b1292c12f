#!/usr/bin/env python3
"""Caption the downloaded ContraStyles images with Gemma 3, checkpointing and pushing to the Hub.

Examples:
  python batched_image_inference.py --max-images 10 --no-push
  python batched_image_inference.py --model google/gemma-3-4b-it --hf-repo me/ContraStylesRecap
  accelerate launch --num_processes 8 batched_image_inference.py --model google/gemma-3-12b-it
  python batched_image_inference.py --merge-only --checkpoint-dir ckpt_a ckpt_b
"""
from __future__ import annotations

import argparse

from vlm_caption.cli import script_imports

# outside the venv, or Ctrl-C while importing: one line, no traceback
with script_imports(as_script=__name__ == "__main__"):
    from vlm_caption import cli_args
    from vlm_caption.config import RunConfig

D = RunConfig()  # every default is the dataclass's, typed once


def build_parser() -> argparse.ArgumentParser:
    """The flags and their help: vlm_caption/cli_args.py (--help shows the common ones, --help-all all)."""
    return cli_args.caption_parser(__doc__)


def main(argv: list[str] | None = None) -> int:
    from vlm_caption import pipeline
    from vlm_caption.cli import setup_logging

    args = vars(build_parser().parse_args(argv))
    args["checkpoint_dirs"] = args["checkpoint_dirs"] or D.checkpoint_dirs  # "extend" starts from None
    setup_logging(args["verbose"])
    return pipeline.run(RunConfig(**args))


if __name__ == "__main__":
    from vlm_caption.cli import run_main

    run_main(main, exit_at_once_on_signal=True)  # threads only: no child process to clean up
