#!/usr/bin/env python3
"""The vision tower over a whole batch at once against in chunks of images (vision_chunks.py, what a run does):
peak memory above the model, time, and the features' difference.

Why: over a whole batch SigLIP's activations (batch_size.py estimates ~127 MB an image at 896 px in bf16) capped
`--batch-size auto` at 256 on an 80 GB card; in chunks the tower's peak is one chunk's. This measures that peak
on each side, with batch_size.row_memory's estimate of it beside, and that the chunks cost no speed.

The tower is SigLIP at the preset's width and depth (the 4B's: 1,152 wide, 27 layers) at --image-size pixels
(default 224: 256 patches, a sixteenth of 896's, so a CPU runs it in seconds); the language model is the tiny
preset's and unused. Each side calls the model's `get_image_features` as generate's prefill does. Peak memory:
on CUDA torch's peak allocated; on a CPU each side runs in a fresh process and the peak resident set is read
above what the process held before the call, with glibc's malloc told to give large blocks back when freed
(bench_prefill_memory.EXACT_RESIDENT_SET), so that the resident set follows what is alive. The sides
alternate, best of --rounds.

  OMP_NUM_THREADS=2 python benchmarks/bench_vision_chunks.py                     # CPU: 32 images, chunks of 8
  python benchmarks/bench_vision_chunks.py --device cuda --image-size 896 --batch 256 --chunk-rows 64 --dtype bfloat16

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill_memory import EXACT_RESIDENT_SET  # noqa: E402  (the scripts beside this one)
from bench_tower_compile import add_tower_arguments, build_tower_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tower_arguments(p, batch=32)
    p.add_argument("--chunk-rows", type=int, default=8, help="images a chunk (a run's: 64)")
    p.add_argument("--side", type=int, default=None, help=argparse.SUPPRESS)  # a child: this chunk size, once
    p.add_argument("--features-out", default=None, help=argparse.SUPPRESS)  # where the child saves its features
    return p.parse_args(argv)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (kilobytes on Linux)


def run_side(args, chunk_rows: int) -> dict:
    """One call of the tower + projector over the batch with `chunk_rows` (0: the whole batch at once):
    seconds, peak bytes above what was held before it, batch_size.row_memory's estimate of the tower's
    activations per image, and the features."""
    import torch

    from vlm_caption.batch_size import row_memory
    from vlm_caption.vision_chunks import set_vision_chunk_rows

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_tower_model(args.preset, args.image_size, device, dtype)
    set_vision_chunk_rows(model, chunk_rows)
    generator = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(device, dtype)
    with torch.inference_mode():
        model.model.get_image_features(pixels[:1], return_dict=True)  # first-call costs (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = _max_rss_bytes()
        start = time.perf_counter()
        features = model.model.get_image_features(pixels, return_dict=True).pooler_output
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _max_rss_bytes()) - before
    estimate = row_memory(model.config, 1, dtype.itemsize).vision
    return {"seconds": seconds, "peak_bytes": peak, "estimate_bytes_per_image": estimate,
            "features": features.float().cpu()}


def cpu_side(args, chunk_rows: int, folder: Path) -> dict:
    """run_side in a fresh process: its peak resident set is that side's alone."""
    import torch

    features = folder / f"features_{chunk_rows}.pt"
    same = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("preset", "image_size", "batch", "dtype")]
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *same, "--side", str(chunk_rows),
                          "--features-out", str(features)], check=True, capture_output=True, text=True,
                         env={**os.environ, **EXACT_RESIDENT_SET})
    side = json.loads(out.stdout.strip().splitlines()[-1])
    side["features"] = torch.load(features)
    return side


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.side is not None:  # a child: one side, its numbers on stdout, its features in a file
        side = run_side(args, args.side)
        torch.save(side.pop("features"), args.features_out)
        print(json.dumps(side))
        return 0
    sides = {"whole": 0, "chunks": args.chunk_rows}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):  # alternating: a machine that slows down slows every side
            for name, rows in sides.items():
                side = cpu_side(args, rows, Path(folder)) if args.device == "cpu" else run_side(args, rows)
                runs[name].append(side)
    diff = (runs["chunks"][0]["features"] - runs["whole"][0]["features"]).abs().max().item()
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    peak = {name: min(r["peak_bytes"] for r in rs) for name, rs in runs.items()}
    print(json.dumps({
        "preset": args.preset, "image_size": args.image_size, "batch": args.batch, "chunk_rows": args.chunk_rows,
        "dtype": args.dtype, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **{f"{name}_ms": round(1000 * s, 1) for name, s in best.items()},
        "chunks_vs_whole_speed": round(best["whole"] / best["chunks"], 3),
        **{f"{name}_peak_mb": round(b / 1e6, 1) for name, b in peak.items()},
        "peak_whole_over_chunks": round(peak["whole"] / max(peak["chunks"], 1), 2),
        "whole_peak_mb_per_image": round(peak["whole"] / args.batch / 1e6, 3),
        "estimate_mb_per_image": round(runs["whole"][0]["estimate_bytes_per_image"] / 1e6, 3),
        "features_max_abs_diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
