#!/usr/bin/env python3
"""The vision tower compiled whole against layer by layer (what `--compile` does, prefill_compile.py): the cold
compile time of each, and their speed against eager.

Why: run 5's first batch of 256 compiled for ~230 s before it ran, 139 s of it the prefill (BENCHMARKS.md §6).
A whole tower's graph unrolls its 27 encoder layers; the layers are the same code on other weights, so
compiled one by one they share one graph and the compile no longer grows with the depth.

The tower is SigLIP at the preset's width and depth (the 4B's: 1,152 wide, 27 layers) at --image-size pixels
(default 224: 256 patches instead of 896's 4,096, so a CPU runs it in seconds; the graphs are the same at any
size); the language model is the tiny preset's and unused. Inductor's FX-graph cache is off: both sides compile
cold, as on a fresh machine. The sides alternate, best of --rounds.

  OMP_NUM_THREADS=2 python benchmarks/bench_tower_compile.py                # CPU: the 4B's tower at 224 px
  python benchmarks/bench_tower_compile.py --device cuda --batch 64 --image-size 896 --dtype bfloat16

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import build_from_spec  # noqa: E402  (the script beside this one)


def add_tower_arguments(p: argparse.ArgumentParser, batch: int) -> None:
    """The arguments of a script that builds the tower (build_tower_model) and times it: here and in
    bench_vision_chunks.py."""
    p.add_argument("--preset", default="gemma-3-4b", help="tiny_model preset whose vision tower to build")
    p.add_argument("--image-size", type=int, default=224, help="pixels a side (a multiple of the patch size, 14)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tower_arguments(p, batch=2)
    return p.parse_args(argv)


def build_tower_model(preset: str, image_size: int, device, dtype):
    """A Gemma 3 model with `preset`'s vision tower at `image_size` pixels and the tiny preset's text model."""
    from vlm_caption import tiny_model

    spec = copy.deepcopy(tiny_model.PRESETS[preset])
    spec["vision"]["image_size"] = image_size
    patches = image_size // spec["vision"]["patch_size"]
    side = next(s for s in range(min(patches, 16), 0, -1) if patches % s == 0)  # the projector pools to side^2
    spec.update(text=tiny_model.PRESETS["tiny"]["text"], mm_tokens_per_image=side * side, savable=False)
    return build_from_spec(spec, f"_bench_tower_{preset}", device, dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch._inductor.config

    from vlm_caption.prefill_compile import set_prefill_compile

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_tower_model(args.preset, args.image_size, device, dtype)
    tower = model.model.vision_tower
    generator = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator).to(device, dtype)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tower(pixel_values=pixels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def whole(on: bool) -> None:  # the tower in one graph (--compile before this change)
        tower._compiled_call_impl = torch.compile(tower._call_impl) if on else None

    def layers(on: bool) -> None:  # each encoder layer compiled alone: what --compile does
        set_prefill_compile(model, {"vision"} if on else ())

    sides = {"whole": whole, "layers": layers}
    torch._inductor.config.fx_graph_cache = False  # cold compiles on both sides
    torch.compile(lambda x: x * 2)(pixels)  # inductor's one-time start (imports, the C++ / Triton toolchain): on neither side
    found: dict = {}
    with torch.inference_mode():
        want = tower(pixel_values=pixels).last_hidden_state.float()
        for name, switch in sides.items():
            switch(True)
            found[f"{name}_compile_s"] = round(timed(), 1)
            found[f"{name}_max_abs_diff"] = (tower(pixel_values=pixels).last_hidden_state.float() - want).abs().max().item()
            switch(False)
        times: dict = {"eager": [], **{name: [] for name in sides}}
        for _ in range(args.rounds):  # alternating: a machine that slows down slows every side
            times["eager"].append(timed())
            for name, switch in sides.items():
                switch(True)
                times[name].append(timed())
                switch(False)
    best = {name: min(ts) for name, ts in times.items()}
    print(json.dumps({
        "preset": args.preset, "encoder_layers": len(tower.encoder.layers), "image_size": args.image_size,
        "batch": args.batch, "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        **{f"{name}_ms": round(1000 * s, 2) for name, s in best.items()},
        "compile_faster": round(found["whole_compile_s"] / max(found["layers_compile_s"], 1e-9), 2),
        "layers_vs_whole_speed": round(best["whole"] / best["layers"], 3),
        "whole_vs_eager_speed": round(best["eager"] / best["whole"], 3), **found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
