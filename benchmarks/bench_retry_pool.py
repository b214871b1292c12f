#!/usr/bin/env python3
"""Flagged captions retried after each batch vs gathered across batches (retry_pool.py), the whole pipeline.

Both sides caption the same images with the same model and the same flagged captions: which first captions
count as flagged is set by a hash of their image's key at --flag-rate (a random model's captions are nearly all
flagged; a real model's rarely), so only the grouping of the retries differs:
- each: retry_rows 1, one retry call after every batch that holds a flagged caption (a CPU's setting);
- gathered: retry_rows --gather (a GPU's is 64): calls of at least that many rows, the last at the run's end.
Each side reports its rate, its retry calls and captions; the summary line their ratio (best of --rounds, the
sides alternating), whether the captions came out the same, and one retry call's time at 1 row and at
--gather rows (how flat a call's cost is in its rows decides the gain: flat on a GPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_retry_pool.py [--preset tiny] [--images 512] [--batch-size 32]
        [--gather 16] [--new-tokens 32] [--flag-rate 0.03] [--rounds 3]                   # CPU
    python benchmarks/bench_retry_pool.py --preset gemma-3-4b --images 1536 --batch-size 512 --gather 64
        --new-tokens 200 --rounds 1 --compile on                          # a GPU (gpu_ab.sh retry)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Describe this artwork."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny_model preset (tiny, small; gemma-3-4b on a GPU)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gather", type=int, default=16, help="the gathered side's retry_rows")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens a caption, exactly")
    p.add_argument("--flag-rate", type=float, default=0.03, help="share of first captions flagged for a retry")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


class FlaggedByKey:
    """wants_retry's stand-in: a first caption is flagged when a hash of its image's key falls under `rate` (the
    same rows on both sides, whatever their batch). It wraps the captioner's generate to see the keys."""

    def __init__(self, cap, rate: float):
        self.flagged: dict[int, object] = {}  # id() -> the first caption flagged (kept alive: ids stay unique)
        real = cap.generate

        def generate(keys, batch, should_stop=None, *, retry=False, prompts=None):
            caps = real(keys, batch, should_stop, retry=retry, prompts=prompts)
            if not retry:
                self.flagged.update((id(c), c) for c, k in zip(caps, keys)
                                    if zlib.crc32(k.encode()) % 10_000 < rate * 10_000)
            return caps

        cap.generate = generate

    def __call__(self, cap, spec=None) -> bool:
        return id(cap) in self.flagged


def run_side(cap, data_dir: Path, ckpt: Path, args, retry_rows: int, images: int) -> dict:
    """One pipeline run of `images` (caption_all, the model in memory) with the captioner's retry_rows set."""
    import pyarrow.parquet as pq

    from vlm_caption import dataset, pipeline, store
    from vlm_caption.config import RunConfig

    cap.retry_rows = retry_rows
    cfg = RunConfig(model=args.preset, data_dir=str(data_dir), checkpoint_dirs=[str(ckpt)], no_push=True,
                    batch_size=args.batch_size, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                    prompt=PROMPT, compile=args.compile)
    writer = store.CheckpointStore(ckpt, 0)
    writer.open_run(cfg.run_settings(), overwrite=False)
    plan = dataset.plan_work(data_dir, shards=None, max_images=images, worker=0, num_workers=1,
                             done_keys=set(), failed_keys=set())
    stats = pipeline.RunStats()
    start = time.perf_counter()
    pipeline.caption_all(cfg, plan, writer, stats, pusher=None, backend=cap)
    wall = time.perf_counter() - start
    writer.lock.release()
    assert stats.captioned == plan.todo, f"captioned {stats.captioned} of {plan.todo}"
    captions = {}
    for part in store.list_parts(ckpt):
        for row in pq.read_table(part.path, columns=["key", "vlm_caption", "caption_attempts"]).to_pylist():
            captions[row["key"]] = (row["vlm_caption"], row["caption_attempts"])
    d = stats.decoding
    return {"retry_rows": retry_rows, "img_s": round(stats.captioned / wall, 3), "wall_s": round(wall, 2),
            "retry_calls": d["retry_calls"], "retried_captions": d["retried_captions"], "_captions": captions}


def call_seconds(cap, pixels: list, rows: int, sync) -> float:
    """One retry call of `rows` images (after one untimed call of the same size)."""
    keys = [f"k{i}" for i in range(rows)]
    batch = [pixels[i % len(pixels)] for i in range(rows)]
    cap.generate(keys, batch, retry=True)
    sync()
    start = time.perf_counter()
    cap.generate(keys, batch, retry=True)
    sync()
    return round(time.perf_counter() - start, 3)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq
    import torch

    from bench_captioning import load
    from bench_loader import make_images
    from gpu_pipeline import write_data_dir
    from vlm_caption import dataset, retry_pool
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import choose_device

    device = choose_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor = load(argparse.Namespace(preset=args.preset, dtype="auto", attn_implementation="sdpa"),
                                device, work)
        cap = Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=args.new_tokens,
                        min_tokens=args.new_tokens, compile=args.compile)
        retry_pool.wants_retry = FlaggedByKey(cap, args.flag_rate)
        sizes = (1024, 3000, 768, 2000) if device.type == "cuda" else (96, 200, 80, 160)  # art-sized on a GPU
        data_dir = write_data_dir(work / "data", make_images(work / "art", 48, seed=0, sizes=sizes), args.images)
        keys = pq.read_table(data_dir / "full_metadata.parquet", columns=["key"]).column(0).to_pylist()
        rows = list(dataset.iter_rows(data_dir, set(keys[:args.gather])))
        pixels = [cap.prepare(dataset.load_image(r["image_path"], cap.target_size)) for r in rows]
        calls = {"retry_call_s_1_row": call_seconds(cap, pixels, 1, sync),
                 f"retry_call_s_{args.gather}_rows": call_seconds(cap, pixels, args.gather, sync)}
        # Untimed: one batch, so that neither side pays for compiling the batch's shapes (--compile on a GPU)
        run_side(cap, data_dir, work / "warmup", args, 1, args.batch_size)
        best: dict[str, dict] = {}
        for r in range(args.rounds):  # the sides alternate, so a burst of load elsewhere hits both alike
            for name, retry_rows in (("each", 1), ("gathered", args.gather)):
                side = run_side(cap, data_dir, work / f"{name}{r}", args, retry_rows, args.images)
                print(json.dumps({"round": r, "side": name,
                                  **{k: v for k, v in side.items() if not k.startswith("_")}}), flush=True)
                if name not in best or side["img_s"] > best[name]["img_s"]:
                    best[name] = side
    each, gathered = best["each"], best["gathered"]
    print(json.dumps({
        "summary": True, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset, "images": args.images, "batch_size": args.batch_size, "gather": args.gather,
        "new_tokens": args.new_tokens, "flag_rate": args.flag_rate, "rounds": args.rounds,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **calls,
        "each_img_s": each["img_s"], "gathered_img_s": gathered["img_s"],
        "gathered_vs_each": round(gathered["img_s"] / each["img_s"], 3),
        "retry_calls": [each["retry_calls"], gathered["retry_calls"]],
        "retried_captions": [each["retried_captions"], gathered["retried_captions"]],
        "same_captions": each["_captions"] == gathered["_captions"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
