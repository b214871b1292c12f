#!/usr/bin/env python3
"""Side-by-side: the original one-image-per-generate loop vs this project's pipeline, same model, same images.

Both generate exactly --new-tokens tokens per image (min_new_tokens = max_new_tokens, greedy), so they
do the same arithmetic; the pipeline's time includes reading metadata, decoding and preprocessing
images in loader threads, batched generation and writing part files. Model loading is outside both.

  python benchmarks/bench_captioning.py --preset small --images 32 --new-tokens 32 --batch-size 8   # CPU
  python benchmarks/bench_captioning.py --preset gemma-3-4b --images 512 --loop-images 8 --new-tokens 200 \
      --batch-size 64                                                                               # GPU

Prints one JSON line (and appends it to --out when given).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bf16 dense peak, FLOP/s, for the fraction-of-roof column.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny_model preset: tiny, small (saved, CPU) or "
                   "gemma-3-4b/12b/27b (real size, random weights, GPU)")
    p.add_argument("--images", type=int, default=32, help="images for the pipeline")
    p.add_argument("--loop-images", type=int, default=None, help="images for the loop (default: --images)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--cache-implementation", default=None, help="e.g. static (default: transformers' dynamic cache)")
    p.add_argument("--skip-loop", action="store_true", help="measure only the pipeline")
    p.add_argument("--repeat", type=int, default=1, help="alternate loop and pipeline this many times and keep "
                   "the best of each (a shared machine is noisy)")
    p.add_argument("--out", help="append the JSON line to this file")
    return p.parse_args(argv)


def load(args, device, workdir: Path):
    """(model, processor): saved presets go through the same from_pretrained path as a hub model."""
    from vlm_caption import tiny_model
    from vlm_caption.model_loading import load_model, resolve_dtype

    if args.preset in ("tiny", "small"):
        path = tiny_model.build_tiny_model(workdir / "model", preset=args.preset, seed=0)
        return load_model(str(path), device, dtype=args.dtype, attn_implementation=args.attn_implementation)
    dtype = resolve_dtype(args.dtype, device)
    model, processor = tiny_model.build_random_model(args.preset, device=device, dtype=dtype, seed=0)
    model.eval()
    return model, processor


def run_loop(model, processor, image_paths, new_tokens, prompt):
    """What the original script does: for each image, chat template + processor + generate, one at a time."""
    import torch
    from PIL import Image

    n_tokens = 0
    for path in image_paths:
        image = Image.open(path).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt").to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[-1]:]
        processor.decode(new, skip_special_tokens=True)
        n_tokens += int(new.shape[0])
    return n_tokens


def run_pipeline(model, processor, data_dir: Path, ckpt: Path, args, prompt):
    from vlm_caption import dataset, pipeline, store
    from vlm_caption.captioner import Captioner
    from vlm_caption.config import RunConfig

    cfg = RunConfig(model=args.preset, data_dir=str(data_dir), checkpoint_dirs=[str(ckpt)], no_push=True,
                    batch_size=args.batch_size, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                    num_loader_workers=args.loader_workers, prompt=prompt,
                    retry_repetition_penalty=0)  # the loop has no second try: the same arithmetic on both sides
    captioner = Captioner(model, processor, model_name=args.preset, prompt=prompt, max_tokens=args.new_tokens,
                          min_tokens=args.new_tokens)
    if args.cache_implementation:
        captioner.gen_config.cache_implementation = args.cache_implementation
    writer = store.CheckpointStore(ckpt, 0)
    writer.open_run(cfg.run_settings(), overwrite=False)
    plan = dataset.plan_work(data_dir, shards=None, max_images=args.images, worker=0, num_workers=1,
                             done_keys=set(), failed_keys=set())
    stats = pipeline.RunStats()
    pipeline.caption_all(cfg, plan, writer, stats, pusher=None, backend=captioner)
    writer.lock.release()
    assert stats.captioned == plan.todo, f"pipeline captioned {stats.captioned} of {plan.todo}"
    return stats.tokens, stats.rates()["generate_share"]


def flops_per_image(model, prompt_len: int, new_tokens: int) -> float:
    """~2 FLOP per parameter per token for the language model, plus the vision tower over its patches."""
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    text = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    cfg = model.config.vision_config
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return 2 * text * (prompt_len + new_tokens) + 2 * vision * patches


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from vlm_caption.model_loading import choose_device
    from vlm_caption.sample_data import write_sample

    device = choose_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompt = "Describe this artwork in detail."
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor = load(args, device, work)
        data_dir = write_sample(work / "data", n=max(args.images, args.loop_images or 0), broken=False, seed=0)
        keys = sorted(__import__("pyarrow.parquet", fromlist=["x"]).read_table(
            data_dir / "full_metadata.parquet", columns=["key", "file_name"]).to_pylist(), key=lambda r: r["key"])
        loop_paths = [data_dir / r["file_name"] for r in keys[:args.loop_images or args.images]]

        # Warm-up outside the clock: first CUDA kernels / allocator growth.
        run_loop(model, processor, loop_paths[:1], 2, prompt)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "transformers": transformers.__version__, "preset": args.preset,
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                  "new_tokens_per_image": args.new_tokens, "batch_size": args.batch_size,
                  "attn_implementation": args.attn_implementation, "cache": args.cache_implementation or "dynamic",
                  "pipeline_images": args.images, "loop_images": len(loop_paths), "cpu_threads": torch.get_num_threads()}
        for r in range(args.repeat):  # alternate the two so a burst of load elsewhere hits both alike
            if not args.skip_loop:
                tokens, secs = timed(lambda: run_loop(model, processor, loop_paths, args.new_tokens, prompt), sync)
                if secs < result.get("_loop_s", float("inf")):
                    result.update(_loop_s=secs, loop_img_s=round(len(loop_paths) / secs, 3),
                                  loop_tokens_s=round(tokens / secs, 1))
            ckpt = work / f"ckpt{r}"
            (tokens, generate_share), secs = timed(
                lambda: run_pipeline(model, processor, data_dir, ckpt, args, prompt), sync)
            if secs < result.get("_pipeline_s", float("inf")):
                result.update(_pipeline_s=secs, pipeline_img_s=round(_count(ckpt) / secs, 3),
                              pipeline_tokens_s=round(tokens / secs, 1), pipeline_generate_share=generate_share)
        result = {k: v for k, v in result.items() if not k.startswith("_")}
        result["repeat"] = args.repeat
        if "loop_img_s" in result:
            result["ratio"] = round(result["pipeline_img_s"] / result["loop_img_s"], 2)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if device.type == "cuda":
            result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            prompt_len = _prompt_len(processor, prompt)
            flops = flops_per_image(model, prompt_len, args.new_tokens)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in result["device"]), None)
            result["flop_per_image"] = float(f"{flops:.3g}")
            if peak:
                result["fraction_of_bf16_roof"] = round(result["pipeline_img_s"] * flops / peak, 4)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


def _count(ckpt: Path) -> int:
    from vlm_caption import store

    return sum(len(k) for _, k in store.read_keys(store.list_parts(ckpt)))


def _prompt_len(processor, prompt: str) -> int:
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64))},
                                             {"type": "text", "text": prompt}]}]
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(enc["input_ids"][0])


if __name__ == "__main__":
    sys.exit(main())
