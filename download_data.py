#!/usr/bin/env python
"""Download the ContraStyles images with img2dataset, check every file decodes, write the metadata.

    python download_data.py --output ./data/contrastyles_full --processes 16 --threads 64

Reruns resume: finished shards are not downloaded again and validated shards are not checked again.
The logic lives in vlm_caption/download.py (decode checks and metadata files: vlm_caption/validate.py).

Exit code: 0 every row is a valid image or a permanent failure (HTTP 404/403, undecodable file), recorded
with its reason; 3 nothing usable was downloaded, a shard is unfinished, or a download failed in a way
worth retrying (timeout, HTTP 408/429/5xx, connection error); with --strict, 3 on any failure at all;
2 bad usage; 1 a fatal condition (or the dependencies are missing: run ./setup.sh).
"""
from __future__ import annotations

import argparse
import signal
import sys

if __name__ == "__mp_main__":
    # img2dataset's spawned processes (its pool's workers, its logger) import this file first. A terminal's
    # Ctrl-C reaches the whole process group: each would print a KeyboardInterrupt traceback. They ignore it;
    # the parent stops them (img2dataset's SIGINT handler and its pool's exit terminate them).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # img2dataset imports torch only for webdataset's torch shims, which fall back without it, and these
    # processes never use it: each then starts in half the CPU and memory (BENCHMARKS.md section 10). For good
    # only here: datasets' load_dataset (a Hub source) imports torch whenever its name is in sys.modules, so the
    # parent keeps it out only while it imports img2dataset (download_workers.torch_kept_out).
    sys.modules.setdefault("torch", None)
    from vlm_caption.download_workers import defer_unused_imports, exit_with_parent

    defer_unused_imports()  # albumentations and wandb, which img2dataset imports and never uses here
    exit_with_parent()  # else img2dataset's logger process outlives a parent killed with SIGKILL

from vlm_caption.cli import script_imports

# outside the venv, or Ctrl-C while importing: one line, no traceback
with script_imports(as_script=__name__ == "__main__"):
    from vlm_caption import cli_args
    from vlm_caption.cli import run_main, setup_logging
    from vlm_caption.config import DownloadConfig


def build_parser() -> argparse.ArgumentParser:
    """The flags and their help: vlm_caption/cli_args.py."""
    return cli_args.download_parser(__doc__)


def parse_args(argv: list[str] | None) -> tuple[DownloadConfig, bool]:
    """(the settings, --strict)."""
    a = build_parser().parse_args(argv)
    return DownloadConfig(output=a.output, source=a.source, split=a.split, threads=a.threads,
                          processes=a.processes, timeout=a.timeout, max_image_mb=a.max_image_mb, retries=a.retries,
                          max_rows=a.max_rows, shard_size=a.shard_size, distributor=a.distributor,
                          validate_workers=a.validate_workers, verbose=a.verbose), a.strict


def main(argv: list[str] | None = None) -> int:
    cfg, strict = parse_args(argv)
    cfg.validate()
    setup_logging(cfg.verbose)
    from vlm_caption.download import run_download

    return run_download(cfg, strict=strict)


if __name__ == "__main__":  # the guard also keeps img2dataset's spawned workers from rerunning main()
    run_main(main)
