#!/usr/bin/env python3
"""The language model's prefill, eager vs compiled as `--compile` compiles it (vlm_caption/prefill_compile.py),
at a real model's layer sizes, and the memory traffic of the eager prefill's elementwise ops.

Why the compile should pay on a GPU: a prefill's GEMMs run near the card's peak, but eager, every elementwise
op between them is its own kernel that reads and writes whole activations from memory (Gemma's RMSNorm alone
is ~7: a float32 upcast, pow, mean, rsqrt, two multiplies, a downcast; 6 norms a layer). Inductor fuses them.
This counts the bytes those ops move (every aten op's tensor inputs and outputs, GEMMs, attention and views
left out) and times both sides.

The text layers are the preset's own (width, heads, MLP), `--layers` of them (the count scales time and
bytes alike; the full model's bytes per image are scaled from them, which also scales the masks and rotary
tables built once per forward: a small over-count); the vision tower is not built: the prompt's embeddings are
random. Both sides run the same module; the sides alternate, best of --rounds.

The prefill runs as the product's does: through Gemma 3's inner model (which builds the masks), into a
static KV cache long enough for the longer prompt + 200 tokens, reset before each call. `compiled` is
`--compile`'s: each decoder layer compiled on its own, the cache written after the layer's call (every layer
shares one graph, so the compile does not grow with the layer count). --whole adds the language model
compiled as one graph with every layer unrolled (what --compile did before), and times each compiled side's
first call with inductor's FX-graph cache off (cold, as on a fresh machine) and a second prompt length after
it (a templated prompt's).

  OMP_NUM_THREADS=2 python benchmarks/bench_prefill.py                     # CPU: the 4B's layers, bf16
  OMP_NUM_THREADS=2 python benchmarks/bench_prefill.py --whole --layers 34 --batch 1 --rounds 2
  python benchmarks/bench_prefill.py --device cuda --batch 64 --layers 34  # a GPU: the whole 4B text model

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GEMMS_AND_ATTENTION = {"mm", "addmm", "bmm", "mv", "addmv", "linear", "matmul", "baddbmm",
                       "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                       "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_cudnn_attention"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-4b", help="tiny_model preset whose text layers to build")
    p.add_argument("--layers", type=int, default=2, help="text layers to build (default 2: one sliding, one full)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=336, help="prompt tokens (the 4B's: 256 image + ~80 text)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--whole", action="store_true", help="also the language model compiled as one graph (the "
                   "product before), with each compiled side's cold compile time")
    return p.parse_args(argv)


def build_text_model(preset: str, layers: int, device, dtype):
    """The preset's language model with `layers` layers (alternating sliding / full, as Gemma 3's start) and a
    tiny vision tower, inside a Gemma 3 model (so set_prefill_compile finds it where it does in the product)."""
    import copy

    from vlm_caption import tiny_model

    spec = copy.deepcopy(tiny_model.PRESETS[preset])
    spec["text"].update(num_hidden_layers=layers, vocab_size=tiny_model.TRAINED_VOCAB,
                        layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    spec.update(vision=tiny_model.PRESETS["tiny"]["vision"], mm_tokens_per_image=16, savable=False)
    return build_from_spec(spec, f"_bench_prefill_{preset}", device, dtype)


def build_from_spec(spec: dict, name: str, device, dtype):
    """tiny_model.build_random_model of a preset `spec` registered under `name` for the call only."""
    from vlm_caption import tiny_model

    tiny_model.PRESETS[name] = spec
    try:
        return tiny_model.build_random_model(name, device, dtype)[0]
    finally:
        del tiny_model.PRESETS[name]


def static_cache(text, batch: int, length: int, device, dtype):
    """The product's static KV cache (StaticDecode.cache_for): full attention, its buffers allocated now."""
    from transformers import StaticCache

    from vlm_caption.static_decode import full_attention_config

    config = full_attention_config(text)
    cache = StaticCache(config=config, max_cache_len=length)
    cache.early_initialization(batch, text.num_key_value_heads, text.head_dim, dtype, device)
    return cache


def whole_model_call(lm):
    """The language model compiled as one graph, its prompt length dynamic from the first call (as --compile
    did before its layers were compiled one by one)."""
    import torch
    import torch._dynamo

    compiled = torch.compile(lm._call_impl)

    def call(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[1] <= 1:
            return lm._call_impl(*args, **kwargs)
        for value in kwargs.values():
            for tensor in value.values() if isinstance(value, dict) else (value,):
                if isinstance(tensor, torch.Tensor):
                    for dim, size in enumerate(tensor.shape):
                        if size == embeds.shape[1]:
                            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return compiled(*args, **kwargs)

    return call


def elementwise_bytes(fn) -> int:
    """Bytes of tensor inputs + outputs of every aten op `fn` runs, GEMMs, attention and views left out."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    total = 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal total
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in GEMMS_AND_ATTENTION and not func.is_view:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                total += sum(t.numel() * t.element_size() for t in tensors)
            return out

    with Count():
        fn()
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from vlm_caption.prefill_compile import set_prefill_compile

    from vlm_caption.static_decode import _cache_kwarg_name

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_text_model(args.preset, args.layers, device, dtype)
    inner, lm = model.model, model.model.language_model
    text = lm.config
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():  # (as generate's inputs: one graph for them all)
        embeds = torch.randn(args.batch, args.prompt, text.hidden_size, generator=generator).to(device, dtype)
        longer = torch.randn(args.batch, args.prompt + 24, text.hidden_size, generator=generator).to(device, dtype)
    cache = static_cache(text, args.batch, args.prompt + 24 + 200, device, dtype)
    cache_kw = {_cache_kwarg_name(): cache}

    def prefill(prompt=embeds):
        cache.reset()
        mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=device)
        return inner(inputs_embeds=prompt, attention_mask=mask, use_cache=True, **cache_kw).last_hidden_state

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        prefill()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def layers(on: bool) -> None:
        set_prefill_compile(model, {"language"} if on else ())

    def whole(on: bool) -> None:  # (nn.Module.compile's attribute: None runs the module itself)
        set_prefill_compile(model, ())
        lm._compiled_call_impl = whole_model_call(lm) if on else None

    sides = {"compiled": layers} | ({"whole": whole} if args.whole else {})
    if args.whole:  # cold compiles on both sides: nothing from the other side's graphs or an earlier run
        import torch._inductor.config

        torch._inductor.config.fx_graph_cache = False
    found: dict = {}
    with torch.inference_mode():
        set_prefill_compile(model, ())
        want = prefill().float()
        moved = elementwise_bytes(prefill)
        for name, switch in sides.items():
            switch(True)
            found[f"{name}_compile_s"] = round(timed(), 1)
            found[f"{name}_max_abs_diff"] = (prefill().float() - want).abs().max().item()
            if args.whole:  # another prompt length
                start = time.perf_counter()
                prefill(longer)
                found[f"{name}_second_length_s"] = round(time.perf_counter() - start, 1)
            switch(False)
        times: dict = {"eager": [], **{name: [] for name in sides}}
        for _ in range(args.rounds):  # alternating: a machine that slows down slows every side
            set_prefill_compile(model, ())
            times["eager"].append(timed())
            for name, switch in sides.items():
                switch(True)
                times[name].append(timed())
                switch(False)
    eager, compiled = times["eager"], times["compiled"]
    if args.whole:
        found.update(whole_ms=round(1000 * min(times["whole"]), 2),
                     layers_vs_whole=round(min(times["whole"]) / min(times["compiled"]), 3))
    per_token_layer = moved / (args.batch * args.prompt * args.layers)
    full_layers = _full_layer_count(args.preset)
    print(json.dumps({
        "preset": args.preset, "layers": args.layers, "batch": args.batch, "prompt_tokens": args.prompt,
        "dtype": args.dtype, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "eager_elementwise_kb_per_token_layer": round(per_token_layer / 1024, 1),
        "eager_elementwise_gb_per_image": round(per_token_layer * args.prompt * full_layers / 1e9, 2),
        "full_model_layers": full_layers,
        "eager_ms": round(1000 * min(eager), 2), "compiled_ms": round(1000 * min(compiled), 2),
        "speedup": round(min(eager) / min(compiled), 3), "compile_s": found.pop("compiled_compile_s"),
        "max_abs_diff": found.pop("compiled_max_abs_diff"), "max_abs_output": want.abs().max().item(), **found}))
    return 0


def _full_layer_count(preset: str) -> int:
    from vlm_caption import tiny_model

    return int(tiny_model.PRESETS[preset]["text"]["num_hidden_layers"])


if __name__ == "__main__":
    sys.exit(main())
