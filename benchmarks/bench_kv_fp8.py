#!/usr/bin/env python3
"""--kv-cache-dtype fp8 (vlm_caption/kv_fp8.py) against the model's own dtype: one random-weight preset,
Captioner.generate over the same prepared images on both sides. One JSON line:

- cache: bytes a row of the static cache holds on each side (its real buffers, at this run's prompt + new
  tokens), and the 4B's at 536 tokens from its config (batch_size.kv_cache_bytes_per_row);
- drift: the first new token's logits (relative error, rows with the same top token) and the greedy tokens
  (rows whose every token matches, and the mean share of a row's tokens before its first difference), fp8
  against the model's dtype. On random weights: how a trained Gemma 3 takes the rounding is not measured here;
- speed: img/s of each side, best of --rounds, the sides alternating (a first batch each, outside the clock).
  On a CPU the default dynamic cache rounds every step's keys and values (a cost, no memory saved); on a GPU
  with --compile on the static cache stores float8 and FlexAttention reads it as it is (gpu_ab.sh kv8 times
  that in the whole check).

  OMP_NUM_THREADS=2 python benchmarks/bench_kv_fp8.py --preset small                    # CPU, ~1 min
  python benchmarks/bench_kv_fp8.py --device cuda --preset gemma-3-4b --batch 256 --new-tokens 200 --compile on
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Describe this artwork in detail: the subjects, the style and medium, the colour palette and the mood."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small", help="tiny_model preset (tiny, small; gemma-3-4b on a GPU)")
    p.add_argument("--batch", type=int, default=8, help="images a generate call")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens a caption, exactly")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="as the CLI's (auto: on for CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def images(n: int, seed: int = 0):
    """Varied RGB images (noise over colour gradients): the model sees each differently."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 200 + 13 * i, 300 - 7 * i
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.random(3)[None, None, :]
        out.append(Image.fromarray(np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


def row_cache_bytes(model, seq_len: int, fp8: bool) -> int:
    """Bytes of one row's static cache, from the buffers StaticDecode allocates (float8 ones with `fp8`)."""
    from vlm_caption.static_decode import prepare_static_decode

    static, _ = prepare_static_decode(model, seq_len, compile=False)
    static.kv_fp8 = fp8
    _, cache = static.cache_for(1)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def greedy_ids(cap, keys, pixels) -> list[list[int]]:
    rows: list[list[int]] = []
    real = cap._finish
    cap._finish = lambda tokens: rows.append(tokens.tolist()) or real(tokens)
    try:
        list(cap.generate(keys, pixels))
    finally:
        cap._finish = real
    return rows


def agreement(got: list[list[int]], want: list[list[int]]) -> dict:
    """Rows whose tokens all match, and the mean share of a row's tokens before its first difference."""
    same_prefix = []
    for a, b in zip(got, want):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        same_prefix.append(first / max(len(b), 1))
    return {"rows_identical": f"{sum(a == b for a, b in zip(got, want))}/{len(want)}",
            "mean_share_before_first_difference": round(sum(same_prefix) / len(same_prefix), 3)}


def main(argv=None) -> int:
    import torch

    from vlm_caption.batch_size import kv_cache_bytes_per_row
    from vlm_caption.captioner import Captioner
    from vlm_caption.kv_fp8 import set_kv_fp8
    from vlm_caption.tiny_model import build_config, build_random_model, build_tokenizer

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what --dtype auto gives
    model, processor = build_random_model(args.preset, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    caps = {name: Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=args.new_tokens,
                            min_tokens=args.new_tokens, compile=args.compile, kv_cache_dtype=name)
            for name in ("auto", "fp8")}
    keys = [f"img{i}" for i in range(args.batch)]
    pixels = [caps["auto"].prepare(im) for im in images(args.batch)]
    seq_len = caps["auto"].prompt_inputs["input_ids"].shape[-1] + args.new_tokens

    def use(name: str):  # the mark is the model's: each side sets its own before it runs
        set_kv_fp8(model, name == "fp8")
        return caps[name]

    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "preset": args.preset, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
                    "new_tokens": args.new_tokens, "static_cache": caps["fp8"].static_decode is not None,
                    "decode_attention": caps["fp8"].decoding_report(args.batch)["attention"]}
    four_b = build_config("gemma-3-4b", build_tokenizer())
    result["cache_bytes_a_row"] = {
        "this_preset": {name: row_cache_bytes(model, seq_len, name == "fp8") for name in caps},
        "gemma_3_4b_536_tokens_bf16": kv_cache_bytes_per_row(four_b, 536, 2, static_full_attention=True),
        "gemma_3_4b_536_tokens_fp8": kv_cache_bytes_per_row(four_b, 536, 1, static_full_attention=True)}

    inputs = use("auto").assemble(pixels).inputs
    with torch.inference_mode():
        full = model(**inputs).logits[:, -1].float()
        use("fp8")
        rounded = model(**inputs).logits[:, -1].float()
    result["first_token_logits"] = {
        "relative_error": round(((rounded - full).norm() / full.norm()).item(), 5),
        "same_top_token": f"{int((rounded.argmax(-1) == full.argmax(-1)).sum())}/{args.batch}"}
    ids = {name: greedy_ids(use(name), keys, pixels) for name in caps}  # (also each side's first batch)
    result["greedy_tokens"] = agreement(ids["fp8"], ids["auto"])

    best = {name: float("inf") for name in caps}
    for _ in range(args.rounds):
        for name in caps:
            cap = use(name)
            sync()
            start = time.perf_counter()
            list(cap.generate(keys, pixels))
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    result["img_s"] = {name: round(args.batch / t, 3) for name, t in best.items()}
    result["fp8_over_auto"] = round(best["auto"] / best["fp8"], 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
