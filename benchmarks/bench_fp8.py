#!/usr/bin/env python3
"""`--quantize fp8` (vlm_caption/fp8.py) against bf16: the speed of each linear layer a preset has, at the rows
an image gives it, and how far the model's first-token logits move.

gemms   every distinct linear-layer shape of the preset's vision tower and language model (built on the meta
        device: no weights), at `--batch` images' rows (SigLIP: one row per patch, 4,096 at 896 px; the
        language model's prefill: one per prompt token; `--decode`: one per image), timed as nn.Linear in the
        model's dtype against fp8.Fp8Linear (compiled alone, by default on CUDA: its input's scaling is a pass
        of its own here, which in the model fuses into the norm before it, see fusion). Per image: the sum over the model's layers of count x time; the
        relative error of each GEMM's output on random data. The two sides alternate, best of --rounds.
logits  the preset with random weights, a batch of random images through the Captioner's own assembly: the
        logits of the first new token before and after quantize_fp8 (relative error, and how many rows keep
        their top token). Random weights are not trained ones: this bounds the arithmetic, not caption quality.
fusion  the kernels inductor writes for an RMSNorm then a linear layer, bf16 and FP8: whether the FP8 input's
        scaling fuses into the norm (then the gemms section's separate pass is not paid in the model).

  OMP_NUM_THREADS=2 python benchmarks/bench_fp8.py --preset small --batch 2     # CPU: runs, numbers mean little
  python benchmarks/bench_fp8.py --device cuda --preset gemma-3-4b --batch 16   # an H100: ~2 min

Prints a JSON line per shape as it ends, then one per section. On a CPU, FP8 GEMMs are emulated: only the
GPU's ratios say anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT_TOKENS = 80  # a prompt's text and chat markup beside the image tokens (the default prompt: ~60-80)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-4b", help="tiny_model preset (default gemma-3-4b)")
    p.add_argument("--batch", type=int, default=16, help="images per GEMM call and in the logits batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time the FP8 side compiled (default: on for CUDA)")
    p.add_argument("--decode", action="store_true", help="also the language model's layers at one row per image")
    p.add_argument("--sections", nargs="+", default=["gemms", "logits", "fusion"],
                   choices=["gemms", "logits", "fusion"])
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    return args


def layer_shapes(preset: str):
    """({part: Counter of (in_features, out_features) over its nn.Linear layers}, the config), from a model on
    the meta device (no weights)."""
    import torch
    from torch import nn
    from transformers import AutoModelForImageTextToText

    from vlm_caption import tiny_model

    config = tiny_model.build_config(preset, tiny_model.build_tokenizer(tiny_model.PRESETS[preset]["text"]["vocab_size"]))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return {part: Counter((m.in_features, m.out_features) for m in getattr(model.model, part).modules()
                          if type(m) is nn.Linear)
            for part in ("vision_tower", "language_model")}, config


def rows_per_image(config) -> dict[str, int]:
    vision = config.vision_config
    return {"vision_tower": (vision.image_size // vision.patch_size) ** 2,
            "language_model": config.mm_tokens_per_image + TEXT_TOKENS}


def time_gemms(args) -> dict:
    import torch
    from torch import nn
    from torch._dynamo.utils import counters

    from vlm_caption.fp8 import Fp8Linear

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes, config = layer_shapes(args.preset)
    rows = rows_per_image(config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = [(part, rows[part], shape, count) for part, counter in shapes.items() for shape, count in counter.items()]
    if args.decode:
        runs += [("decode", 1, shape, count) for shape, count in shapes["language_model"].items()]
    out: dict = {"section": "gemms", "preset": args.preset, "batch": args.batch, "device": str(device),
                 "compiled_fp8": args.compile, "shapes": []}
    per_image = Counter()
    for part, per, (k, n), count in runs:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=part == "vision_tower", device=device, dtype=dtype)
        fp8 = Fp8Linear(linear)
        # A fresh compile per shape: every Fp8Linear shares one forward, and past dynamo's recompile limit (8)
        # the rest ran eagerly, unsaid (run 5's decode shapes: 8x slower, all of it launch overhead).
        torch._dynamo.reset()
        counters.clear()
        fp8_call = torch.compile(fp8, dynamic=False) if args.compile else fp8
        x = torch.randn(args.batch * per, k, device=device, dtype=dtype)
        best = {"bf16": float("inf"), "fp8": float("inf")}
        with torch.inference_mode():
            err = ((fp8_call(x).float() - linear(x).float()).norm() / linear(x).float().norm()).item()  # + warm-up
            for _ in range(args.rounds):
                for side, call in (("bf16", linear), ("fp8", fp8_call)):
                    sync()
                    start = time.perf_counter()
                    for _ in range(3):
                        call(x)
                    sync()
                    best[side] = min(best[side], (time.perf_counter() - start) / 3)
        for side in best:
            per_image[(part, side)] += count * best[side] / args.batch
        graphs = counters["stats"]["unique_graphs"] if args.compile else None  # 1: this shape ran compiled
        shape = {"part": part, "in": k, "out": n, "layers": count, "rows": args.batch * per, "fp8_graphs": graphs,
                 "bf16_ms": round(best["bf16"] * 1e3, 3), "fp8_ms": round(best["fp8"] * 1e3, 3),
                 "speedup": round(best["bf16"] / best["fp8"], 3), "relative_error": round(err, 4)}
        print(json.dumps({"shape": shape}), flush=True)  # as it ends: a timeout keeps the shapes before
        out["shapes"].append(shape)
        del x, linear, fp8, fp8_call
    for part in dict.fromkeys(p for p, _ in per_image):
        bf16, fp8 = per_image[(part, "bf16")], per_image[(part, "fp8")]
        out[part] = {"bf16_ms_per_image": round(bf16 * 1e3, 3), "fp8_ms_per_image": round(fp8 * 1e3, 3),
                     "speedup": round(bf16 / fp8, 3)}
    return out


def quantize_and_compare(model, inputs, sync=lambda: None, choice: str = "fp8") -> dict:
    """quantize_fp8(model) in place as --quantize `choice` does, with the logits of the first new token for
    `inputs` before and after: their relative error, cosine and the rows that keep their top token (also
    gpu_check.py's fp8 section)."""
    import torch

    from vlm_caption.fp8 import QUANTIZED_PARTS, quantize_fp8

    with torch.inference_mode():
        want = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        sync()
        start = time.perf_counter()
        report = quantize_fp8(model, QUANTIZED_PARTS[choice])
        sync()
        seconds = time.perf_counter() - start
        got = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    return {"quantize": choice, "fp8_layers": report.layers, "kept_bf16": len(report.kept), "quantize_s": round(seconds, 2),
            "linear_weight_bytes": [report.bytes_before, report.bytes_after],
            "logits_relative_error": round(((got - want).norm() / want.norm()).item(), 4),
            "logits_cosine": round(torch.nn.functional.cosine_similarity(got, want, dim=-1).mean().item(), 5),
            "same_top_token": f"{int((got.argmax(-1) == want.argmax(-1)).sum())}/{len(got)}"}


def logits_drift(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from vlm_caption.captioner import Captioner
    from vlm_caption.tiny_model import build_random_model

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, processor = build_random_model(args.preset, device, dtype)
    cap = Captioner(model, processor, model_name=args.preset, prompt="Describe this artwork in detail.",
                    max_tokens=1, compile="off", decode_loop="generate")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480 + 16 * i, 640, 3), dtype=np.uint8))
              for i in range(args.batch)]
    inputs = cap.assemble([cap.prepare(im) for im in images]).inputs
    return {"section": "logits", "preset": args.preset, "dtype": args.dtype, "rows": args.batch,
            **quantize_and_compare(model, inputs)}


def fused_kernels(args) -> dict:
    """The kernels inductor writes for the language model's RMSNorm then a linear layer (its commonest shape),
    bf16 against FP8: whether the FP8 input's row maximum, scale and cast fuse into the norm's kernel (the
    `gemms` section times them as a pass of their own, its pessimistic side)."""
    import re

    import torch
    from torch import nn
    from torch._inductor.utils import run_and_get_code
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from vlm_caption.fp8 import Fp8Linear

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    (k, n), _ = next(iter(layer_shapes(args.preset)[0]["language_model"].most_common()))
    norm = Gemma3RMSNorm(k).to(device, dtype)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    x = torch.randn(args.batch * 16, k, device=device, dtype=dtype)
    out: dict = {"section": "fusion", "preset": args.preset, "layer": [k, n]}
    for side, layer in (("bf16", linear), ("fp8", Fp8Linear(linear))):
        torch._dynamo.reset()
        with torch.inference_mode():
            _, code = run_and_get_code(torch.compile(lambda t: layer(norm(t))), x)
        # generated kernels (Triton on a GPU, C++ on a CPU); the GEMM itself is an extern call or a template
        out[side] = sorted(set(re.findall(r"\b((?:triton_\w+?|cpp)_fused_\w+)", "\n".join(code))))
    return out


SECTIONS = {"gemms": time_gemms, "logits": logits_drift, "fusion": fused_kernels}


def main(argv=None) -> int:
    args = parse_args(argv)
    for section in args.sections:
        print(json.dumps(SECTIONS[section](args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
