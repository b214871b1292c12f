"""The whole pipeline offline in well under a minute: tiny model, sample data, caption, merge, preview.

    python -m vlm_caption.demo [--demo-dir ./demo] [--n 24]
    ./run_captioning.sh --demo [--demo-dir DIR]

Builds DIR/model (a random-weight Gemma 3, preset tiny) and DIR/data (a synthetic sample in the
img2dataset layout, a few files deliberately broken) once and reuses them afterwards, captions through
the same pipeline.run as batched_image_inference.py (--no-push), which merges into all_captions.parquet
and writes run_summary.json, then writes DIR/preview.html. A second run resumes: nothing is left to do.

Exit code: the sample's broken files (a truncated JPEG, a 0-byte file, an HTML page saved as .jpg) are
listed in data/invalid_images.parquet, as the download stage records them. download_data.py leaves them
out of full_metadata.parquet; the demo puts them in on purpose (sample_data's include_broken_in_metadata)
so that the captioner meets them and you see how failures are recorded. Their failures are the expected
outcome, so the demo exits 0 when every failed key is one of those; any other failure gives the
pipeline's own code (3), as a real run would.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from . import cli
from .cli import plural
from .errors import brief

# outside the venv, or Ctrl-C while importing: one line, no traceback
with cli.script_imports(as_script=__name__ == "__main__", prog="python -m vlm_caption.demo"):
    import pyarrow.parquet as pq

    from . import endings, locks, pipeline, store
    from .config import RunConfig, check_writable_dir
    from .data_layout import INVALID_FILE
    from .errors import EXIT_ITEMS_FAILED, EXIT_OK, UsageError

DEFAULT_DIR = "./demo"
DEFAULT_ROWS = 24
MIN_ROWS = 8  # the sample puts 6 broken rows in; keep some good ones
DATA_DONE_MARKER = "download_summary.json"  # written last by sample_data.write_sample
DEMO_LOCK = "demo.lock"  # held by the demo running in DIR (a second one at once is refused)
REAL_MODELS = "google/gemma-3-4b-it (or google/gemma-3-12b-it, google/gemma-3-27b-it)"


# ---------------------------------------------------------------- building once

def _build_into(final: Path, build) -> None:
    """Build into a tmp sibling, then rename: an interrupted build is never mistaken for a finished one."""
    if final.exists():
        raise UsageError(f"{final} exists but is incomplete (not built by the demo?); remove it and rerun")
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted earlier build
    build(tmp)
    os.replace(tmp, final)


def ensure_model(demo_dir: Path) -> tuple[Path, bool]:
    """(model dir, built now?)"""
    model = demo_dir / "model"
    if (model / "config.json").is_file():
        return model, False
    from .random_weights import RANDOM_WEIGHTS_MARKER
    from .tiny_model import build_tiny_model  # imports transformers: only when a build is needed

    def build(tmp: Path) -> None:
        build_tiny_model(tmp, preset="tiny", seed=0)
        # The preview of any run with this model says that its captions are noise.
        (tmp / RANDOM_WEIGHTS_MARKER).write_text("Random weights (vlm_caption.tiny_model, preset tiny): captions "
                                                 "written with this model are noise.\n", encoding="utf-8")

    _build_into(model, build)
    return model, True


def _sample_rows(data: Path) -> int | None:
    try:
        return json.loads((data / DATA_DONE_MARKER).read_text(encoding="utf-8")).get("rows_in")
    except (OSError, ValueError, AttributeError):
        return None


def ensure_data(demo_dir: Path, n: int | None) -> tuple[Path, bool]:
    """(data dir, built now?). n None: DEFAULT_ROWS for a new sample, any size for an existing one."""
    data = demo_dir / "data"
    if (data / DATA_DONE_MARKER).is_file():
        if n is not None and (built_rows := _sample_rows(data)) != n:  # its checkpoints are of that sample
            raise UsageError(f"{data} holds the sample of {built_rows or 'an unknown number of'} rows, not --n {n}: "
                             f"delete {demo_dir} (or pass another --demo-dir) to build a new one")
        return data, False
    n = DEFAULT_ROWS if n is None else n
    from .sample_data import write_sample

    # The broken files go into full_metadata.parquet on purpose (a real download leaves them out).
    _build_into(data, lambda tmp: write_sample(tmp, n=n, broken=True, seed=0, include_broken_in_metadata=True))
    return data, True


# ---------------------------------------------------------------- judging the failures

def broken_on_purpose(data: Path) -> set[str]:
    path = data / INVALID_FILE
    return set(pq.read_table(path, columns=["key"]).column("key").to_pylist()) if path.is_file() else set()


def still_failed(ckpt: Path) -> list[dict]:
    """Failure records (key, stage, error) of keys that no part holds, one per key."""
    captioned = set(pq.read_table(ckpt / store.MERGED, columns=["key"]).column("key").to_pylist())
    failed = endings.still_failed([ckpt], captioned)
    return [failed[k] for k in sorted(failed)]


# ---------------------------------------------------------------- output

def print_report(demo_dir: Path, model: Path, data: Path, ckpt: Path, preview: Path, cards: int,
                 seconds: float) -> None:
    merged_rows = pq.ParquetFile(ckpt / store.MERGED).metadata.num_rows
    print(f"\nDemo done in {seconds:.1f} s. Everything is under {demo_dir}/:")
    for label, path, note in [
        ("model", model, "tiny random-weight Gemma 3 (preset tiny), saved like a Hub model"),
        ("data", data, "synthetic sample in the img2dataset layout, some files broken on purpose"),
        ("checkpoints", ckpt, f"run.json, {store.PARTS_DIR}/, {store.FAILURES_DIR}/"),
        ("captions", ckpt / store.MERGED, f"{merged_rows} rows, the output schema"),
        ("summary", ckpt / store.SUMMARY, "counts, img/s, tokens/s"),
        ("preview", preview, f"{plural(cards, 'caption card')} and the failed images: open it in a browser"),
    ]:
        print(f"  {label:<12} {path}  ({note})")


def print_failures(failures: list[dict], expected: set[str]) -> list[dict]:
    """Explain the failures; returns the unexpected ones."""
    planned = [f for f in failures if f["key"] in expected]
    other = [f for f in failures if f["key"] not in expected]
    if planned:
        print(f"\n{plural(len(planned), 'image')} failed as intended: the sample holds deliberately broken files "
              f"(listed in {INVALID_FILE}; the demo also lists them in its full_metadata.parquet, which a real "
              "download never does, so that you see them fail); a run records such images in failures/ and goes on:")
        for f in planned:
            print(f"  {f['key']}  {f['stage']:<8} {brief(f['error'], 100)}")
    if other:
        print(f"\n{plural(len(other), 'image')} failed that {'was' if len(other) == 1 else 'were'} NOT broken on "
              "purpose (a bug or a problem on this machine):")
        for f in other:
            print(f"  {f['key']}  {f['stage']:<8} {brief(f['error'], 100)}")
    return other


def print_noise_warning() -> None:
    print("\nNOTE: these captions are NOISE. The demo model has random weights: it shows that the pipeline runs "
          "(loading, batching, checkpoints, merge, preview), not what Gemma 3 writes.")
    print(f"For real captions use a real model, e.g. ./run_captioning.sh --model {REAL_MODELS} "
          "--max-images 10 --no-push. That needs Hub access: log in with `hf auth login` (or set HF_TOKEN) and "
          "accept the Gemma licence at https://huggingface.co/google/gemma-3-4b-it")


# ---------------------------------------------------------------- main

def demo_config(model: Path, data: Path, ckpt: Path, verbose: bool) -> RunConfig:
    # The resolved model path keeps run.json's settings equal on a rerun from another working directory.
    return RunConfig(model=str(model.resolve()), data_dir=str(data), checkpoint_dirs=[str(ckpt)], no_push=True,
                     max_tokens=32, batch_size=8, checkpoint_every=8, num_loader_workers=2,
                     num_workers=1, worker_index=0, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(prog="python -m vlm_caption.demo", description=__doc__.split("\n\n")[0])
    # --demo-dir first: the usage line shows the name README and run_captioning.sh --help give
    p.add_argument("--demo-dir", "--dir", dest="dir", metavar="DIR", default=DEFAULT_DIR,
                   help="where the model, data, checkpoints and preview go (default: %(default)s)")
    p.add_argument("--n", type=int, default=None,
                   help=f"rows of the sample data, at least {MIN_ROWS} (default: {DEFAULT_ROWS}, or the size of an "
                        "existing sample)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--help-all", action="help", help=argparse.SUPPRESS)  # run_captioning.sh's --help-all: one help
    a = p.parse_args(argv)
    if a.n is not None and a.n < MIN_ROWS:
        raise UsageError(f"--n must be at least {MIN_ROWS}, got {a.n}")
    check_writable_dir(Path(a.dir), "--demo-dir")
    # The demo never needs the network: the model is a local directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .cli import setup_logging

    setup_logging(a.verbose)
    return run_demo(Path(a.dir), a.n, a.verbose)


def run_demo(demo_dir: Path, n: int | None = None, verbose: bool = False) -> int:
    started = time.monotonic()
    demo_dir.mkdir(parents=True, exist_ok=True)
    # A second demo on this dir would build into the same tmp dirs as the first: refused, naming the first.
    lock = locks.hold_exclusive(demo_dir / DEMO_LOCK, f"--demo-dir {demo_dir}")
    try:
        return _run_demo(demo_dir, n, verbose, started)
    finally:
        os.close(lock)


def _run_demo(demo_dir: Path, n: int | None, verbose: bool, started: float) -> int:
    model, built = ensure_model(demo_dir)
    print(f"{'built' if built else 'reusing'} tiny model {model}")
    data, built = ensure_data(demo_dir, n)
    print(f"{'wrote' if built else 'reusing'} sample data {data}" + ("" if built else " (delete it to rebuild)"))
    ckpt = demo_dir / "checkpoints"
    code = pipeline.run(demo_config(model, data, ckpt, verbose))
    if code not in (EXIT_OK, EXIT_ITEMS_FAILED):
        return code
    from .preview import write_preview

    preview = demo_dir / "preview.html"
    cards = write_preview(ckpt, preview, data_dir=data, random_weights=True)
    print_report(demo_dir, model, data, ckpt, preview, cards, time.monotonic() - started)
    unexpected = print_failures(still_failed(ckpt), broken_on_purpose(data))
    print_noise_warning()
    return EXIT_ITEMS_FAILED if unexpected else EXIT_OK


if __name__ == "__main__":
    from .cli import run_main

    run_main(main, prog=f"python -m {__spec__.name}" if __spec__ else None)
