#!/usr/bin/env python3
"""The language model's prefill: its peak memory a row, eager and compiled layer by layer (what --compile runs),
against batch_size.row_memory's estimate of it, the term that now sets `--batch-size auto`.

Why: with the vision tower in chunks (vision_chunks.py) the largest activations of a batch are the prompt's
through one decoder layer (batch_size.py: 6 hidden-sized and 3 MLP-sized values a token, ~31 MB a row for the
4B in bf16), and with the KV cache they decide whether 512 rows fit an 80 GB card. This measures them.

The language model is the preset's at its width (the 4B's: 2,560 wide, MLP 10,240) with --layers layers (the
peak is one layer's: 2, one sliding, one full, as Gemma 3 starts) over a --prompt-token prompt into the
product's static KV cache, allocated before the measurement (the estimate counts it apart). Each side runs in a
fresh process after a warm-up call of the same shapes (its compile included); the peak is then, on a CPU, the
resident set's high-water mark reset just before the measured call (Linux: /proc/self/clear_refs), above what
the process held, with glibc's malloc told to give large blocks back when freed (EXACT_RESIDENT_SET); on a GPU
torch's peak allocated above what it held.

  OMP_NUM_THREADS=2 python benchmarks/bench_prefill_memory.py                 # CPU: the 4B's width, batch 4
  python benchmarks/bench_prefill_memory.py --device cuda --batch 64

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_prefill import build_text_model, static_cache  # noqa: E402  (the script beside this one)

SIDES = ("eager", "compiled")
# glibc's malloc keeps freed memory for reuse (its mmap threshold rises with each large free), so a call after a
# warm-up could reuse it unseen by the resident set: fixed thresholds hand every large block back when freed.
EXACT_RESIDENT_SET = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
NEW_TOKENS = 200  # the static cache's length past the prompt, as a run at --max-tokens 200


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-4b", help="tiny_model preset whose text layers to build")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=336, help="prompt tokens (the 4B's: 256 image + ~80 text)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # a child: this side, once
    return p.parse_args(argv)


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def run_side(args) -> dict:
    """One measured prefill of `args.side` after a warm-up one: peak bytes above what was held, and the
    estimate of a row's."""
    import torch

    from vlm_caption.batch_size import row_memory
    from vlm_caption.prefill_compile import set_prefill_compile
    from vlm_caption.static_decode import _cache_kwarg_name

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_text_model(args.preset, args.layers, device, dtype)
    set_prefill_compile(model, {"language"} if args.side == "compiled" else ())
    inner = model.model
    text = inner.language_model.config
    cache = static_cache(text, args.batch, args.prompt + NEW_TOKENS, device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        embeds = torch.randn(args.batch, args.prompt, text.hidden_size, generator=generator).to(device, dtype)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)

        def prefill():
            cache.reset()
            return inner(inputs_embeds=embeds, attention_mask=mask, use_cache=True,
                         **{_cache_kwarg_name(): cache}).last_hidden_state

        prefill()  # warm-up: the compile, first-call allocations
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
            before = _status_kb("VmRSS") * 1024
        out = prefill()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = _status_kb("VmHWM") * 1024 - before
        del out
    estimate = row_memory(model.config, args.prompt + NEW_TOKENS, dtype.itemsize, static_full_attention=True,
                          prompt_tokens=args.prompt).prefill
    return {"peak_bytes": peak, "estimate_bytes_per_row": estimate}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side is not None:  # a child: one side, its numbers on stdout
        print(json.dumps(run_side(args)))
        return 0
    import torch

    same = [f"--{name}={getattr(args, name)}" for name in ("preset", "layers", "batch", "prompt", "dtype", "device")]
    found = {}
    for side in SIDES:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *same, "--side", side], check=True,
                             capture_output=True, text=True, env={**os.environ, **EXACT_RESIDENT_SET})
        found[side] = json.loads(out.stdout.strip().splitlines()[-1])
    estimate = found["eager"]["estimate_bytes_per_row"]
    print(json.dumps({
        "preset": args.preset, "layers": args.layers, "batch": args.batch, "prompt": args.prompt, "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **{f"{side}_peak_mb_per_row": round(found[side]["peak_bytes"] / args.batch / 1e6, 2) for side in SIDES},
        "estimate_mb_per_row": round(estimate / 1e6, 2),
        **{f"{side}_of_estimate": round(found[side]["peak_bytes"] / args.batch / estimate, 3) for side in SIDES}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
