"""The GPU check's report: OUT/gpu_check.json (every section) and OUT/gpu_check.md (the table)."""
from __future__ import annotations

import json
from pathlib import Path

from gpu_batched import KINDS
from vlm_caption.atomic import atomic_write_bytes


def write(out: Path, result: dict) -> None:
    """Rewritten after every section: tmp + rename, so a timeout's kill mid-write keeps the sections before."""
    atomic_write_bytes(out / "gpu_check.json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out / "gpu_check.md", markdown(result).encode())


def markdown(r: dict) -> str:
    env, model = r.get("env", {}), r.get("model", {})
    lines = [f"GPU check: {env.get('device', '?')}, {model.get('preset', '?')} ({model.get('dtype', '?')}), "
             f"{model.get('new_tokens', '?')} new tokens, prompt {model.get('prompt_tokens', '?')} tokens; "
             f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}", "",
             "| run | batch | img/s | tokens/s | peak GPU mem | generate share | warm-up s | roof img/s | of roof |",
             "|---|---|---|---|---|---|---|---|---|"]
    roof = {x["batch"]: x for x in r.get("roofs", {}).get("by_batch", [])}
    loop = r.get("loop", {})
    if loop.get("img_s"):
        lines.append(f"| one-image loop | 1 | {loop['img_s']} | {loop['tokens_s']} | | | | | |")
    for kind in KINDS:
        for x in r.get(kind, []):
            if "error" in x:
                lines.append(f"| {kind} | {x['batch']} | {x['error']} | | | | | | |")
                continue
            rf = roof.get(x["batch"], {}).get("roof_img_s")
            mem = f"{x['peak_mem_gb']} GiB" if "peak_mem_gb" in x else ""
            share = f"{x['img_s'] / rf:.0%}" if rf else ""
            lines.append(f"| {kind} | {x['batch']} | {x['img_s']} | {x['tokens_s']} | {mem}"
                         f" | {'' if x['generate_share'] is None else format(x['generate_share'], '.1%')}"
                         f" | {x['warmup_s']} | {rf or ''} | {share} |")
    for key, label in (("pipeline", "whole pipeline, compiled"),
                       ("pipeline_overlap", "whole pipeline, compiled, --vision-overlap"),
                       ("pipeline_graph", "whole pipeline, --decode-loop graph"),
                       ("pipeline_overlap_graph", "whole pipeline, --decode-loop graph --vision-overlap")):
        pipe = r.get(key, {})
        if pipe.get("captioning_img_s"):
            # steady: the batches between the first (compilation) and the last (nothing left to overlap)
            rate = pipe.get("steady_img_s") or pipe["captioning_img_s"]
            which = "steady, batch 2 to n-1" if pipe.get("steady_img_s") else "after the first batch"
            rf = roof.get(pipe["batch"], {}).get("roof_img_s")
            share = f"{rate / rf:.0%}" if rf else ""
            tokens = round(rate * r.get("model", {}).get("new_tokens", 0), 1)
            lines.append(f"| {label} ({pipe['images']} images, {which}, {pipe.get('retried', '?')} retried)"
                         f" | {pipe['batch']} | {rate} | {tokens} | | {pipe['generate_share']:.1%}"
                         f" | | {rf or ''} | {share} |")
        elif pipe.get("error"):
            lines.append(f"| {label} | {pipe['batch']} | {pipe['error']} | | | | | | |")
    for name, loader in r.get("loader", {}).items():
        where = "resize on the CPU" if name == "fast" else "resize on the GPU"
        lines.append(f"| loader only, {where} ({loader['threads']} threads, {loader['cpu_ms_per_img']} CPU ms/img)"
                     f" | | {loader['img_s']} | | | | | | |")
    flop = r.get("flop_per_image", {})
    if flop:
        lines += ["", "FLOP per image: " + ", ".join(f"{k} {v / 1e12:.3g} T" for k, v in flop.items())]
    for kind in KINDS:
        for x in r.get(kind, []):
            if x.get("vision_attention"):  # vision_attention.py: the tower's kernel, and its timings for auto
                lines.append(f"vision attention, {kind} batch {x['batch']}: {x['vision_attention']}")
            if x.get("profile"):  # gpu_profile.py: ms an image by kind of kernel
                lines.append(f"profile, {kind} batch {x['batch']}: {x['profile']}")
    if r.get("fp8_weights"):
        lines.append(f"fp8 weights (the fp8 runs): {r['fp8_weights']}")
    if r.get("auto_batch_size"):
        lines.append(f"auto_batch_size picks: {r['auto_batch_size']}")
    if r.get("skipped"):
        lines.append(f"skipped: {r['skipped']}")
    return "\n".join(lines) + "\n"
