"""gpu_check.py's batched runs: prepared pixel values through Captioner.generate, one warm-up batch then the
timed ones, for each kind of decode (eager, compiled, graph, graph_flex, prefill_eager, whole_tower, kv_fp8, fp8), then
for the kinds in --profile one more batch under the profiler (gpu_profile.py); and the fp8 runs' model,
quantized in place."""
from __future__ import annotations

import time
import traceback
from typing import Callable

# run_batched's, in the report's order
KINDS = ("eager", "compiled", "graph", "graph_flex", "prefill_eager", "whole_tower", "kv_fp8", "fp8")
PROMPT = ("Describe this artwork in detail: the subjects, the style and medium, the colour palette, the "
          "composition and the mood. Write one paragraph.")


class Clock:
    """Seconds inside model.generate, for the generate share."""

    def __init__(self, model, sync):
        self.model, self.sync, self.inside = model, sync, 0.0
        self.real = model.generate

    def __enter__(self):
        def timed_generate(*a, **kw):
            self.sync()
            start = time.perf_counter()
            try:
                return self.real(*a, **kw)
            finally:
                self.sync()
                self.inside += time.perf_counter() - start

        self.model.generate = timed_generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the instance attribute goes; the class method is back
        return False


def run_batched(model, processor, pixels: list, batch: int, args, *, kind: str, device, sync,
                timed: Callable[[dict], None] | None = None) -> dict:
    """kind: eager (dynamic cache), compiled (static cache, generate's compiled step) or graph (static cache,
    --decode-loop graph: generate's prefill, then decode_loop.GraphDecode's compiled steps); graph_flex and
    prefill_eager: graph with FlexAttention, the latter with the prefill (vision tower, language model) eager;
    whole_tower: graph_flex with the vision tower over the whole batch at once, not in chunks of
    --vision-chunk-rows images (vision_chunks.py); kv_fp8: graph_flex with --kv-cache-dtype fp8 (kv_fp8.py);
    fp8: graph_flex on the model quantize_for_fp8 quantized.
    timed(result): called with the timed batches' numbers before the profile (if any) runs, so that a caller
    can keep them should the profile outlast its time."""
    import torch
    from torch._dynamo.utils import counters

    from vlm_caption.captioner import Captioner
    from vlm_caption.prefill_compile import eager_prefill_on_failure

    compile = kind != "eager"
    flex = kind in ("graph_flex", "prefill_eager", "whole_tower", "kv_fp8", "fp8")
    graph = flex or kind == "graph"  # the graph decode loop
    options = {"backend": "eager"} if args.cpu_smoke and compile else {}
    if kind == "prefill_eager":  # (Captioner's A/B switches: the prefill stays eager, the decode is compiled)
        options.update(vision=False, language=False)
    cap = Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=args.new_tokens,
                    min_tokens=args.new_tokens, compile="on" if compile else "off", compile_options=options,
                    decode_loop="graph" if graph else "generate",
                    grouped_attention="flex" if flex else "sdpa", vision_attention=args.vision_attention,
                    vision_chunk_rows=0 if kind == "whole_tower" else args.vision_chunk_rows,
                    kv_cache_dtype="fp8" if kind == "kv_fp8" else "auto")
    rows = [pixels[i % len(pixels)] for i in range(batch)]
    keys = [f"img{i}" for i in range(batch)]
    report = cap.decoding_report(batch)
    prefill = {part: report[part] for part in ("vision_tower", "language_model_prefill")}
    result: dict = {"batch": batch, "cache": {"eager": "dynamic, eager", "compiled": "static full-attention, compiled",
                                              "graph": "static full-attention, graph decode loop, sdpa",
                                              "graph_flex": "graph decode loop, FlexAttention",
                                              "prefill_eager": "graph decode loop, FlexAttention, eager "
                                                               "prefill",
                                              "whole_tower": "graph decode loop, FlexAttention, the vision tower "
                                                             "over the whole batch at once",
                                              "kv_fp8": "graph decode loop, FlexAttention, float8 KV cache",
                                              "fp8": "graph decode loop, FlexAttention, FP8 linear layers "
                                                     f"(--quantize {args.fp8_quantize})"}[kind],
                    **prefill, "vision_chunk_rows": report["vision_chunk_rows"], "prefill_warmup_s": None}
    if compile and cap.static_decode is None:
        return {**result, "error": "static decode not available (sequence longer than the sliding window)"}
    try:
        if "compiled" in prefill.values() and cap.static_decode is not None:
            # Its compilation timed apart (one prefill and first token: no decode step), and kept out of
            # graphs_built (the decode step's).
            sync()
            start = time.perf_counter()
            inputs = cap.assemble(rows).inputs

            with torch.inference_mode():  # a part that fails to compile is given up, as in a run (a warning)
                eager_prefill_on_failure(model, lambda: first_token(cap, inputs))
            del inputs
            sync()
            result["prefill_warmup_s"] = round(time.perf_counter() - start, 2)
        graphs0 = counters["stats"]["unique_graphs"]
        breaks0 = sum(counters["graph_break"].values())
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        cap.generate(keys, rows)  # warm-up: first kernels, allocator growth, compilation + CUDA graph capture
        sync()
        result["warmup_s"] = round(time.perf_counter() - start, 2)
        tokens, wall = 0, 0.0
        with Clock(model, sync) as clock:
            for _ in range(args.timed_batches):
                sync()
                start = time.perf_counter()
                captions = cap.generate(keys, rows)
                sync()
                wall += time.perf_counter() - start
                tokens += sum(c.tokens for c in captions)
        n = batch * args.timed_batches
        result.update(img_s=round(n / wall, 3), tokens_s=round(tokens / wall, 1), timed_images=n,
                      s_per_batch=round(wall / args.timed_batches, 3),
                      # graph: model.generate runs the prefill only, so its share says nothing there
                      generate_share=None if graph else round(clock.inside / wall, 4))
        if device.type == "cuda":
            result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if compile:  # the decode step's graphs (the prefill's were built before the warm-up)
            result["graphs_built"] = counters["stats"]["unique_graphs"] - graphs0
            result["graph_breaks"] = sum(counters["graph_break"].values()) - breaks0
        report = cap.decoding_report(batch)  # as the timed batches ran: a compiled part that failed is eager now
        # (attention: a batch that failed on flex goes on with the grouped sdpa, grouped_attention.give_up_flex)
        result.update({part: report[part] for part in prefill}, vision_attention=report["vision_attention"],
                      attention=report["attention"], kv_cache_dtype=report["kv_cache_dtype"])
        if kind in args.profile and cap.static_decode is not None:  # one more batch, after the timed ones
            if timed is not None:
                timed(dict(result))
            result["profile"] = profiled(cap, keys, rows, sync, device, args, kind)
    except (RuntimeError, ValueError) as e:  # torch.OutOfMemoryError is a RuntimeError
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    finally:
        if cap.static_decode is not None:
            cap.static_decode.drop_caches()
        del cap
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def first_token(cap, inputs: dict):
    """The prefill and first token of an assembled batch, into the run's (reset) static cache: what the graph
    loop has generate do before its own steps."""
    name, cache = cap.static_decode.cache_for(inputs["input_ids"].shape[0])  # (reset)
    return cap.model.generate(**inputs, generation_config=cap.first_token_config(), **{name: cache})


def profiled(cap, keys, rows, sync, device, args, kind: str) -> dict:
    """gpu_profile.profile_batch, its failure reported in its place (the timed batches stand)."""
    from pathlib import Path

    from gpu_profile import profile_batch

    try:
        return profile_batch(cap, keys, rows, sync, device, Path(args.out) / f"profile_{kind}_{len(rows)}.txt")
    except Exception as e:  # noqa: BLE001 - a profiler that fails on this card costs this section only
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def quantize_for_fp8(model, processor, pixels: list, args, sync) -> dict:
    """The fp8 runs' model: every compiled graph dropped (they traced the bf16 layers), the prefill eager, then
    quantize_fp8 in place with the first new token's logits on 8 images before and after (bench_fp8.py)."""
    import torch
    from bench_fp8 import quantize_and_compare

    from vlm_caption.captioner import Captioner
    from vlm_caption.prefill_compile import set_prefill_compile

    torch._dynamo.reset()
    set_prefill_compile(model, ())
    cap = Captioner(model, processor, model_name=args.preset, prompt=PROMPT, max_tokens=1, decode_loop="generate")
    inputs = cap.assemble(pixels[:8]).inputs
    del cap
    drift = quantize_and_compare(model, inputs, sync, args.fp8_quantize)
    del inputs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return drift
