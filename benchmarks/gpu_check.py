#!/usr/bin/env python3
"""The one GPU check: Gemma 3 4B (real size, random weights, bf16, built on the card), exactly N new tokens
per image (min = max, greedy), the same prompt everywhere. At most ~8 minutes on an H100/H200:

  loader     art-sized JPEGs made here (no download) -> loader.prefetch -> image_prep, all cores, no model
  loop       the original script: chat template + processor + generate, one image at a time (a few images;
             img/s is measured on those and only extrapolated as a rate)
  eager      Captioner.generate, dynamic KV cache, batches of 64 and 128
  compiled   Captioner(compile="on"): static full-attention cache + generate's torch.compile
             (inductor, reduce-overhead = CUDA graphs), batches of 64, 128 and 256
  graph      Captioner(compile="on", decode_loop="graph"): the same cache, generate's prefill, then one
             compiled step per token with no host work between steps (decode_loop.py), batches of 64, 128;
             these three with the grouped sdpa decode attention (--decode-attention sdpa)
  graph_flex the graph loop with FlexAttention for the decode attention (what --decode-attention auto
             takes on CUDA from 128 rows, grouped_attention.FLEX_MIN_ROWS)
  prefill_eager  graph_flex with the prefill eager (the vision tower and the language model over the
             prompt): every compiled run above compiles them too, as --compile does (prefill_compile.py); this
             is the other side of that A/B, and run 4's code
  whole_tower  graph_flex with the vision tower over the whole batch at once: every other run runs it over
             --vision-chunk-rows images at a time, as a captioning run does (vision_chunks.py); the other side
             of that A/B
  kv_fp8     graph_flex with --kv-cache-dtype fp8 (kv_fp8.py: keys and values cached as float8, which flex reads
             as they are): half the cache's bytes a decode step reads
  fp8        graph_flex after --quantize fp8 (fp8.py: the tower's and language model's linear layers as FP8
             GEMMs; --fp8-quantize fp8-text: the language model's only), last: the model is quantized in
             place once, with the first new token's logits on 8 images before and after (their drift, on
             random weights)
  --profile  after the timed batches of the kinds named, one more batch under torch.profiler: ms an image by
             kind of kernel for the prefill and the decode (gpu_profile.py)
  pipeline   pipeline.run over --pipeline-images JPEGs with the built model (loader threads, background
             assembly, generate, writer, parts) and the product's defaults (--decode-attention auto);
             --pipeline-overlap: again with --vision-overlap

Batched runs start from prepared pixel values (the loader is measured on its own): each does one warm-up
batch outside the clock (compilation included, reported as warmup_s), then --timed-batches batches. For
each: img/s, tokens/s, peak GPU memory, generate share (time inside model.generate / wall time of
Captioner.generate, the rest being collation, host-device copies and decoding to text), and for compiled
runs the graphs dynamo built and its graph breaks. FLOP per image is computed from the config (SigLIP
linear + attention, prefill, decode), with both roofs: compute (bf16 dense peak) and memory bandwidth
(each decode step reads the text weights and the KV cache).

  python benchmarks/gpu_check.py --out gpu_check_out                  # GPU, ~8 min
  python benchmarks/gpu_check.py --cpu-smoke --out smoke_out          # tiny preset on CPU, seconds (CI)

Writes OUT/gpu_check.json (every section, rewritten after each one, so a timeout keeps what finished) and
OUT/gpu_check.md (the table). Needs torch, transformers, pillow, numpy, pyarrow; no exifread, no Hub.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_batched import KINDS, PROMPT, quantize_for_fp8, run_batched  # noqa: E402  (scripts beside this one)
from gpu_report import write  # noqa: E402
from gpu_pipeline import PIPELINE_RUNS, run_pipeline  # noqa: E402
from gpu_roofs import card_peaks, flop_per_image, roofs  # noqa: E402
from vlm_caption.backends import VISION_CHUNK_ROWS  # noqa: E402
from vlm_caption.config import QUANTIZE_CHOICES, VISION_ATTENTIONS, RunConfig  # noqa: E402

SECTIONS = ("env", "model", "flop_per_image", "roofs", "auto_batch_size", "loader", "loop", "eager", "compiled",
            "graph", "graph_flex", "prefill_eager", "whole_tower", "kv_fp8", "fp8_weights", "fp8", "pipeline",
            "pipeline_overlap")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset, tiny sizes, on the CPU: checks the "
                   "script runs end to end (seconds); its numbers mean nothing")
    p.add_argument("--preset", default=None, help="tiny_model preset (default gemma-3-4b; tiny with --cpu-smoke)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per image (default 200)")
    p.add_argument("--eager-batches", type=int, nargs="*", default=None, help="default 64 128")
    p.add_argument("--compiled-batches", type=int, nargs="*", default=None, help="default 64 128 256")
    p.add_argument("--graph-batches", type=int, nargs="*", default=None, help="--decode-loop graph (default 64 128)")
    p.add_argument("--graph-flex-batches", type=int, nargs="*", default=None, help="the graph loop with the "
                   "FlexAttention decode attention, auto's pick from 128 rows on an H100/H200 (default none; 4 with "
                   "--cpu-smoke)")
    p.add_argument("--prefill-eager-batches", type=int, nargs="*", default=None, help="graph_flex with the "
                   "prefill (vision tower, language model) eager (default: none; 4 with --cpu-smoke)")
    p.add_argument("--whole-tower-batches", type=int, nargs="*", default=None, help="graph_flex with the vision "
                   "tower over the whole batch at once (default: none; 4 with --cpu-smoke)")
    p.add_argument("--kv-fp8-batches", type=int, nargs="*", default=None, help="graph_flex with --kv-cache-dtype "
                   "fp8 (default: none; 4 with --cpu-smoke)")
    p.add_argument("--vision-chunk-rows", type=int, default=None, help="images the vision tower runs over at a "
                   f"time in the other runs (default {VISION_CHUNK_ROWS}, as a run; 2 with --cpu-smoke)")
    p.add_argument("--fp8-batches", type=int, nargs="*", default=None, help="graph_flex with --quantize fp8, "
                   "after every other run (default: none; 4 with --cpu-smoke)")
    p.add_argument("--fp8-quantize", default="fp8", choices=QUANTIZE_CHOICES[1:], help="the fp8 runs' --quantize: "
                   "fp8 (tower and language model) or fp8-text (the language model only) (default: %(default)s)")
    p.add_argument("--profile", nargs="*", default=[], choices=KINDS[1:],  # (eager: no static cache, no profile)
                   help="after these kinds' timed batches, one more under torch.profiler: ms an image by kind of "
                        "kernel for the prefill and the decode (gpu_profile.py; OUT/profile_KIND_BATCH.txt)")
    p.add_argument("--vision-attention", default=RunConfig.vision_attention, choices=VISION_ATTENTIONS, help="the vision tower's "
                   "attention kernel in every run, as the CLI's flag (default: %(default)s: the fastest, timed)")
    p.add_argument("--timed-batches", type=int, default=None, help="batches timed per size (default 3)")
    p.add_argument("--loop-images", type=int, default=None, help="images for the one-image loop (default 3)")
    p.add_argument("--loader-images", type=int, default=None, help="JPEGs for the loader (default 96)")
    p.add_argument("--pipeline-images", type=int, default=None, help="images through the whole pipeline "
                   "(default 640: 5 batches of 128)")
    p.add_argument("--pipeline-batch", type=int, default=None, help="the pipeline run's batch size (default 128)")
    p.add_argument("--pipeline-overlap", action="store_true", help="then the whole pipeline again with "
                   "--vision-overlap (the next batch's vision tower on a side stream while this one decodes)")
    p.add_argument("--pipeline-runs", nargs="+", choices=PIPELINE_RUNS, default=None,
                   help="the whole pipeline's variants, in this order (default plain, then overlap with "
                   "--pipeline-overlap): plain, overlap (--vision-overlap), graph (--decode-loop graph), overlap_graph")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak, TFLOP/s (default: by card)")
    p.add_argument("--peak-tbps", type=float, default=None, help="memory bandwidth, TB/s (default: by card)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new runs after this many "
                   "seconds (default 420; the shell wrapper kills at 450)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = dict(preset="tiny" if smoke else "gemma-3-4b", new_tokens=4 if smoke else 200,
                    eager_batches=[2, 4] if smoke else [64, 128], compiled_batches=[2, 4] if smoke else [64, 128, 256],
                    graph_batches=[2, 4] if smoke else [64, 128], graph_flex_batches=[4] if smoke else [],
                    prefill_eager_batches=[4] if smoke else [], fp8_batches=[4] if smoke else [],
                    whole_tower_batches=[4] if smoke else [], kv_fp8_batches=[4] if smoke else [],
                    vision_chunk_rows=2 if smoke else VISION_CHUNK_ROWS,
                    timed_batches=2 if smoke else 3, loop_images=2 if smoke else 3,
                    loader_images=6 if smoke else 96, pipeline_images=12 if smoke else 640,
                    pipeline_batch=4 if smoke else 128, budget_s=120 if smoke else 420)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pipeline_runs is None:
        args.pipeline_runs = ["plain", "overlap"] if args.pipeline_overlap else ["plain"]
    return args


# ---------------------------------------------------------------- measuring

def run_loop_baseline(model, processor, paths: list[Path], args, sync) -> dict:
    from bench_captioning import run_loop

    run_loop(model, processor, paths[:1], 2, PROMPT)  # warm-up
    sync()
    start = time.perf_counter()
    tokens = run_loop(model, processor, paths, args.new_tokens, PROMPT)
    sync()
    secs = time.perf_counter() - start
    return {"images": len(paths), "img_s": round(len(paths) / secs, 4), "tokens_s": round(tokens / secs, 1),
            "s_per_image": round(secs / len(paths), 3),
            "note": f"measured on {len(paths)} images; a run's rate is this, extrapolated"}


def run_loader(paths: list[Path], size: int, threads: int, device) -> dict:
    """The loader alone on all cores: `fast` resizes on the CPU, `device` (the pipeline's default on a GPU)
    decodes on the CPU and resizes on the card (bench_loader's methods); best of 2 rounds, alternated."""
    import torch
    from bench_loader import methods, run_once

    torch.set_num_threads(1)  # one core per loader thread, like OMP_NUM_THREADS=1 in a run
    chosen = methods(size, torch.bfloat16, str(device))
    out = {}
    for name in ("fast", "device"):
        run_once(paths[:4], *chosen[name], threads=1)  # warm-up
    for _ in range(2):
        for name in ("fast", "device"):
            cpu, wall, n = run_once(paths, *chosen[name], threads=threads)
            if name not in out or n / wall > out[name]["img_s"]:
                out[name] = {"images": n, "threads": threads, "img_s": round(n / wall, 2),
                             "cpu_ms_per_img": round(1000 * cpu / n, 2), "cores_busy": round(cpu / wall, 2),
                             "size": size}
    return out


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    from bench_loader import make_images
    from vlm_caption import tiny_model
    from vlm_caption.batch_size import auto_batch_size, free_device_memory
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import choose_device
    from vlm_caption.workers import usable_cores

    device = torch.device("cpu") if args.cpu_smoke else choose_device()
    if device.type != "cuda" and not args.cpu_smoke:
        print("error: no CUDA device; use --cpu-smoke for the CPU check", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cores = usable_cores()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"env": {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                            "cuda": torch.version.cuda, "cpu_cores": cores, "python": platform.python_version(),
                            "cpu_smoke": args.cpu_smoke}, "skipped": []}
    free_before = free_device_memory(device)
    with tempfile.TemporaryDirectory() as tmp:
        side = 64 if args.cpu_smoke else 896
        sizes = (96, 200, 80, 160) if args.cpu_smoke else (1024, 3000, 768, 2000)
        # (8 at least: the batches are made of them)
        paths = make_images(Path(tmp) / "art", max(args.loader_images, args.loop_images, 8), seed=0, sizes=sizes)
        result["loader"] = run_loader(paths[:args.loader_images], side, threads=cores, device=device) \
            if args.loader_images else {}  # (0: not timed)
        print(json.dumps({"loader": result["loader"]}), flush=True)
        write(out, result)

        build_start = time.perf_counter()
        model, processor = tiny_model.build_random_model(args.preset, device=device, dtype=dtype, seed=0)
        sync()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        probe = Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=args.new_tokens)
        prompt_tokens = int(probe.prompt_inputs["input_ids"].shape[-1])
        from vlm_caption import dataset

        pixels = [probe.prepare(dataset.load_image(p, probe.target_size)) for p in paths[:8]]
        del probe
        config = model.config
        seq = prompt_tokens + args.new_tokens
        result["model"] = {"preset": args.preset, "dtype": str(dtype).replace("torch.", ""),
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "weight_gb": round(weight_bytes / 1e9, 2), "build_s": round(time.perf_counter() - build_start, 1),
                           "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "sequence": seq,
                           "sliding_window": config.text_config.sliding_window, "prompt": PROMPT,
                           "text_attention": config.get_text_config(decoder=True)._attn_implementation}
        result["flop_per_image"] = flop_per_image(config, prompt_tokens, args.new_tokens)
        peak, bandwidth, source = card_peaks(name, args)
        if args.cpu_smoke and not peak:
            peak, bandwidth, source = 1e12, 50e9, "placeholder for the CPU smoke"
        batches = sorted(set(args.eager_batches + args.compiled_batches + args.graph_batches + args.graph_flex_batches
                             + args.prefill_eager_batches + args.whole_tower_batches + args.kv_fp8_batches
                             + [1, args.pipeline_batch]))
        result["roofs"] = {"peak_flops": peak, "bandwidth_bytes_s": bandwidth, "source": source,
                           "by_batch": [roofs(config, prompt_tokens, args.new_tokens, b, peak, bandwidth)
                                        for b in batches] if peak and bandwidth else []}
        result["auto_batch_size"] = {
            "free_bytes_before_weights": free_before,  # measured before the model was built
            "dynamic": auto_batch_size(config, free_before, weight_bytes, seq, 2, cap=1024,
                                       vision_rows=args.vision_chunk_rows),
            "static": auto_batch_size(config, free_before, weight_bytes, seq, 2, cap=1024,
                                      static_full_attention=True, vision_rows=args.vision_chunk_rows),
            "static_whole_tower": auto_batch_size(config, free_before, weight_bytes, seq, 2, cap=1024,
                                                  static_full_attention=True),
            "static_kv_fp8": auto_batch_size(config, free_before, weight_bytes, seq, 2, cap=1024,
                                             static_full_attention=True, vision_rows=args.vision_chunk_rows,
                                             kv_bytes=1)} if device.type == "cuda" else {
            "note": "CPU smoke: not meaningful", "static_at_80gb": auto_batch_size(config, 80 * 10**9, weight_bytes,
                                                                                   seq, 2, static_full_attention=True,
                                                                                   vision_rows=VISION_CHUNK_ROWS)}
        write(out, result)

        def left() -> float:
            return args.budget_s - (time.monotonic() - started)

        if args.loop_images > 0:  # 0: left out (runs 1 and 2 measured it: 0.06-0.1 img/s)
            result["loop"] = run_loop_baseline(model, processor, paths[:args.loop_images], args, sync)
            print(json.dumps({"loop": result["loop"]}), flush=True)
            write(out, result)
        # Smaller batches first, compiled before eager, so that a short budget still has the telling runs.
        order = {"compiled": 0, "graph": 1, "graph_flex": 2, "prefill_eager": 3, "whole_tower": 4, "kv_fp8": 5,
                 "eager": 6, "fp8": 7}
        runs = sorted([("compiled", b) for b in args.compiled_batches] + [("graph", b) for b in args.graph_batches]
                      + [("graph_flex", b) for b in args.graph_flex_batches]
                      + [("prefill_eager", b) for b in args.prefill_eager_batches]
                      + [("whole_tower", b) for b in args.whole_tower_batches]
                      + [("kv_fp8", b) for b in args.kv_fp8_batches]
                      + [("eager", b) for b in args.eager_batches], key=lambda run: (run[1], order[run[0]]))
        # The whole pipeline after the last compiled/graph run of its batch size (whose graph it then reuses).
        same = [i for i, (kind, b) in enumerate(runs) if b == args.pipeline_batch and kind != "eager"]
        at = same[-1] + 1 if same else min(2, len(runs))
        if args.pipeline_images > 0:  # 0: left out
            runs[at:at] = [(PIPELINE_RUNS[name][0], args.pipeline_batch) for name in args.pipeline_runs]
        runs += [("fp8", b) for b in args.fp8_batches]  # last: the model is quantized in place for them
        result.update({kind: [] for kind in KINDS})
        variants = {key: (overlap, loop) for key, overlap, loop in PIPELINE_RUNS.values()}
        for kind, batch in runs:
            pipeline_s = 30 + args.pipeline_images / 15  # setup + ~15 img/s captioned (run 2: 2 x 7.65)
            # compiled/graph: a warm-up with compilation (run 2: 45-53 s) + the timed batches
            need = 5 if args.cpu_smoke else pipeline_s if kind in variants else 30 if kind == "eager" else 100
            if left() < need:
                result["skipped"].append(f"{kind} batch {batch}: {left():.0f} s of the budget left")
                continue
            if kind in variants:
                overlap, loop = variants[kind]
                try:
                    result[kind] = run_pipeline(model, processor, paths, Path(tmp) / kind, args, batch, PROMPT,
                                                vision_overlap=overlap, decode_loop=loop)
                except Exception as e:  # noqa: BLE001 - a benchmark section's failure is reported, the others go on
                    traceback.print_exc()
                    result[kind] = {"batch": batch, "error": f"{type(e).__name__}: {e}"}
                entry = result[kind]
            else:
                if kind == "fp8" and "fp8_weights" not in result:
                    try:
                        result["fp8_weights"] = quantize_for_fp8(model, processor, pixels, args, sync)
                    except Exception as e:  # noqa: BLE001 - reported; its runs are skipped
                        traceback.print_exc()
                        result["fp8_weights"] = {"error": f"{type(e).__name__}: {e}"}
                    print(json.dumps({"fp8_weights": result["fp8_weights"]}), flush=True)
                if kind == "fp8" and "error" in result["fp8_weights"]:
                    continue

                def keep(timed: dict, kind=kind) -> None:  # on disk before its profile: a timeout keeps it
                    write(out, {**result, kind: result[kind] + [{**timed, "profile": "not finished"}]})

                entry = run_batched(model, processor, pixels, batch, args, kind=kind, device=device, sync=sync,
                                    timed=keep)
                result[kind].append(entry)
            print(json.dumps({kind: entry}), flush=True)
            write(out, result)
    result["total_s"] = round(time.monotonic() - started, 1)
    write(out, result)
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
