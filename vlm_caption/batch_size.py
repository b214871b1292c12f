"""How many images per `generate` call fit in device memory: a pure estimate from the model config.

Per row (image) of a batch, the memory that grows with the batch:

- **KV cache**: for each layer, keys + values = 2 x kv_heads x head_dim x tokens x dtype bytes, where tokens is
  the whole sequence (prompt + max new tokens) for a full-attention layer and min(sequence, sliding window)
  for a sliding layer, unless the static full-attention cache is on (static_decode.py: every layer then
  holds the whole sequence, which is <= the window anyway). Gemma 3 4B at 516 tokens in bf16: 71.9 MB; half
  that with `--kv-cache-dtype fp8` (kv_fp8.py: one byte an element, static cache only).
- **Activations**, whichever phase peaks higher (they do not overlap; the vision tower's activations are
  freed before the language model's prefill):
  - *vision*: SigLIP over the whole batch at once, at 896 px = 4,096 patches of hidden 1,152 and MLP
    width 4,304: live per layer about 6 x hidden (residual, norm, q, k, v, attention output) + 2 x MLP
    width (fc1 output and its GELU) per patch: 4,096 x 15,520 x 2 B = 127 MB per image in bf16. The 16 x
    4,096^2 attention scores (537 MB per image in bf16) are *not* counted: SDPA without a mask runs a
    flash / memory-efficient kernel on CUDA that never stores them (`vision_scores=True` counts them, for
    eager attention). The tower runs over at most VISION_CHUNK_ROWS images at a time (vision_chunks.py):
    then this is a fixed cost of one chunk, not a cost per row;
  - *prefill*: the prompt (256 image + ~60 text tokens) through one decoder layer at a time: 6 x hidden +
    3 x MLP width (gate, up, their product) per token; plus the attention mask (prompt x sequence bytes);
  - plus the pixel values themselves (3 x 896^2 x dtype bytes, alive for the whole call).
  With `--vision-overlap` (vision_ahead.py) the next batch's vision tower runs while this batch prefills or
  decodes: then vision (one chunk) + prefill, and two batches of pixel values.
- **Logits** of the last position: generate keeps a bf16 row and a float32 copy (+ the soft-capped
  copy), vocab 262,208: ~10 bytes x vocab per row (2.6 MB); sampling (temperature > 0) sorts, cumsums and
  indexes a float32 / int64 row several times: ~40 bytes x vocab instead.

What does not grow with the batch: the weights (`weight_bytes`), the CUDA context, compile workspace and
allocator slack, covered by `reserve_bytes` and the `safety` fraction; and, on a GPU, the static cache the
second tries of flagged captions keep beside the batch's (`retry_rows` rows of KV cache: retry_pool.py).

Measured on a CPU (BENCHMARKS.md §6, `benchmarks/bench_vision_chunks.py`, `bench_prefill_memory.py`), both
activation terms are upper bounds: the tower holds 0.80-0.84 of its term at its peak, the prompt's prefill 0.83 of
its term eager and 0.66 compiled layer by layer as `--compile` runs it.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch

from .backends import AUTO_BATCH_CAP

DEFAULT_RESERVE = 2 * 2**30  # CUDA context, cuBLAS workspace, compile / CUDA-graph pools, fragmentation
DEFAULT_SAFETY = 0.90  # use at most this fraction of what is left after the weights and the reserve
DEFAULT_TEXT_TOKENS = 64  # chat markup + a one-paragraph prompt (the default prompt is ~60 tokens)


@dataclass
class RowMemory:
    """Bytes per row (image) of a batch, by what holds them."""

    kv_cache: int
    vision: int
    prefill: int
    pixels: int
    logits: int
    vision_overlap: bool = False  # the next batch's vision tower runs beside this batch (vision_ahead.py)

    @property
    def total(self) -> int:
        """Bytes per row when the vision tower runs over the whole batch at once."""
        return self.batch_bytes(1)

    def batch_bytes(self, rows: int, vision_rows: int = 0) -> int:
        """Bytes of a batch of `rows` whose vision tower runs over at most `vision_rows` images at a time
        (0: all at once; vision_chunks.py): the tower's activations are then one chunk's, whatever the batch."""
        vision = self.vision * (min(rows, vision_rows) if vision_rows else rows)
        if self.vision_overlap:
            return rows * (self.kv_cache + self.prefill + 2 * self.pixels + self.logits) + vision
        return rows * (self.kv_cache + self.pixels + self.logits) + max(vision, rows * self.prefill)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def kv_cache_bytes_per_row(model_config, seq_len: int, dtype_bytes: int, static_full_attention: bool = False) -> int:
    """KV cache of one row holding `seq_len` tokens."""
    text = model_config.get_text_config(decoder=True)
    layers = int(text.num_hidden_layers)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    window = getattr(text, "sliding_window", None)
    tokens = 0
    for layer_type in types[:layers]:
        if layer_type == "sliding_attention" and window and not static_full_attention:
            tokens += min(seq_len, int(window))
        else:
            tokens += seq_len
    return 2 * kv_heads * head_dim * tokens * dtype_bytes


def row_memory(model_config, seq_len: int, dtype_bytes: int, *, static_full_attention: bool = False,
               prompt_tokens: int | None = None, sampling: bool = False, vision_scores: bool = False,
               vision_overlap: bool = False, kv_bytes: int | None = None) -> RowMemory:
    """Per-row memory of one `generate` call (see the module docstring for each term)."""
    text = model_config.get_text_config(decoder=True)
    vision = getattr(model_config, "vision_config", None)
    image_tokens = int(getattr(model_config, "mm_tokens_per_image", 0) or 0)
    if prompt_tokens is None:
        prompt_tokens = image_tokens + DEFAULT_TEXT_TOKENS
    hidden, mlp = int(text.hidden_size), int(text.intermediate_size)

    vision_bytes = pixels = 0
    if vision is not None:
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        vision_bytes = patches * (6 * int(vision.hidden_size) + 2 * int(vision.intermediate_size)) * dtype_bytes
        if vision_scores:
            vision_bytes += int(vision.num_attention_heads) * patches * patches * dtype_bytes
        pixels = int(getattr(vision, "num_channels", 3)) * int(vision.image_size) ** 2 * dtype_bytes
    prefill = prompt_tokens * (6 * hidden + 3 * mlp) * dtype_bytes + prompt_tokens * seq_len
    logits = int(text.vocab_size) * (40 if sampling else 10)
    kv_cache = kv_cache_bytes_per_row(model_config, seq_len, kv_bytes or dtype_bytes, static_full_attention)
    return RowMemory(kv_cache=kv_cache,
                     vision=vision_bytes, prefill=prefill, pixels=pixels, logits=logits, vision_overlap=vision_overlap)


def auto_batch_size(model_config, free_bytes: int, weight_bytes: int, seq_len: int, dtype_bytes: int,
                    cap: int = AUTO_BATCH_CAP, *, static_full_attention: bool = False, prompt_tokens: int | None = None,
                    sampling: bool = False, safety: float = DEFAULT_SAFETY, reserve_bytes: int = DEFAULT_RESERVE,
                    vision_scores: bool = False, vision_overlap: bool = False, vision_rows: int = 0,
                    retry_rows: int = 0, kv_bytes: int | None = None) -> int:
    """The largest power of two <= `cap` whose memory fits, at least 1.

    free_bytes: device memory free *before* the weights (e.g. the card's size, or `free_device_memory` before
    loading); when measured after loading, pass weight_bytes=0. seq_len: prompt tokens + max new tokens.
    vision_rows: the vision tower's chunk (vision_chunks.py; 0: the whole batch at once). retry_rows: the rows
    of the retries' own static cache, kept beside the batch's (0: none). kv_bytes: bytes of a cached key or
    value element (1 for an fp8 cache, kv_fp8.py; None: dtype_bytes). The budget is
    (free - weights - reserve - the retries' cache) x safety; the OOM back-off in the pipeline still catches
    what this misses.
    """
    if seq_len <= 0 or dtype_bytes <= 0 or cap < 1:
        raise ValueError(f"need seq_len > 0, dtype_bytes > 0, cap >= 1 (got {seq_len}, {dtype_bytes}, {cap})")
    per_row = row_memory(model_config, seq_len, dtype_bytes, static_full_attention=static_full_attention,
                         prompt_tokens=prompt_tokens, sampling=sampling, vision_scores=vision_scores,
                         vision_overlap=vision_overlap, kv_bytes=kv_bytes)
    budget = (free_bytes - weight_bytes - reserve_bytes - retry_rows * per_row.kv_cache) * safety
    rows = 1 << int(math.log2(cap))
    while rows > 1 and per_row.batch_bytes(rows, vision_rows) > budget:
        rows //= 2
    return rows


def parameter_bytes(model_config, dtype_bytes: int) -> int:
    """Bytes of the model's weights, counted on the meta device (no memory, no download)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def free_device_memory(device: torch.device | str) -> int:
    """Free bytes on `device`: for CUDA what the driver has free (`mem_get_info`) plus what torch's caching
    allocator holds but no tensor uses (blocks freed while loading: taken as used by the driver, yet torch
    reuses them first); for the CPU the available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf names on this platform
        return 0


# A library that allocates device memory outside torch's allocator reports a full card its own way: cuBLAS /
# cuBLASLt creating a handle or workspace on a new stream (the first GEMM on --vision-overlap's side stream or
# the decode stream) raises "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`";
# cuDNN says CUDNN_STATUS_ALLOC_FAILED. A smaller batch fixes those as it fixes torch.OutOfMemoryError.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "status_alloc_failed")


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or any(t in text for t in _OUT_OF_MEMORY_TEXTS)


def peak_device_memory(device: torch.device | str) -> dict[str, float]:
    """For run_summary.json on a GPU: the most memory tensors held at once in this process (torch's count: the
    caches, activations and CUDA graph pools, not the allocator's idle blocks), and the card's, in GiB; so a
    run at --batch-size auto shows how much room its batch left. {} elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "device_memory_gib": round(total / 2**30, 2)}


def free_accelerator_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
