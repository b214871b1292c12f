#!/usr/bin/env python3
"""Smoke tests to run before a long captioning job. Each check prints PASS <name> or FAIL <name>: <reason>.

  python test_pipeline.py --skip-model                  # data dir layout, metadata columns, N images open, schema
  python test_pipeline.py --num-images 3                # + caption 3 images with --model, check the merged output
  python test_pipeline.py --num-images 3 --tiny         # the same with an offline random-weight tiny model
  python test_pipeline.py --full --push --num-images 5  # + a rerun resumes with nothing to do, + a Hub push

Captioning goes through batched_image_inference.main into a tmp checkpoint dir (removed when every check
passed) or --checkpoint-dir (kept). --push writes to --hf-repo, by default a separate smoke-test repo, so a
test never mixes its rows and dataset card into the real dataset.
Exit code: 0 every check passed, 1 a check failed (or the dependencies are missing: run ./setup.sh), 2 bad usage.
"""
from __future__ import annotations

import argparse

from vlm_caption import cli
from pathlib import Path

from vlm_caption.cli import script_imports

# outside the venv, or Ctrl-C while importing: one line, no traceback
with script_imports(as_script=__name__ == "__main__"):
    from vlm_caption.cli_args import HelpFormatter
    from vlm_caption.config import DEFAULT_DATA_DIR, check_writable_dir, resolve_repo_id
    from vlm_caption.errors import UsageError
    from vlm_caption.smoke import DEFAULT_SMOKE_MODEL, DEFAULT_SMOKE_REPO


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=HelpFormatter)  # short metavars, as the other scripts
    p.add_argument("--data-dir", metavar="DIR", default=DEFAULT_DATA_DIR,
                   help="what download_data.py wrote (default: %(default)s)")
    p.add_argument("--skip-model", action="store_true", help="only the data checks; load no model")
    p.add_argument("--num-images", metavar="N", type=int, default=3,
                   help="images to open and caption (default: %(default)s)")
    p.add_argument("--model", metavar="ID|DIR", help=f"model to caption with (default: {DEFAULT_SMOKE_MODEL})")
    p.add_argument("--tiny", action="store_true", help="build and use an offline random-weight tiny Gemma 3 "
                   "instead of --model (tests the machinery, not caption quality)")
    p.add_argument("--max-tokens", metavar="N", type=int, default=256,
                   help="max new tokens per caption (default: %(default)s)")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="checkpoint dir to caption into and keep (default: a tmp dir)")
    p.add_argument("--full", action="store_true", help="also rerun to check that resume does nothing")
    p.add_argument("--push", action="store_true", help="with --full: push to --hf-repo and check the push")
    p.add_argument("--hf-repo", metavar="REPO", default=DEFAULT_SMOKE_REPO, help="dataset repo for --push: NAME or "
                   "USER/NAME "
                   "(default: %(default)s, kept apart from the real dataset)")
    p.add_argument("--hf-username", metavar="USER", default="somepago",
                   help="owner for a bare --hf-repo (default: %(default)s)")
    p.add_argument("--hub-endpoint", metavar="URL", help="another Hub endpoint for --push (a mirror or a local stub)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (also of the HTTP libraries)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error(f"--num-images must be a positive integer, got {args.num_images}")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.checkpoint_dir is not None:  # a file or unwritable: now, not as a FAIL after the data checks and a model
        try:
            check_writable_dir(Path(args.checkpoint_dir), "--checkpoint-dir")
        except UsageError as e:
            p.error(str(e))
    if args.skip_model and (args.tiny or args.full or args.push or args.model):
        p.error("--skip-model loads no model: it excludes --model, --tiny, --full and --push")
    if args.push and not args.full:
        p.error("--push runs the whole pipeline: give it with --full")
    if args.tiny and args.model:
        p.error("--tiny replaces --model: give one of them")
    if args.tiny and args.checkpoint_dir and (Path(args.checkpoint_dir) / "run.json").exists():
        # Each --tiny build is another model (smoke.check_tiny_model): the dir's run would be refused as one with
        # other settings, its message pointing at an --overwrite this script does not have.
        p.error(f"--checkpoint-dir {args.checkpoint_dir} holds a run already and each --tiny build is a new model: "
                "give a new --checkpoint-dir")
    if args.push:  # a malformed repo id: a usage error now, not a FAIL (exit 1) after the data checks
        try:
            resolve_repo_id(args.hf_repo, args.hf_username)
        except UsageError as e:
            p.error(str(e))
    if not args.skip_model and not args.tiny:
        args.model = args.model or DEFAULT_SMOKE_MODEL
    return args


def main(argv: list[str] | None = None) -> int:
    from vlm_caption.cli import setup_logging

    args = parse_args(argv)
    setup_logging(args.verbose)
    from vlm_caption.smoke import run_checks

    return run_checks(args)


if __name__ == "__main__":
    from vlm_caption.cli import run_main

    run_main(main)
