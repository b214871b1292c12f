#!/usr/bin/env python3
"""Peak RSS of a whole captioning run (tiny model, tiny images) at two data-set sizes.

Streaming means the peak must not grow with the number of rows: rows are read a batch at a time,
captions leave memory in part files, and the merge reads one key range at a time.

  python benchmarks/bench_memory.py --rows 2000 20000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = """
import resource, sys, time
sys.argv = ["batched_image_inference.py", *sys.argv[1:]]
from batched_image_inference import main
start = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT", code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start)
"""


def scaled_sample(base: Path, out: Path, rows: int) -> Path:
    """`rows` metadata rows with distinct keys, all pointing at the few image files of a small sample."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.sample_data import write_sample

    write_sample(base, n=16, broken=False, seed=0)
    seed_rows = pq.read_table(base / "full_metadata.parquet").to_pylist()
    out.mkdir(parents=True)
    (out / "images").symlink_to((base / "images").resolve())
    table = pa.Table.from_pylist([{**seed_rows[i % len(seed_rows)], "key": f"{i:09d}",
                                   "original_key": str(i)} for i in range(rows)])
    pq.write_table(table, out / "full_metadata.parquet")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    args = p.parse_args()
    from vlm_caption.tiny_model import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", preset="tiny")
        for rows in args.rows:
            data = scaled_sample(tmp / f"base{rows}", tmp / f"data{rows}", rows)
            cmd = [sys.executable, "-c", CHILD, "--model", str(model), "--data-dir", str(data), "--checkpoint-dir",
                   str(tmp / f"ckpt{rows}"), "--no-push", "--max-tokens", "2", "--batch-size", "64",
                   "--checkpoint-every", "500", "--num-loader-workers", "2"]
            out = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                                 **{k: v for k, v in __import__("os").environ.items()}})
            line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
            _, code, rss_kb, secs = line.split()
            results.append({"rows": rows, "exit_code": int(code), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
                            "wall_s": round(float(secs), 1)})
    print(json.dumps({"bench": "memory", "runs": results,
                      "rss_ratio": round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
