#!/usr/bin/env python3
"""A launch with a cold compile cache against one with the cache an earlier launch left (`--compile-cache`).

Each side is a fresh process of batched_image_inference.py with `--compile on --decode-loop graph` (inductor,
as on a GPU) over the same images into a fresh checkpoint dir, so both do the same work and differ only in
what the cache holds: cold = an empty cache dir, warm = the dir the first cold launch filled (as after a
relaunch, or on another machine given a copy). The sides alternate; the best of --rounds is kept.

  OMP_NUM_THREADS=2 python benchmarks/bench_compile_cache.py --preset small --rounds 3

Prints one JSON line: process wall seconds per side, their ratio, and the graphs each side loaded or compiled
(run_summary.json's compile_cache).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny_model preset saved to disk (default: %(default)s)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", help="scratch dir (default: a temporary one, removed)")
    return p.parse_args(argv)


def launch(args, model: Path, data: Path, ckpt: Path, cache: Path) -> tuple[float, dict]:
    """One captioning process; (its wall seconds, run_summary's compile_cache)."""
    cmd = [sys.executable, str(ROOT / "batched_image_inference.py"), "--model", str(model), "--data-dir", str(data),
           "--checkpoint-dir", str(ckpt), "--compile", "on", "--decode-loop", "graph", "--no-push",
           "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size), "--compile-cache", str(cache)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((ckpt / "run_summary.json").read_text())
    return wall, summary["this_run"].get("compile_cache") or {}


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlm_caption import sample_data, tiny_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_compile_cache_"))
    try:
        model = tiny_model.build_tiny_model(work / "model", preset=args.preset)
        data = sample_data.write_sample(work / "data", n=args.images, seed=0)
        warm_cache = work / "warm_cache"
        best: dict[str, tuple[float, dict]] = {}
        for r in range(args.rounds):
            for side in ("cold", "warm"):
                cache = warm_cache if side == "warm" else work / f"cold_cache_{r}"
                if side == "warm" and not warm_cache.exists():
                    shutil.copytree(work / "cold_cache_0", warm_cache)  # a copy: as another machine would get it
                wall, graphs = launch(args, model, data, work / f"ckpt_{side}_{r}", cache)
                if side not in best or wall < best[side][0]:
                    best[side] = (wall, graphs)
        line = {"preset": args.preset, "images": args.images, "batch_size": args.batch_size,
                "max_tokens": args.max_tokens, "rounds": args.rounds,
                "cold_s": round(best["cold"][0], 2), "warm_s": round(best["warm"][0], 2),
                "cold_over_warm": round(best["cold"][0] / best["warm"][0], 2),
                "cold_graphs": best["cold"][1], "warm_graphs": best["warm"][1]}
        print(json.dumps(line))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
