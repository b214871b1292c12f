#!/usr/bin/env python3
"""CPU cost of the image loader per image: the image processor path vs the fast path (vlm_caption.image_prep).

Both run through the pipeline's own loader (`loader.prefetch` -> `dataset.load_image` -> prepare) at
Gemma 3's real settings (896x896, bilinear, rescale 1/255, mean = std = 0.5; no model needed):

  processor  load_image with the old 2x-target draft box + Gemma3ImageProcessor (PIL backend) + cast
  fast       load_image with the target as draft box + image_prep.ImagePrep (resize + normalise on the CPU)
  device     what the CPU still does when the GPU resizes (the pipeline's default on CUDA): load_image +
             ImagePrep.host_pixels + the copy into pinned memory; with --device cuda also the copy to the
             card and ImagePrep.to_device (resize + normalise there), synchronised per image; without a GPU
             a plain copy of the same bytes stands in for the pinned one

  python benchmarks/bench_loader.py --make-images art --count 200          # art-sized JPEGs, seeded
  OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --images art --threads 1 2 --rounds 3

Prints one JSON line per (method, threads): cpu_ms_per_img is the process CPU time per image (all
threads), img_per_s the wall-clock rate, img_per_core_s = 1000 / cpu_ms_per_img (what one busy core
gives), cores_busy = CPU time / wall time. Methods alternate within every round; the best round of
each is kept (the minimum CPU, the maximum rate), since a shared machine only ever adds time.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# google/gemma-3-4b-it preprocessor_config.json (the same for 12b and 27b).
GEMMA3_IMAGE_PROCESSOR = dict(size={"height": 896, "width": 896}, resample=2, do_resize=True, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                              do_convert_rgb=True, do_pan_and_scan=None)
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="directory of images to load (not recursive)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="loader threads; several values are "
                   "measured in turn (e.g. --threads 1 2)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by name)")
    p.add_argument("--method", choices=["fast", "processor", "device", "all"], default="all")
    p.add_argument("--device", default="cpu", help="cuda: the device method resizes on the GPU for real")
    p.add_argument("--rounds", type=int, default=3, help="alternate the methods this many times, keep the best")
    p.add_argument("--dtype", default="bfloat16", help="pixel dtype handed to the model (bfloat16 on GPU)")
    p.add_argument("--size", type=int, default=896, help="model input side (Gemma 3: 896)")
    p.add_argument("--compare", action="store_true", help="also print how far the fast and device paths' pixels are from "
                   "the processor's on the fully decoded image (mean, worst image's mean, max |diff| on [-1, 1])")
    p.add_argument("--make-images", metavar="DIR", help="first write --count art-sized JPEGs into DIR")
    p.add_argument("--count", type=int, default=200, help="images for --make-images")
    p.add_argument("--seed", type=int, default=0, help="seed for --make-images")
    args = p.parse_args(argv)
    if not args.images and not args.make_images:
        p.error("give --images DIR (and/or --make-images DIR)")
    return args


# ---------------------------------------------------------------- test images

def art_image(width: int, height: int, rng):
    """A painting-like picture: smooth colour fields, shapes and strokes, fine grain (JPEG-realistic cost)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    base = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(20, 60))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(1, max(2, width // 3))), y0 + int(rng.integers(1, max(2, height // 3))))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        else:
            draw.line(box, fill=color, width=int(rng.integers(1, 12)))
    grain = rng.normal(0.0, float(rng.uniform(3, 14)), (height // 2 + 1, width // 2 + 1, 1)).astype(np.int16)
    grain = np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:height, :width]
    pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").filter(ImageFilter.SMOOTH)


def make_images(out_dir: str | Path, count: int, seed: int = 0, sizes: tuple[int, int, int, int] = (1024, 3000, 768, 2000),
                quality: int = 90) -> list[Path]:
    """`count` JPEGs of width in [sizes[0], sizes[1]] x height in [sizes[2], sizes[3]] (30 % portrait).

    Image i depends only on (seed, i), so a larger count adds images without changing the first ones.
    """
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        w, h = int(rng.integers(sizes[0], sizes[1] + 1)), int(rng.integers(sizes[2], sizes[3] + 1))
        if rng.random() < 0.3:
            w, h = h, w
        path = out / f"art_{i:05d}.jpg"
        art_image(w, h, rng).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- measuring

def gemma3_image_processor(size: int = 896):
    """Gemma 3's image processor with the released settings (the PIL backend, as the pipeline ran it here)."""
    try:
        from transformers import Gemma3ImageProcessorPil as cls
    except ImportError:  # a transformers without the split backends
        from transformers import Gemma3ImageProcessor as cls
    return cls(**dict(GEMMA3_IMAGE_PROCESSOR, size={"height": size, "width": size}))


def methods(size: int, dtype, device: str = "cpu"):
    """name -> (prepare, target size given to load_image)."""
    import torch

    from vlm_caption.image_prep import ImagePrep

    processor = gemma3_image_processor(size)
    prep = ImagePrep.from_processor(processor, dtype)
    if prep is None:
        raise SystemExit("error: the Gemma 3 processor settings are not handled by image_prep")

    def with_processor(image):
        return processor(images=[image], return_tensors="pt")["pixel_values"][0].to(dtype)

    streams = threading.local()

    def on_device(image):
        host = prep.host_pixels(image)
        if device == "cpu":
            return host.clone()  # the bytes pin_memory() copies in Captioner.collate on a GPU host
        # A stream a thread: synchronising the whole device waited for every other thread's images too
        if not hasattr(streams, "stream"):
            streams.stream = torch.cuda.Stream()
        with torch.cuda.stream(streams.stream):
            out = prep.to_device(host, device)
        streams.stream.synchronize()  # the resize's time counts here, not in a later image's
        return out

    # The pipeline before image_prep: the draft box was twice the model's input.
    return {"processor": (with_processor, 2 * size), "fast": (prep, size), "device": (on_device, size)}


def run_once(paths: list[Path], prepare, target: int, threads: int) -> tuple[float, float, int]:
    """(process CPU seconds, wall seconds, images prepared) for one pass through loader.prefetch."""
    from vlm_caption import loader

    rows = [{"key": p.stem, "image_path": p} for p in paths]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ok = 0
    for item in loader.prefetch(rows, prepare, workers=threads, window=4 * threads + 4, target_size=target):
        if item.error is not None:
            raise SystemExit(f"error: {item.row['image_path']}: {item.error}")
        ok += 1
    return time.process_time() - cpu0, time.perf_counter() - wall0, ok


def compare(paths: list[Path], size: int, device: str = "cpu") -> dict:
    """|fast - processor| and |device - processor| per image, the processor fed the full-size decode (the
    reference)."""
    from PIL import Image

    from vlm_caption import dataset
    from vlm_caption.image_prep import ImagePrep

    processor = gemma3_image_processor(size)
    prep = ImagePrep.from_processor(processor)
    means: dict[str, list[float]] = {"fast": [], "device": []}
    peak, drafted = {"fast": 0.0, "device": 0.0}, 0
    for path in paths:
        with Image.open(path) as img:
            img.load()
            full = dataset.to_rgb(img)
        ref = processor(images=[full], return_tensors="pt")["pixel_values"][0]
        small = dataset.load_image(path, size)
        drafted += small.size != full.size
        for name, pixels in (("fast", prep(small)), ("device", prep.to_device(prep.host_pixels(small), device))):
            diff = (pixels.cpu() - ref).abs()
            means[name].append(float(diff.mean()))
            peak[name] = max(peak[name], float(diff.max()))
    return {"compare": "vs processor", "images": len(paths), "drafted": drafted, "size": size,
            **{name: {"mean_abs_diff": round(sum(m) / len(m), 5), "worst_image_mean": round(max(m), 5),
                      "max_abs_diff": round(peak[name], 4)} for name, m in means.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_images:
        made = make_images(args.make_images, args.count, args.seed)
        print(json.dumps({"made": len(made), "dir": str(args.make_images), "seed": args.seed}), flush=True)
        if not args.images:
            return 0
    import torch

    torch.set_num_threads(1)  # one core per loader thread, like OMP_NUM_THREADS=1
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in SUFFIXES)[: args.limit]
    if not paths:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    if args.compare:
        print(json.dumps(compare(paths, args.size, args.device)), flush=True)
    dtype = getattr(torch, args.dtype)
    chosen = methods(args.size, dtype, args.device)
    names = ["processor", "fast", "device"] if args.method == "all" else [args.method]
    for name in names:  # warm-up: page cache, lazy imports, first-call allocations
        run_once(paths[:4], *chosen[name], threads=1)
    best: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            for name in names:
                cpu, wall, n = run_once(paths, *chosen[name], threads=threads)
                key = (name, threads)
                b = best.setdefault(key, {"cpu": cpu, "wall": wall, "util": cpu / wall})
                b["cpu"], b["wall"] = min(b["cpu"], cpu), min(b["wall"], wall)
                b["util"] = max(b["util"], cpu / wall)
    for (name, threads), b in best.items():
        cpu_ms = 1000 * b["cpu"] / len(paths)
        print(json.dumps({"method": name, "images": len(paths), "threads": threads,
                          "cpu_ms_per_img": round(cpu_ms, 2), "img_per_s": round(len(paths) / b["wall"], 2),
                          "img_per_core_s": round(1000 / cpu_ms, 2), "cores_busy": round(b["util"], 2),
                          "size": args.size, "dtype": args.dtype, "rounds": args.rounds}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
