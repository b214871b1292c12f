#!/usr/bin/env python3
"""What each download process costs before it downloads anything: importing what img2dataset's pool workers and
logger import (download_data.py's imports, img2dataset with its downloader and logger), with torch as
img2dataset finds it, with torch kept out (webdataset falls back to its shims), and with torch kept out and
albumentations and wandb deferred (download_workers.defer_unused_imports) as download_data.py's spawned
processes now do.

  python benchmarks/bench_download_start.py --rounds 5

The two sides alternate in every round and each keeps its best round (a shared machine only ever adds time).
Prints one JSON line: CPU seconds and peak RSS of one such process on each side, and their ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORTS = ("import vlm_caption.download, img2dataset.downloader, img2dataset.logger; "
           "print('torch' in sys.modules and sys.modules['torch'] is not None, "
           "'albumentations.augmentations' in sys.modules, 'wandb.sdk' in sys.modules)")
NO_TORCH = "sys.modules.setdefault('torch', None); "
SIDES = {"with_torch": "import sys; " + IMPORTS,
         "without_torch": "import sys; " + NO_TORCH + IMPORTS,
         "deferred": ("import sys; " + NO_TORCH + "from vlm_caption.download_workers import defer_unused_imports; "
                      "defer_unused_imports(); " + IMPORTS)}
LOADED = {"with_torch": "True True True", "without_torch": "False True True", "deferred": "False False False"}


def one_process(code: str) -> tuple[float, float, str]:
    """(CPU s, peak RSS MB, whether torch, albumentations and wandb were loaded) of a fresh interpreter."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the import failed (exit {proc.returncode})")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for side, code in SIDES.items():
            cpu, rss, loaded = one_process(code)
            assert loaded == LOADED[side], (side, loaded)
            old = best.get(side, (float("inf"), float("inf")))
            best[side] = (min(old[0], cpu), min(old[1], rss))
    result = {"rounds": args.rounds}
    for side, (cpu, rss) in best.items():
        result.update({f"cpu_s_{side}": round(cpu, 2), f"rss_mb_{side}": round(rss)})
    for side in ("without_torch", "deferred"):  # how many times less than img2dataset as it comes
        result.update({f"cpu_ratio_{side}": round(best["with_torch"][0] / best[side][0], 2),
                       f"rss_ratio_{side}": round(best["with_torch"][1] / best[side][1], 2)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
