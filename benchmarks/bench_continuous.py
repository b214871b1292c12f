"""Continuous batching (--decode-loop continuous) against whole batches, at caption lengths that vary.

Both sides run the same compiled decode step (continuous.ContinuousDecode) over the same images and the
same per-image caption lengths; only the schedule differs:
- batches: a batch of `slots` images joins only when all slots are free (chunks of `slots` rows): every
  batch decodes until its longest caption ends, as `--decode-loop graph` does;
- continuous: chunks of slots/8 join as soon as that many rows have finished.
Caption lengths are drawn uniformly from [--min-frac x --max-tokens, --max-tokens] (seed 0) and imposed
per row (each row decodes exactly its length: a random model writes no end of turn), so the result is
the scheduling gain alone. Real captions' lengths are the model's; the gain is about the mean length of a
batch's longest caption over the mean length.

    python benchmarks/bench_continuous.py [--preset small] [--images 96] [--slots 16] [--max-tokens 48]
        [--min-frac 0.25] [--rounds 3]                    # CPU, dynamo's eager backend
    python benchmarks/bench_continuous.py --preset gemma-3-4b --images 1024 --slots 256 --max-tokens 200
        --rounds 1                                        # a GPU: inductor + CUDA graphs

Prints one JSON line per round and side, then a summary line: decode steps per image and images per
second for each side, and their ratios (best of the rounds, the two sides alternating).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Describe this artwork."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="tiny_model preset (tiny, small, gemma-3-4b)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--slots", type=int, default=16, help="rows decoding at once (the batch size)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--min-frac", type=float, default=0.25, help="shortest caption, as a fraction of --max-tokens")
    p.add_argument("--chunk-rows", type=int, nargs="+", default=None, help="continuous sides to run, by rows per "
                   "chunk (default: the product's, slots/8)")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def run_side(cap, pixels: list, lengths: list[int], slots: int, chunk: int, sync) -> dict:
    import torch

    from vlm_caption import continuous

    decoder = continuous.decoder_for(cap, slots)
    todo = list(range(0, len(pixels), chunk))

    def next_chunk(wait: bool):
        if not todo:
            return None
        start = todo.pop(0)
        rows = pixels[start:start + chunk]
        limits = torch.tensor(lengths[start:start + chunk])
        return continuous.prefill(cap, start, cap.assemble(rows), limits)

    steps0 = decoder.steps
    sync()
    began = time.perf_counter()
    tokens = sum(int(ids.ne(cap.pad_id).sum()) for _, ids in decoder.run(next_chunk, chunk))
    sync()
    wall = time.perf_counter() - began
    steps = decoder.steps - steps0
    return {"wall_s": round(wall, 3), "img_s": round(len(pixels) / wall, 3), "decode_steps": steps,
            "steps_per_img": round(steps / len(pixels), 3), "tokens": tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Run 4 (an H100): the batches side's 256-row prefill asked for 8.4 GiB with 18.7 GiB reserved but free in
    # pieces, after the continuous warm-up: out of memory. Growable segments do not fragment so.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import numpy as np
    import torch

    from bench_loader import make_images
    from vlm_caption import continuous, dataset, tiny_model
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import choose_device

    device = choose_device()
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, processor = tiny_model.build_random_model(args.preset, device=device,
                                                     dtype=torch.bfloat16 if cuda else torch.float32, seed=0)
    # CPU: dynamo's eager backend (inductor's CPU compile takes minutes); CUDA: inductor + CUDA graphs.
    cap = Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=args.max_tokens,
                    min_tokens=args.max_tokens, compile="on", decode_loop="continuous",
                    compile_options={} if cuda else {"backend": "eager"})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp) / "art", min(args.images, 32), seed=0, sizes=(1024, 3000, 768, 2000))
        prepared = [cap.prepare(dataset.load_image(p, cap.target_size)) for p in paths]
    pixels = [prepared[i % len(prepared)] for i in range(args.images)]
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, round(args.min_frac * args.max_tokens)), args.max_tokens + 1,
                           args.images).tolist()
    chunks = args.chunk_rows or [continuous.chunk_rows(args.slots)]
    sides = {"batches": args.slots, **{("continuous" if len(chunks) == 1 else f"continuous_{c}"): c for c in chunks}}
    best: dict[str, dict] = {}
    run_side(cap, pixels[:args.slots], lengths[:args.slots], args.slots, chunks[0], sync)  # compile
    for round_ in range(args.rounds):
        for side, chunk in (sides.items() if round_ % 2 == 0 else reversed(sides.items())):
            got = run_side(cap, pixels, lengths, args.slots, chunk, sync)
            print(json.dumps({"round": round_, "side": side, **got}), flush=True)
            if side not in best or got["wall_s"] < best[side]["wall_s"]:
                best[side] = got
    batch_longest = np.mean([max(lengths[i:i + args.slots]) for i in range(0, args.images, args.slots)])
    ratio = lambda key, side: best[side][key] / best["batches"][key]  # noqa: E731
    continuous_sides = [side for side in sides if side != "batches"]
    summary = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "preset": args.preset,
               "images": args.images, "slots": args.slots, "chunk": chunks if len(chunks) > 1 else chunks[0],
               "max_tokens": args.max_tokens, "mean_length": round(float(np.mean(lengths)), 1),
               "mean_longest_of_a_batch": round(float(batch_longest), 1),
               "steps_per_img": {k: v["steps_per_img"] for k, v in best.items()},
               "img_s": {k: v["img_s"] for k, v in best.items()},
               "speedup_img_s": {side: round(ratio("img_s", side), 3) for side in continuous_sides},
               "fewer_steps": {side: round(1 / ratio("decode_steps", side), 3) for side in continuous_sides}}
    if len(chunks) == 1:  # one continuous side: plain numbers
        summary["speedup_img_s"], summary["fewer_steps"] = (summary["speedup_img_s"]["continuous"],
                                                            summary["fewer_steps"]["continuous"])
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
