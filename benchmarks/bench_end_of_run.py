#!/usr/bin/env python3
"""End of a run with many workers on one checkpoint dir: how long each worker spends after its last caption.

Launches --workers processes of batched_image_inference.py (--num-workers N --worker-index i, one shared
checkpoint dir, the tiny random Gemma 3, --no-push) at once and measures, per worker, the seconds from its last
part write to its exit: the merge, the summary, waiting for a lock. Before this project merged once per dir,
every worker merged the whole dir in turn under a lock; --code-dir runs another checkout (an older commit) with
the same data to compare:

    git worktree add ../before <old commit>
    python benchmarks/bench_end_of_run.py --workers 8 --images 2000 --code-dir ../before
    python benchmarks/bench_end_of_run.py --workers 8 --images 2000

Prints one JSON line: {"code", "workers", "images", "end_s_max", "end_s_mean", "merges", "wall_s"}.

`--merge-rows N` instead times one merge of a dir of N synthetic rows (parts of 200 rows, 8 workers): the cost
that every worker paid in turn at the end before, and that only the last worker pays now.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--code-dir", default=str(ROOT), help="checkout whose batched_image_inference.py runs")
    p.add_argument("--work", help="reuse this dir for the sample and the model (default: a tmp dir)")
    p.add_argument("--merge-rows", type=int, help="only time one merge of this many synthetic rows")
    args = p.parse_args()
    if args.merge_rows:
        return time_merge(args.merge_rows, Path(args.work or tempfile.mkdtemp(prefix="bench_merge_")))

    from vlm_caption.sample_data import write_sample
    from vlm_caption.store import list_parts
    from vlm_caption.tiny_model import build_tiny_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_end_"))
    data, model = work / f"data{args.images}", work / "model"
    if not data.exists():
        write_sample(data, n=args.images, broken=False, seed=0)
    if not model.exists():
        build_tiny_model(model, preset="tiny", seed=0)
    ckpt = Path(tempfile.mkdtemp(prefix="ckpt_", dir=work))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": args.code_dir}
    cmd = [sys.executable, str(Path(args.code_dir) / "batched_image_inference.py"), "--model", str(model),
           "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push", "--max-tokens", "4",
           "--batch-size", "16", "--checkpoint-every", "64", "--num-loader-workers", "1",
           "--num-workers", str(args.workers)]
    started = time.monotonic()
    procs = [subprocess.Popen([*cmd, "--worker-index", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(args.workers)]
    ended: dict[int, float] = {}
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.time()
        time.sleep(0.02)
    outs = [proc.stdout.read() for proc in procs]
    if any(proc.returncode != 0 for proc in procs):
        sys.exit("a worker failed:\n" + "\n".join(o[-1500:] for o in outs))
    last_part = {i: max(p.path.stat().st_mtime for p in list_parts(ckpt) if p.worker == i) for i in ended}
    end_s = [ended[i] - last_part[i] for i in ended]
    print(json.dumps({"code": args.code_dir, "workers": args.workers, "images": args.images,
                      "end_s_max": round(max(end_s), 2), "end_s_mean": round(statistics.mean(end_s), 2),
                      "merges": sum("merged into" in o for o in outs),
                      "wall_s": round(time.monotonic() - started, 1)}))


def time_merge(rows: int, work: Path) -> None:
    from vlm_caption.merge import merge_parts
    from vlm_caption.store import CheckpointStore

    ckpt = work / "ckpt"
    stores = [CheckpointStore(ckpt, w) for w in range(8)]
    for start in range(0, rows, 200):
        stores[(start // 200) % 8].write_part([{
            "key": f"{i:09d}", "original_key": str(i), "url": f"https://img.example/{i}.jpg",
            "original_caption": "alt text", "vlm_caption": "A detailed caption of an artwork. " * 12, "width": 896,
            "height": 672, "original_width": 1024, "original_height": 768, "sha256": f"{i:064x}", "md5": f"{i:032x}",
            "tags": "oil painting", "merged_tags": "oil painting,impressionism", "caption_model": "m",
            "caption_finish": "stop", "caption_tokens": 120} for i in range(start, min(start + 200, rows))])
    started = time.monotonic()
    report = merge_parts([ckpt], ckpt / "all_captions.parquet")
    print(json.dumps({"merge_rows": report.rows, "parts": report.parts, "merge_s": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main()
