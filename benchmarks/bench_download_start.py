#!/usr/bin/env python3
"""What each download process costs before it downloads anything: importing what img2dataset's pool workers and
logger import (download_data.py's imports, img2dataset with its downloader and logger), with torch as
img2dataset finds it and with torch kept out as download_data.py's spawned processes do (webdataset falls back
to its shims).

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
           "print('torch' in sys.modules and sys.modules['torch'] is not None)")
SIDES = {"with_torch": "import sys; " + IMPORTS,
         "without_torch": "import sys; sys.modules.setdefault('torch', None); " + IMPORTS}


def one_process(code: str) -> tuple[float, float, bool]:
    """(CPU s, peak RSS MB, torch imported) of a fresh interpreter running `code`."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the import failed (exit {proc.returncode})")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.strip() == "True"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for side, code in SIDES.items():
            cpu, rss, has_torch = one_process(code)
            assert has_torch == (side == "with_torch"), (side, has_torch)
            old = best.get(side, (float("inf"), float("inf")))
            best[side] = (min(old[0], cpu), min(old[1], rss))
    (cpu_with, rss_with), (cpu_without, rss_without) = best["with_torch"], best["without_torch"]
    print(json.dumps({"rounds": args.rounds, "cpu_s_with_torch": round(cpu_with, 2),
                      "cpu_s_without_torch": round(cpu_without, 2), "cpu_ratio": round(cpu_with / cpu_without, 2),
                      "rss_mb_with_torch": round(rss_with), "rss_mb_without_torch": round(rss_without),
                      "rss_ratio": round(rss_with / rss_without, 2)}))


if __name__ == "__main__":
    main()
