#!/usr/bin/env python3
"""Where a batch's time goes on a GPU: prefill vs each decode step, eager vs compiled, and why.

gpu_check.py measures whole batches; this splits them. On the real-size random-weight Gemma 3 4B (bf16,
built on the card), one batch of --batch images, one fixed prompt:

  (in this order: compiled, attention, vision, compiled_repeat_kv, graph, profile, prefill, eager, gil,
  hf_static; each is skipped once --budget-s is spent)

  split      generate at --short and --long new tokens (min = max): the difference / (long - short) is
             the time of one decode step, the rest of the short run is prefill (SigLIP + the prompt);
             for eager (dynamic cache), compiled (static full-attention cache, reduce-overhead) and graph
             (--decode-loop graph: the same cache, one compiled step per token, no host work between)
             compiled_repeat_kv: compiled again with transformers' own sdpa on the text model, which
             copies the KV cache per query head every step (grouped_attention.py does not)
  attention  one layer's decode attention alone at the batch, a 200-token run's cache and that rounded up
             to 64 slots (bench_attention.py): the grouped attention vs transformers' sdpa vs FlexAttention
             (auto's pick from 128 rows on CUDA) vs the grouped one pinned to the efficient, cuDNN and math
             sdpa kernels, compiled
  vision     the vision tower + projector alone on up to 64 images (its share of prefill): eager, eager on
             each sdpa kernel (flash, cuDNN, efficient), and compiled as --compile compiles it
  counters   torch._dynamo's inductor / graph-break / recompile counters after the compiled run (a
             CUDA-graph skip shows as inductor.cudagraph_skips; run with TORCH_LOGS=perf_hints to see why)
  profile    torch.profiler over a compiled generate of --profile-tokens tokens and over a prefill alone:
             the top ops by CPU time and by GPU time, and the CUDA runtime calls (cudaLaunchKernel vs
             cudaGraphLaunch per step) -> profile.txt
  prefill    the prefill and first token alone on up to 64 images (generate into the static cache, as the
             graph loop runs it), the language model eager vs compiled as --compile compiles it; the vision
             tower compiled on both sides
  gil        the compiled decode step again while --loader-threads threads decode JPEGs (the pipeline's
             loader): how much the generate loop slows when other Python threads want the GIL
  hf_static  transformers' own cache_implementation="static" + compile, for comparison (last; optional)

  TORCH_LOGS=perf_hints python benchmarks/decode_diag.py --out diag_out      # GPU, ~4 min
  python benchmarks/decode_diag.py --cpu-smoke --out diag_smoke              # tiny preset on CPU, seconds

Writes OUT/decode_diag.json (rewritten after each section) and OUT/profile.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_batched import PROMPT  # noqa: E402  (the same prompt as the GPU check)


SECTIONS = ("compiled", "attention", "vision", "compiled_repeat_kv", "graph", "profile", "prefill", "eager", "gil",
            "hf_static")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on the CPU (numbers mean nothing)")
    p.add_argument("--preset", default=None, help="tiny_model preset (default gemma-3-4b; tiny with --cpu-smoke; "
                   "small on the CPU gives a real-shaped, slower proxy)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (4 with --cpu-smoke)")
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=None, help="default 72 (16 with --cpu-smoke)")
    p.add_argument("--profile-tokens", type=int, default=12)
    p.add_argument("--loader-threads", type=int, default=None, help="default: cores - 1")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out (e.g. hf_static)")
    p.add_argument("--budget-s", type=float, default=None, help="start no section after this (default 240)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.batch = args.batch or (4 if smoke else 64)
    args.long = args.long or (16 if smoke else 72)
    args.budget_s = args.budget_s or (120 if smoke else 240)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from torch._dynamo.utils import counters

    import bench_attention
    from bench_loader import make_images, methods, run_once
    from vlm_caption import dataset, tiny_model
    from vlm_caption.atomic import atomic_write_bytes
    from vlm_caption.captioner import Captioner
    from vlm_caption.grouped_attention import set_grouped_decode_attention

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    preset = args.preset or ("tiny" if args.cpu_smoke else "gemma-3-4b")
    result: dict = {"env": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                            "torch": torch.__version__, "batch": args.batch, "short": args.short, "long": args.long,
                            "TORCH_LOGS": os.environ.get("TORCH_LOGS")}}

    def save() -> None:
        atomic_write_bytes(out / "decode_diag.json", (json.dumps(result, indent=1, default=str) + "\n").encode())

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    model, processor = tiny_model.build_random_model(preset, device=device, dtype=dtype, seed=0)
    result["env"]["attn_implementation"] = {
        "text": getattr(model.config.get_text_config(decoder=True), "_attn_implementation", None),
        "vision": getattr(model.config.vision_config, "_attn_implementation", None)}
    tmp = tempfile.TemporaryDirectory()
    sizes = (96, 200, 80, 160) if args.cpu_smoke else (1024, 3000, 768, 2000)
    paths = make_images(Path(tmp.name) / "art", 24 if not args.cpu_smoke else 6, seed=0, sizes=sizes)
    options = {"backend": "eager"} if args.cpu_smoke else {}

    # grouped: the decode attention (--decode-attention; "auto", the product's default: flex for compiled CUDA
    # steps of 128+ rows); False: transformers' own sdpa.
    def captioner(compile: str, max_tokens: int, decode_loop: str = "generate",
                  grouped: bool | str = "auto") -> Captioner:
        return Captioner(model, processor, model_name=preset, prompt=PROMPT, max_tokens=max_tokens,
                         min_tokens=max_tokens, compile=compile, compile_options=options, decode_loop=decode_loop,
                         grouped_attention=grouped)

    def run(cap: Captioner, tokens: int) -> float:
        cap.gen_config.max_new_tokens = cap.gen_config.min_new_tokens = tokens
        images = [cap.prepare(dataset.load_image(paths[i % len(paths)], cap.target_size)) for i in range(args.batch)]
        assembled = cap.assemble(images)
        sync()
        start = time.perf_counter()
        cap.generate([f"k{i}" for i in range(args.batch)], assembled)
        sync()
        return time.perf_counter() - start

    def split(cap: Captioner) -> dict:
        warm = run(cap, args.short)  # first kernels, compile + graph capture for compiled
        best_short = min(run(cap, args.short) for _ in range(2))
        best_long = min(run(cap, args.long) for _ in range(2))
        step = (best_long - best_short) / (args.long - args.short)
        return {"warmup_s": round(warm, 2), "short_s": round(best_short, 3), "long_s": round(best_long, 3),
                "decode_step_ms": round(1000 * step, 2), "prefill_s": round(best_short - args.short * step, 3),
                "img_s_at_200_tokens": round(args.batch / (best_short - args.short * step + 200 * step), 2)}

    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        if left() <= 0:
            result.setdefault("skipped", []).append(name)
            return
        t0 = time.monotonic()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - a diagnostic section's failure is recorded, the rest goes on
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[name + "_section_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps({name: result[name]}, default=str), flush=True)
        save()

    # The compiled path (the default on CUDA) and its profile first: a short budget still has them.
    compiled = captioner("on", args.long)
    section("compiled", lambda: {**split(compiled), "grouped_attention": compiled.grouped_attention,
                                 "cache": "static full-attention", "reason": compiled.static_decode
                                 and compiled.static_decode.reason})
    result["counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "graph_break", "stats",
                                                                           "recompiles", "frames")}
    save()
    # A 200-token run's cache (the pipeline's), and the same rounded up to 64 slots: whether the kernels
    # run faster on an aligned length (a mask row of 536 is not a multiple of 16) than on fewer slots.
    run_len = compiled.prompt_inputs["input_ids"].shape[-1] + 200
    section("attention", lambda: [row for slots in sorted({run_len, -(-run_len // 64) * 64})
                                  for row in bench_attention.measure(device.type, preset, [args.batch], cache_len=slots,
                                                                     rounds=3 if args.cpu_smoke else 5,
                                                                     backends=["math"] if args.cpu_smoke else None)])

    def best(fn) -> float:
        """The best of 3 timed calls of `fn`, after one untimed (first kernels, compilation)."""
        fn()
        times = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return min(times)

    def vision() -> dict:
        """The vision tower + projector alone (its share of prefill), on up to 64 images: eager, eager with
        torch's sdpa pinned to each attention kernel (SigLIP's 4,096-token attention is 38 % of its FLOP;
        torch's own pick is flash, or cuDNN on sm90 with a recent cuDNN), and compiled as --compile compiles it (prefill_compile.py)."""
        from bench_attention import SDPA_BACKENDS, one_line, pinned

        from vlm_caption import vision_attention
        from vlm_caption.prefill_compile import set_prefill_compile

        count = min(args.batch, 64)
        images = [compiled.prepare(dataset.load_image(paths[i % len(paths)], compiled.target_size))
                  for i in range(count)]
        pixels = compiled.assemble(images).inputs["pixel_values"]
        tower = lambda: model.get_image_features(pixel_values=pixels)  # noqa: E731
        set_prefill_compile(model, ())  # eager first: the compiled captioners above compiled it
        # --vision-attention auto's call (on a card) turns every kernel back on around the tower: each pinned
        # kernel below would time its pick. torch's own sdpa while they run, the captioner's call back after.
        encoder = vision_attention._encoder(model)
        kept = (encoder._compiled_call_impl, getattr(encoder, "_vision_attention", None)) if encoder else None
        vision_attention.set_vision_attention(model, "sdpa")

        def features(out) -> torch.Tensor:  # an output whose pooler_output is the projected image tokens
            return out if torch.is_tensor(out) else out.pooler_output

        kernels = {}
        with torch.inference_mode():
            reference = features(tower()).float()
            eager_s = best(tower)
            for name in ("flash", "cudnn", "efficient") if device.type == "cuda" else ("flash", "math"):
                on_kernel = pinned(tower, name)
                try:
                    diff = (features(on_kernel()).float() - reference).abs().max().item()
                    kernels[name] = {"ms_per_image": round(1000 * best(on_kernel) / count, 2), "max_abs_diff": diff}
                except Exception as e:  # noqa: BLE001 - a kernel that cannot take SigLIP's shapes is a finding
                    kernels[name] = {"error": one_line(e)}
            if kept is not None:
                encoder._compiled_call_impl, encoder._vision_attention = kept
            set_prefill_compile(model, {"vision", "language"}, options)  # as --compile leaves it
            graphs0 = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            tower()
            compile_s = time.perf_counter() - t0
            compiled_s = best(tower)
            # 0: an earlier section compiled the tower already (the batch dimension is dynamic: any size but 1)
            graphs = counters["stats"]["unique_graphs"] - graphs0
        assert set(kernels) <= set(SDPA_BACKENDS)
        return {"images": count, "vision_s": round(eager_s, 6), "vision_compiled_s": round(compiled_s, 6),
                "compile_s": round(compile_s, 1), "graphs_compiled": graphs, "speedup": round(eager_s / compiled_s, 2),
                "ms_per_image": round(1000 * eager_s / count, 2), "sdpa_kernels": kernels}

    section("vision", vision)

    section("compiled_repeat_kv", lambda: {**split(captioner("on", args.long, grouped=False)),
                                           "attention": "transformers' sdpa (repeat_kv every layer, every step)"})
    compiled.grouped_attention = set_grouped_decode_attention(model, "auto")  # the sections below: the default again
    graph = captioner("on", args.long, decode_loop="graph")
    section("graph", lambda: {**split(graph), "loop": "--decode-loop graph: generate's prefill, then one compiled "
                              "step per token (decode_loop.py)"})
    del graph

    def profile() -> dict:
        """Where the CPU and the card spend a compiled generate of --profile-tokens tokens, and a prefill alone
        (one token): the top ops by CPU time, by device time (CUDA), the runtime calls."""
        from torch.profiler import ProfilerActivity, profile as torch_profile

        if "compiled" in args.skip:
            run(compiled, args.short)  # compile + graph capture outside the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        found: dict = {}
        for name, tokens in (("generate", args.profile_tokens), ("prefill", 1)):
            with torch_profile(activities=activities) as prof:
                run(compiled, tokens)
            events = prof.key_averages()
            by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)
            by_device = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))
            tables = [events.table(sort_by="self_cpu_time_total", row_limit=30)]
            if device.type == "cuda":
                tables.append(events.table(sort_by="self_device_time_total", row_limit=30))
            with open(out / "profile.txt", "a" if found else "w") as f:
                f.write(f"== {name}: {tokens} new tokens, batch {args.batch}\n" + "\n".join(tables) + "\n")
            found[name] = {
                "tokens": tokens,
                "runtime_calls": {e.key: e.count for e in events if e.key.startswith((
                    "cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel", "cudaMemcpy", "cudaStreamSynchronize"))},
                "top_cpu_ms": [(e.key, round(e.self_cpu_time_total / 1000, 1), e.count) for e in by_cpu[:12]],
                "top_device_ms": [(e.key[:80], round(e.self_device_time_total / 1000, 1), e.count)
                                  for e in by_device[:15] if getattr(e, "self_device_time_total", 0) > 0]}
        return found

    section("profile", profile)

    def prefill() -> dict:
        """The prefill and first token alone (what the graph loop runs through generate per batch: vision tower,
        language model over the prompt, into the static cache) on up to 64 images, with the language model eager
        vs compiled as --compile compiles it (prefill_compile.py); the vision tower compiled on both sides."""
        from vlm_caption import vision_attention
        from vlm_caption.prefill_compile import set_prefill_compile

        count = min(args.batch, 64)
        images = [compiled.prepare(dataset.load_image(paths[i % len(paths)], compiled.target_size))
                  for i in range(count)]
        inputs = compiled.assemble(images).inputs
        first_token = compiled.first_token_config()

        def forward():
            name, cache = compiled.static_decode.cache_for(count)  # (reset)
            return compiled.model.generate(**inputs, generation_config=first_token, **{name: cache})

        graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        with torch.inference_mode():  # (the caches' buffers are inference tensors)
            set_prefill_compile(model, {"vision"}, options)
            want = forward()[:, -1]
            eager_s = best(forward)
            set_prefill_compile(model, {"vision", "language"}, options)
            sync()
            t0 = time.perf_counter()
            same = (forward()[:, -1] == want).float().mean().item()
            sync()
            compile_s = time.perf_counter() - t0
            compiled_s = best(forward)
        return {"images": count, "prompt_tokens": int(inputs["input_ids"].shape[-1]),
                "eager_ms_per_image": round(1000 * eager_s / count, 2),
                "compiled_ms_per_image": round(1000 * compiled_s / count, 2), "speedup": round(eager_s / compiled_s, 2),
                "compile_s": round(compile_s, 1), "same_first_token": round(same, 4),
                "graphs": counters["stats"]["unique_graphs"] - graphs0,
                "graph_breaks": sum(counters["graph_break"].values()) - breaks0}

    section("prefill", prefill)

    section("eager", lambda: split(captioner("off", args.long)))

    def gil() -> dict:
        """A compiled batch of --long tokens, quiet and while loader threads decode JPEGs: with the default
        GIL switch interval (5 ms), with 1 ms, and with 4 threads instead of all cores."""
        prepare, target = methods(896 if not args.cpu_smoke else 64, dtype, "cpu")["fast"]
        all_threads = args.loader_threads or max(1, (os.cpu_count() or 2) - 1)

        def with_loader(threads: int, switch_s: float | None) -> float:
            stop = threading.Event()

            def hammer():
                while not stop.is_set():
                    run_once(paths, prepare, target, threads=threads)

            default_switch = sys.getswitchinterval()
            worker = threading.Thread(target=hammer, daemon=True)
            worker.start()
            time.sleep(0.5)
            try:
                if switch_s is not None:
                    sys.setswitchinterval(switch_s)
                return run(compiled, args.long)
            finally:
                sys.setswitchinterval(default_switch)
                stop.set()
                worker.join()

        quiet = run(compiled, args.long)
        runs = {f"{all_threads}_threads": with_loader(all_threads, None),
                f"{all_threads}_threads_switch_1ms": with_loader(all_threads, 0.001),
                "4_threads": with_loader(4, None)}
        return {"quiet_s": round(quiet, 3), **{k: round(v, 3) for k, v in runs.items()},
                **{f"slowdown_{k}": round(v / quiet, 2) for k, v in runs.items()}}

    section("gil", gil)

    def hf_static() -> dict:
        from transformers import GenerationConfig

        cap = captioner("off", args.long)
        cap.gen_config = GenerationConfig(**{**cap.gen_config.to_dict(), "cache_implementation": "static"})
        return {**split(cap), "cache": "transformers' own static (sliding layers kept), compile auto"}

    section("hf_static", hf_static)
    result["total_s"] = round(time.monotonic() - started, 1)
    save()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
