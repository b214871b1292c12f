"""`--kv-cache-dtype fp8`: the language model's keys and values cached as float8 e4m3, one byte each, not two.

Why: a decode step reads the whole KV cache in every layer. For the 4B at batch 256 that is 256 rows x 536
slots x 4 KV heads x 256 x 2 (keys and values) x 2 bytes = 562 MB a layer, 19 GB a step, against 7.8 GB of
weights. FlexAttention read it in 0.255 ms a layer on an H100 (BENCHMARKS.md §6 run 4): ~8.7 ms of a ~15.6 ms
step (run 5: ~12.2 ms of decode an image at 256 rows). In FP8 the cache is half those bytes, so about 4 ms less
a step if the kernel keeps its bandwidth (an estimate: ~1.1x an image, not measured on a card yet), and half
the memory a row needs, so `--batch-size auto` fits twice the rows up to its cap. vLLM's and SGLang's
`--kv-cache-dtype fp8` do the same.

How:
- The static cache's layers (static_decode.py's, and continuous.py's ring) hold float8_e4m3fn buffers. A step's
  keys and values are clamped to +-448 (e4m3's largest; a CUDA cast past it gives NaN, it has no infinity) and
  cast as they are written, by index assignment (index_put_: torch's index_copy_ has no float8 kernel, and
  under torch 2.11's inductor an index_copy_ through a uint8 view of the buffer copied the whole cache every
  step, which the assignment does not, tests/test_kv_fp8.py). Scale 1, as vLLM
  without calibrated scales: Gemma 3 normalises its keys (k_norm) and its values come from normalised hidden
  states. e4m3 keeps 3 mantissa bits (a rounding error of at most 1/16) from 2^-6 up to 448, fewer below.
- FlexAttention takes them as they are in a compiled CUDA step: its Triton kernel converts each block of keys
  and values to the query's dtype as it loads it (torch >= 2.11; where that fails, the batch's error turns
  flex off for the run: grouped_attention.give_up_flex). So `--decode-attention auto` takes flex for an fp8
  cache at any batch size there (a retry's 64 rows too), not from 128 rows only. Every other kernel (the
  grouped sdpa, transformers' sdpa for a prompt, any CPU kernel) gets them converted first: the same values,
  so the same attention.
- A batch on the dynamic cache (a prompt too long for the static one; a run without --compile, as on a CPU)
  rounds its keys and values through float8 in each attention call: the same values again, so a run's
  captions do not depend on which cache a batch took.
Captions change (keys and values keep 3 mantissa bits): like --quantize, an fp8 cache is a run of its own (its
run id, run.json and the card say so). The attention kernels doing this are grouped_attention.py's, so an fp8
cache needs them: --attn-implementation sdpa (the default).
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
MARK = "vlm_caption_kv_fp8"  # the text model's attention layers carry it True in an fp8 run (set_kv_fp8)


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """`x` in float8 e4m3, saturated at +-448 rather than NaN."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def use_kv_fp8(model, fp8: bool, grouped_attention: bool) -> bool:
    """A Captioner's choice: fp8 marks `model`'s attention layers (set_kv_fp8); without it any earlier mark goes.
    fp8 needs the grouped decode attention (grouped_attention.py), whose kernels read or convert float8:
    config.validate says so to a user before the model loads."""
    if fp8 and not grouped_attention:
        raise ValueError("an fp8 KV cache needs the grouped decode attention (--attn-implementation sdpa)")
    set_kv_fp8(model, fp8)
    return fp8


def warn_where_fp8_costs(static_cache: bool, device_type: str, decode_kernel: str) -> None:
    """One warning for an fp8 run where the float8 cache costs time instead of saving it."""
    if not static_cache:
        log.warning("--kv-cache-dtype fp8 without the static cache (--compile): keys and values are rounded at every "
                    "step, which costs time and saves no memory (0.73x on a CPU, BENCHMARKS.md §6)")
    elif device_type == "cuda" and decode_kernel == "sdpa":
        log.warning("--kv-cache-dtype fp8 with the grouped sdpa as the decode attention (--decode-attention sdpa, "
                    "or a card older than Hopper): each step converts the cache before reading it, slower than "
                    "the model's dtype; FlexAttention reads it as it is (--decode-attention auto)")


def set_kv_fp8(model, on: bool) -> int:
    """Mark (or unmark) the attention layers of `model`'s language model, so that a dynamic-cache batch rounds its
    keys and values as the fp8 cache stores them; the number of layers marked."""
    layers = [m for m in model.get_decoder().modules() if hasattr(m, "num_key_value_groups")]
    for layer in layers:
        setattr(layer, MARK, on)
    return len(layers)


def readable_kv(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(key, value) in the query's dtype for a kernel that cannot read float8: an fp8 cache's converted, a
    dynamic cache's of an fp8 run rounded through float8 (as that cache would have stored them), others as
    they are."""
    if key.dtype == FP8:
        return key.to(query.dtype), value.to(query.dtype)
    if getattr(module, MARK, False):
        return to_fp8(key).to(query.dtype), to_fp8(value).to(query.dtype)
    return key, value


def flex_reads_fp8(query: torch.Tensor) -> bool:
    """Whether FlexAttention takes float8 keys and values beside this query as they are: in a compiled CUDA
    step (inductor's Triton kernel); eager flex, and compiled on a CPU, want one dtype."""
    return query.is_cuda and torch.compiler.is_compiling()


def fp8_cache(cache):
    """`cache` (a StaticCache not yet written to) with every layer storing float8: Fp8StaticLayer."""
    layer_class = fp8_layer_class()
    for i, layer in enumerate(cache.layers):
        if layer.is_initialized:
            raise ValueError("fp8_cache takes a cache before its first update")
        cache.layers[i] = layer_class(layer.max_cache_len)
    return cache


def kv_fp8_problem() -> str | None:
    """Why this transformers cannot hold an fp8 cache (its StaticLayer is not the one Fp8StaticLayer extends:
    a `cumulative_length` tensor of positions written), or None."""
    from transformers.cache_utils import StaticLayer

    if isinstance(getattr(StaticLayer(1), "cumulative_length", None), torch.Tensor):
        return None
    import transformers

    return (f"--kv-cache-dtype fp8 needs a transformers whose StaticLayer counts its positions in "
            f"cumulative_length (5.17 to 5.24 do; this is {transformers.__version__})")


@functools.cache
def fp8_layer_class():
    """Fp8StaticLayer: transformers' StaticLayer with float8 buffers (defined at first use: transformers is
    imported lazily)."""
    from transformers.cache_utils import StaticLayer

    class Fp8StaticLayer(StaticLayer):
        """StaticLayer whose keys and values are float8 e4m3 (`update` returns them so: the attention kernel
        reads or converts them, readable_kv)."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            # StaticLayer allocates its buffers in the dtype of what it is given: empty float8 stand-ins.
            super().lazy_initialization(_empty_fp8_like(key_states), _empty_fp8_like(value_states))

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            new = key_states.shape[-2]
            at = torch.arange(new, device=self.device) + self.cumulative_length  # as StaticLayer.update
            self.cumulative_length.add_(new)
            self.keys[:, :, at] = to_fp8(key_states)  # (the module doc: why not index_copy_)
            self.values[:, :, at] = to_fp8(value_states)
            return self.keys, self.values

    return Fp8StaticLayer


def stored(buffer: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """`states` as they go into a cache `buffer` by assignment (continuous batching's copy of a prompt's keys):
    saturated float8 for an fp8 buffer, unchanged otherwise."""
    return to_fp8(states) if buffer.dtype == FP8 else states


def _empty_fp8_like(states: torch.Tensor) -> torch.Tensor:
    return states.new_empty((*states.shape[:-2], 0, states.shape[-1]), dtype=FP8)
