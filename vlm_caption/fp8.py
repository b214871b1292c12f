"""`--quantize fp8`: the model's linear layers as FP8 GEMMs on an H100/H200 (or an Ada GPU): half the weight
memory, and perhaps speed.

Why: on an H100 a 4B image took ~36 ms at batch 256 in bf16 (BENCHMARKS.md §6 run 4), two thirds of it the
prefill, which is compute-bound: SigLIP's GEMMs over 4,096 patches and the language model's over the ~336-token
prompt. FP8 tensor cores do twice the bf16 FLOP/s (H100 SXM: 1,979 vs 989 TFLOP/s dense), and a decode step
reads half the weight bytes. Measured GEMM by GEMM on an H100 (run 5, `benchmarks/bench_fp8.py`), a layer
alone ran 0.52-0.77x bf16's speed in the tower (1152 and 4304 wide: the pass that scales and casts each input
costs what the narrow GEMM saves) and 0.48-1.50x in the language model (1.11x its prefill per image, the MLP's
2560 -> 10240 the best); the whole model is not timed yet, so it is off by default. Captions change: each GEMM's
inputs are rounded to 3 mantissa bits (a relative error of ~4 % per GEMM on random data, less on the trained
weights' smooth rows); so an fp8 run is a run of its own (its own run id, `quantize` recorded in run.json and
the card), never mixed with a bf16 run's captions.

How (what vLLM's `--quantization fp8` and torchao's dynamic float8 with per-row scales do): each weight is cast
once to float8_e4m3fn with one scale per output channel; at run time each activation row (a token) gets its own
scale from its absolute maximum, so one outlier token does not crush the others' precision; `torch._scaled_mm`
multiplies in FP8, accumulates in fp32 and writes bf16. Under --compile, inductor may fuse each activation's
max / scale / cast into the op before it (a norm, a GELU). The weights take half the memory: --batch-size auto
sizes batches from the free memory after quantizing.

Hand-written on the two built-ins it needs (float8 dtypes, `_scaled_mm`), as nanochat's fp8.py is: torchao and
fbgemm-gpu are large dependencies for ~60 lines, and transformers' FineGrainedFP8 fetches its kernel from the Hub
at run time (GPU hosts are often offline).

What stays in bf16: embeddings and lm_head (the logits), the multi-modal projector (a bare parameter), norms,
attention's own products and the KV cache; a layer whose sizes are not multiples of 16 (cuBLAS's FP8 rule).
"--quantize fp8-text" leaves the vision tower in bf16 too: where run 5's GEMMs lost, and where ViTs' outlier
channels (which per-row scales do not absorb) cost the most precision.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn  # 4 exponent, 3 mantissa bits: the forward-pass format (e5m2 is for gradients)
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # an all-zero row scales by this, not by zero
MULTIPLE = 16  # cuBLAS FP8 GEMMs need both weight dimensions to be multiples of 16
# What each --quantize choice (config.QUANTIZE_CHOICES) quantizes: modules under the inner model (`model.model`).
QUANTIZED_PARTS = {"none": (), "fp8": ("vision_tower", "language_model"), "fp8-text": ("language_model",)}
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first with FP8 tensor cores


def _row_scaled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in FP8, its scale per row as float32 [rows, 1]): x ~= fp8 * scale, each row's maximum at FP8_MAX.
    Scaled in x's own dtype, not a float32 copy: eager (--compile off, or a part given up) a float32 copy of
    SigLIP's activations at batch 256 is ~5 GB; bf16 keeps 8 mantissa bits, FP8 needs 3. The scale handed back
    is the exact reciprocal of the factor applied, rounded as it was."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY)
    factor = (FP8_MAX / amax).clamp(max=torch.finfo(x.dtype).max).to(x.dtype)
    fp8 = (x * factor).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # (a cast wraps past the range: clamp)
    return fp8, factor.float().reciprocal()


class Fp8Linear(nn.Module):
    """An nn.Linear's y = x W^T + b with W in FP8 (a scale per output channel) and x cast per row as it comes."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _row_scaled(linear.weight.detach())
        # Buffers, not parameters: model.parameters() (what the captioner reads the model's dtype and device
        # from) stays bf16, and nothing mistakes FP8 weights for trainable ones.
        self.register_buffer("weight", weight)  # [out, in]: its transpose is the column-major operand cuBLAS wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x8, x_scale = _row_scaled(rows)
        # use_fast_accum: Hopper's faster FP8 accumulation, the usual choice for inference
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=x.dtype,
                             use_fast_accum=True)
        if self.bias is not None:  # (added here, not by _scaled_mm: its bias is not supported with every output)
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass
class Fp8Report:
    """What quantize_fp8 did: for the log and the benchmarks."""

    parts: tuple[str, ...]
    layers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    kept: list[str] = field(default_factory=list)  # linear layers left in bf16, with why

    def describe(self) -> str:
        parts = " and ".join(part.replace("_", " ") for part in self.parts)
        text = (f"fp8 weights: {self.layers} linear layers of the {parts}, {self.bytes_before / 2**20:,.1f} MiB -> "
                f"{self.bytes_after / 2**20:,.1f} MiB")
        return text + (f"; {len(self.kept)} kept in bf16 ({self.kept[0]}{', ...' if len(self.kept) > 1 else ''})"
                       if self.kept else "")


def fp8_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why --quantize (fp8, fp8-text) cannot run on `device` in `dtype` (one line), or None. The CPU runs it
    (slowly: tests) where its torch has the row-wise kernel (2.13 has it; 2.11's CPU GEMM takes one scale a tensor)."""
    if device.type != "cuda":
        error = _gemm_error(device, dtype)
        return (f"--quantize: torch {torch.__version__} has no row-wise FP8 GEMM on {device.type} ({error}); "
                f"use --quantize none" if error else None)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return (f"--quantize needs FP8 tensor cores (an H100/H200, L4, L40S or RTX 40xx: compute capability "
                f"8.9+); {torch.cuda.get_device_name(device)} is {major}.{minor}: use --quantize none")
    if dtype != torch.bfloat16:  # row-wise scaled FP8 GEMMs write bf16 only
        return f"--quantize runs in bfloat16: use --dtype auto or bfloat16, not {str(dtype).split('.')[-1]}"
    error = _gemm_error(device, dtype)
    if error:
        return (f"--quantize: torch {torch.__version__} has no row-wise FP8 GEMM for "
                f"{torch.cuda.get_device_name(device)} ({error}); use --quantize none")
    return None


def _gemm_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """One tiny FP8 GEMM on `device`: the first line of its error, or None. A torch build may lack the
    row-wise kernel for a capability (it came to Hopper first)."""
    try:
        probe = Fp8Linear(nn.Linear(MULTIPLE, MULTIPLE, bias=False, device=device, dtype=dtype))
        probe(torch.ones(MULTIPLE, MULTIPLE, device=device, dtype=dtype))
    except RuntimeError as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def quantize_fp8(model, parts: tuple[str, ...] = QUANTIZED_PARTS["fp8"]) -> Fp8Report:
    """Replace the nn.Linear layers of `parts` of `model` (modules under `model.model`) by Fp8Linear, in place,
    one at a time (the peak is the bf16 model plus one layer). Call before compiling anything."""
    inner = getattr(model, "model", model)
    report = Fp8Report(parts=tuple(p for p in parts if getattr(inner, p, None) is not None))
    for part in report.parts:
        for name, module in list(getattr(inner, part).named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear:  # (an Fp8Linear already, or a subclass with its own forward)
                    continue
                where = f"{part}.{name}.{child_name}" if name else f"{part}.{child_name}"
                if child.in_features % MULTIPLE or child.out_features % MULTIPLE:
                    report.kept.append(f"{where}: {child.out_features}x{child.in_features} not multiples of {MULTIPLE}")
                    continue
                report.bytes_before += child.weight.numel() * child.weight.element_size()
                fp8 = Fp8Linear(child)
                report.bytes_after += fp8.weight.numel() + fp8.weight_scale.numel() * 4
                setattr(module, child_name, fp8)
                report.layers += 1
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()  # the bf16 weights' blocks go back to the driver (free memory sizes the batch)
    log.info("%s", report.describe())
    return report


def fp8_layers(model) -> int:
    """How many Fp8Linear layers `model` has (0: not quantized)."""
    return sum(isinstance(m, Fp8Linear) for m in model.modules())
