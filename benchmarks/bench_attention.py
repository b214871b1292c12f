#!/usr/bin/env python3
"""One decode step's attention for one layer, at a real Gemma 3's shapes: transformers' sdpa vs the grouped
decode attention (vlm_caption/grouped_attention.py), both under torch.compile as the compiled decode step
runs them; FlexAttention (grouped_flex_attention: its decoding kernel skips the blocks the mask leaves out;
--decode-attention auto takes it for compiled CUDA steps of 128+ rows); and the grouped attention pinned to
one of torch's sdpa kernels (--backends efficient cudnn ..., sides `grouped_efficient` etc.; by default torch
picks, and with a mask that is not the flash kernel). With an fp8 cache (--kv-cache-dtype fp8, kv_fp8.py):
`flex_fp8` (on CUDA: FlexAttention reading float8 keys and values as they are, half the bytes) and
`grouped_fp8` (the grouped sdpa, which converts them first: what a step without flex pays).

The query is one token per row; keys and values are a static cache of --cache-len slots (prompt + new
tokens: 336 + 200 for the pipeline's prompt) with left padding in the mask, as in a captioning batch. Under
compile transformers' sdpa copies the cache per query head (repeat_kv); the grouped one reads it once.

  python benchmarks/bench_attention.py --device cuda --batch 64 128 256           # a GPU, seconds
  OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --batch 16 32 --dtype float32   # this CPU

One JSON line per batch: ms per call for each side (best of --rounds, the sides alternating), the speedup,
and the cache bytes one call must read (K and V once) -> the GB/s each side reaches on that.

--tower instead times the vision tower's self-attention, one layer, no mask, at the preset's SigLIP shapes
(the 4B's: 4,096 patches of an 896 px image, 16 heads of 72): each of torch's sdpa kernels, torch's own pick,
and FlexAttention compiled, as ms an image for the whole tower (the layer's time x its layers) and TFLOP/s.
That attention is ~2.1 of the ~9.2 TFLOP an image costs; a head size of 72 is not one flash attention has
kernels for (it runs as the next it has, 96), so which kernel takes it is worth seconds a batch.

  python benchmarks/bench_attention.py --device cuda --tower --batch 8            # a GPU, seconds
  OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --tower --batch 1 --tokens 1024   # this CPU
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}  # names of torch.nn.attention.SDPBackend


def pinned(fn, backend: str):
    """`fn` run with torch's sdpa limited to one kernel (traced by torch.compile as such)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def call(*args, **kwargs):
        with sdpa_kernel([chosen]):
            return fn(*args, **kwargs)
    return call


def one_line(error: Exception) -> str:
    """An error as one line; for torch.compile's wrapped errors the kernel's own message inside it."""
    text = str(error).strip()
    inner = re.search(r"got (\w+\(.*?\))$", text, re.MULTILINE)
    return f"{type(error).__name__}: " + (inner.group(1) if inner else (text.splitlines() or [""])[0])[:300]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="gemma-3-4b", help="a real-size preset of vlm_caption.tiny_model")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--cache-len", type=int, default=536, help="static cache slots (prompt + max new tokens)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="calls per timed round")
    p.add_argument("--no-compile", action="store_true", help="eager (transformers 5.24 then groups by itself)")
    p.add_argument("--tower", action="store_true", help="the vision tower's attention instead (--batch: images)")
    p.add_argument("--tokens", type=int, default=None, help="--tower: patches an image (default: the preset's)")
    p.add_argument("--backends", nargs="*", choices=sorted(SDPA_BACKENDS), default=None,
                   help="also time the grouped attention pinned to each of these sdpa kernels (default on cuda: "
                   "efficient cudnn math; math is inductor's own bmm + softmax + bmm under compile; a kernel that "
                   "cannot take the inputs is reported as an error)")
    return p.parse_args(argv)


def measure(device: str, preset: str, batches, *, cache_len: int = 536, dtype: str | None = None, rounds: int = 5,
            calls: int = 20, compile: bool = True, backends=None) -> list[dict]:
    """A result dict per batch size (the JSON lines main prints; decode_diag.py's attention section).
    `backends`: sdpa kernels to pin the grouped attention to, each one more side (default on cuda: efficient,
    cudnn, math). A side that fails on the inputs is left out of the timing, with `<side>_error` saying why."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vlm_caption.grouped_attention import grouped_flex_attention, grouped_sdpa_attention
    from vlm_caption.kv_fp8 import to_fp8
    from vlm_caption.tiny_model import _preset

    # Every side compiles the same `call` code below: 5 sides over 2 batch sizes passed dynamo's default of 8
    # compiled versions of one function, and the last sides failed (run 4, batch 64 after 256).
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 8 * len(batches)))
    device = torch.device(device)
    if backends is None:
        backends = ["efficient", "cudnn", "math"] if device.type == "cuda" else []
    dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    text = _preset(preset)["text"]
    heads, kv_heads, dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    scaling = text.get("query_pre_attn_scalar", dim) ** -0.5
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def wrap(fn):
        call = lambda q, k, v, mask: fn(module, q, k, v, mask, scaling=scaling)[0]  # noqa: E731
        return torch.compile(call, dynamic=False, fullgraph=True) if compile else call

    results = []
    for batch in batches:
        sides = {"transformers_sdpa": wrap(sdpa_attention_forward), "grouped": wrap(grouped_sdpa_attention)}
        if compile:  # FlexAttention runs unfused (slowly) without compile: nothing to compare
            sides["flex"] = wrap(grouped_flex_attention)
        for backend in backends:
            sides[f"grouped_{backend}"] = wrap(pinned(grouped_sdpa_attention, backend))
        g = torch.Generator(device="cpu").manual_seed(batch)
        q = torch.randn(batch, heads, 1, dim, generator=g).to(device, dtype)
        k, v = (torch.randn(batch, kv_heads, cache_len, dim, generator=g).to(device, dtype) for _ in range(2))
        if compile:  # the fp8 cache's sides: the same call on float8 keys and values (a CPU's flex wants one dtype)
            k8, v8 = to_fp8(k), to_fp8(v)
            for name, fn in (("flex_fp8", sides.get("flex") if device.type == "cuda" else None),
                             ("grouped_fp8", wrap(grouped_sdpa_attention))):
                if fn is not None:
                    sides[name] = lambda q, k, v, mask, fn=fn: fn(q, k8, v8, mask)
        mask = torch.ones(batch, 1, 1, cache_len, dtype=torch.bool, device=device)
        for row in range(batch):  # left padding of up to 40 slots, and the not-yet-written end of the cache
            mask[row, ..., : row % 41] = False
        mask[..., cache_len - 100:] = False
        outputs, errors = {}, {}
        for name, fn in list(sides.items()):  # compile + check outside the clock
            try:
                outputs[name] = fn(q, k, v, mask)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot take these inputs is a finding
                errors[f"{name}_error"] = one_line(e)
                del sides[name]
        diffs = {name: (out.float() - outputs["transformers_sdpa"].float()).abs().max().item()
                 for name, out in outputs.items() if name != "transformers_sdpa"}
        best = best_times(sides, (q, k, v, mask), rounds=rounds, calls=calls, sync=sync)
        cache_gb = 2 * k.numel() * k.element_size() / 1e9
        results.append({
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": preset,
            "dtype": str(dtype).replace("torch.", ""), "compiled": compile, "batch": batch, "cache_len": cache_len,
            "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
            **{f"{name}_ms": round(1000 * t, 3) for name, t in best.items()},
            "speedup": round(best["transformers_sdpa"] / best["grouped"], 2), "kv_cache_gb": round(cache_gb, 4),
            **{f"{name}_gb_s": round(cache_gb / (2 if name.endswith("_fp8") else 1) / t, 1)
               for name, t in best.items()}, "max_abs_diff": diffs["grouped"],
            **{f"{name}_max_abs_diff": diff for name, diff in diffs.items() if name != "grouped"}, **errors})
    return results


def best_times(sides: dict, inputs: tuple, *, rounds: int, calls: int, sync) -> dict[str, float]:
    """Seconds a call of each side on `inputs`: the best of `rounds` rounds of `calls` calls, the sides
    alternating (a machine that slows down slows every side)."""
    best = {name: float("inf") for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn(*inputs)
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def measure_tower(device: str, preset: str, images: int, *, tokens: int | None = None, dtype: str | None = None,
                  rounds: int = 5, calls: int = 20, backends=None) -> dict:
    """The vision tower's attention over `images` images: one result dict (the JSON line main prints). Sides:
    `sdpa` (torch's pick), each of `backends` pinned (default on cuda: flash, cudnn, efficient; on the CPU:
    flash, math), `flex` compiled. A side that fails on the inputs is reported as `<side>_error`."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from vlm_caption.tiny_model import _preset

    device = torch.device(device)
    if backends is None:
        backends = ["flash", "cudnn", "efficient"] if device.type == "cuda" else ["flash", "math"]
    dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    vision = _preset(preset)["vision"]
    heads, layers = vision["num_attention_heads"], vision["num_hidden_layers"]
    dim = vision["hidden_size"] // heads
    tokens = tokens or (vision["image_size"] // vision["patch_size"]) ** 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sides = {"sdpa": sdpa, **{name: pinned(sdpa, name) for name in backends},
             "flex": torch.compile(flex_attention, dynamic=False)}
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(images, heads, tokens, dim, generator=g).to(device, dtype) for _ in range(3))
    outputs, errors = {}, {}
    with torch.inference_mode():
        for name, fn in list(sides.items()):  # compile + check outside the clock
            try:
                outputs[name] = fn(q, k, v)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot take these inputs is a finding
                errors[f"{name}_error"] = one_line(e)
                del sides[name]
        best = best_times(sides, (q, k, v), rounds=rounds, calls=calls, sync=sync)
    flop = 4 * tokens * tokens * dim * heads * images  # QK^T and PV, a multiply-add = 2 FLOP
    reference = outputs.get("sdpa")
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": preset,
        "dtype": str(dtype).replace("torch.", ""), "images": images, "tokens": tokens, "heads": heads,
        "head_dim": dim, "layers": layers, "tflop_per_image_all_layers": round(flop * layers / images / 1e12, 3),
        **{f"{name}_ms_per_image": round(1000 * t * layers / images, 3) for name, t in best.items()},
        **{f"{name}_tflop_s": round(flop / t / 1e12, 2) for name, t in best.items()},
        **{f"{name}_max_abs_diff": (out.float() - reference.float()).abs().max().item()
           for name, out in outputs.items() if name != "sdpa" and reference is not None}, **errors}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tower:
        print(json.dumps(measure_tower(args.device, args.preset, args.batch[0], tokens=args.tokens,
                                       dtype=args.dtype, rounds=args.rounds, calls=args.calls,
                                       backends=args.backends)), flush=True)
        return 0
    for result in measure(args.device, args.preset, args.batch, cache_len=args.cache_len, dtype=args.dtype,
                          rounds=args.rounds, calls=args.calls, compile=not args.no_compile,
                          backends=args.backends):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
