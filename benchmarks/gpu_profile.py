"""Where a batch's time goes on the card, by kind of kernel (gpu_check.py --profile KIND): one more batch of a
batched run under torch.profiler, and its prefill + first token alone, so the decode is their difference.

Why: run 5's batch of 256 took ~29.5 ms an image against 20 for the 50 img/s goal, and the split between the
vision tower, the language model's prefill and the decode (and, in the decode, attention against GEMMs) was
only estimated from separate runs at batch 64. This measures it at the batch the product runs, with what
that run compiled. The kernels inside CUDA-graph replays should be recorded one by one (CUPTI does on recent
CUDA); if not, the decode's kernel time reads far below its wall time, reported beside it.

Kinds, by kernel name (cuBLAS, cuDNN, flash and inductor's Triton names); on a CPU (--cpu-smoke) the aten
ops' own CPU time instead, by op name:
  attention     sdpa's kernels (flash, memory-efficient, cuDNN): the vision tower's, the prompt's
  gemm          cuBLAS / CUTLASS matrix multiplies (bf16, and FP8 `_scaled_mm`), the patch embedding's
                convolution; aten::mm / addmm / bmm
  triton_template  inductor's Triton templates: FlexAttention's kernels (default mode writes no GEMM templates)
  triton_fused  inductor's fused elementwise and reduction kernels (norms, rotary, GELU, residuals, argmax)
  aten          eager aten kernels (copies, fills, casts, elementwise, reductions); on a CPU every other op
  other         the rest
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

KINDS = (  # the first that matches; attention first: the memory-efficient kernel's name says "cutlass" too
    ("attention", re.compile(r"flash|fmha|sdpa|attention|aten::_scaled_dot_product", re.I)),
    ("gemm", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|conv|fprop|aten::(mm|addmm|bmm|_scaled_mm|matmul)$", re.I)),
    ("triton_template", re.compile(r"^triton_tem", re.I)),
    ("triton_fused", re.compile(r"^triton_(poi|red|per)|^cpp_fused", re.I)),
    ("aten", re.compile(r"elementwise|reduce|memcpy|memset|copy|fill|^aten::", re.I)),
)
TOP = 25  # kernels listed by name


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _kernel_us(prof, cuda: bool) -> dict[str, float]:
    """Microseconds by kernel (CUDA: every device kernel event, replays of CUDA graphs included) or by aten op
    (CPU: each op's self time, so nested ops are not counted twice)."""
    from torch.autograd import DeviceType

    times: dict[str, float] = defaultdict(float)
    if cuda:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                times[event.name] += event.time_range.elapsed_us()
    else:
        for event in prof.key_averages():
            if event.key.startswith("aten::") or event.key.startswith("cpp_fused"):
                times[event.key] += event.self_cpu_time_total
    return dict(times)


def _by_kind(times: dict[str, float], rows: int) -> dict[str, float]:
    kinds: dict[str, float] = defaultdict(float)
    for name, us in times.items():
        kinds[kind_of(name)] += us
    return {kind: round(us / 1000 / rows, 3) for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])}


def profile_batch(cap, keys: list, rows: list, sync, device, out: Path | None) -> dict:
    """ms an image by kind of kernel for the prefill + first token, the whole batch, and the decode (the
    difference), with each side's wall time; the top kernels of the whole batch to `out` (a text file)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = len(rows)

    @torch.inference_mode()  # (as Captioner.generate: the static cache's buffers are inference tensors)
    def prefill():
        from gpu_batched import first_token

        first_token(cap, cap.assemble(rows).inputs)

    measured = {}
    for side, fn in (("prefill", prefill), ("batch", lambda: cap.generate(keys, rows))):
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            sync()
            wall = time.perf_counter() - start
        measured[side] = (_kernel_us(prof, cuda), wall)
    (pre, pre_wall), (whole, whole_wall) = measured["prefill"], measured["batch"]
    kinds = {side: _by_kind(times, n) for side, times in (("prefill", pre), ("batch", whole))}
    decode = {kind: round(ms - kinds["prefill"].get(kind, 0.0), 3) for kind, ms in kinds["batch"].items()}
    result = {"rows": n, "timing": "device kernels" if cuda else "CPU time of aten ops",
              "prefill_ms_per_image": kinds["prefill"], "batch_ms_per_image": kinds["batch"],
              "decode_ms_per_image": decode,
              "wall_ms_per_image": {"prefill": round(1000 * pre_wall / n, 3), "batch": round(1000 * whole_wall / n, 3)},
              "kernel_ms_per_image": {side: round(sum(times.values()) / 1000 / n, 3)
                                      for side, times in (("prefill", pre), ("batch", whole))}}
    if out is not None:
        lines = [f"{'ms/img':>9}  {'kind':<17} kernel (the whole batch, prefill included)"]
        for name, us in sorted(whole.items(), key=lambda kv: -kv[1])[:TOP]:
            lines.append(f"{us / 1000 / n:9.3f}  {kind_of(name):<17} {name[:160]}")
        out.write_text("\n".join(lines) + "\n")
        result["top_kernels_file"] = out.name
    return result
