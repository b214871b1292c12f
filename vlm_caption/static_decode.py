"""Static-shape decoding for Gemma 3: a static KV cache with every layer as full attention, and the decode
step compiled by transformers' own `generate` path (`CompileConfig` + a compileable cache).

Why: with the default dynamic cache every decode step `torch.cat`s the cache (18.6 % of decode time measured
here) and a 34-layer Gemma 3 step is ~3,500 small kernels, so eager decoding on an H100 is launch-bound. A
static cache lets `generate` compile the step (`mode="reduce-overhead"` = inductor + CUDA graphs: one
launch per step). Gemma 3's sliding-window cache layers defeat that: `StaticSlidingWindowLayer` keeps a
Python int (`cumulative_length_int`) that changes every step and feeds the mask sizes and
`get_seq_length()`, so the compiled step is re-specialised / its CUDA graph re-recorded as it grows.

The fix, exact when the whole sequence fits in the window (prompt + new tokens <= `sliding_window`, 1024
for Gemma 3): give generate a `StaticCache` built from a copy of the text config whose `layer_types` are all
"full_attention". Why that is the same arithmetic:

- a sliding layer attends to keys with `q - window < k <= q`. While every position is below the window
  (`L <= window`, so `q - window < 0 <= k`) that is exactly the causal mask `k <= q`;
- a sliding cache layer holds the last `window` tokens; with `L <= window` that is all of them, in order,
  the same keys and values a full layer holds (it never rolls);
- the *model* keeps its own config: Gemma 3 picks each layer's RoPE by `config.layer_types[i]` (local
  layers: theta 10k; global: theta 1M, linear x8) and builds both masks by layer type. Setting the model's
  own `layer_types` to full would give the local layers the global RoPE and change every logit (checked:
  max |d logit| 0.34 on the tiny preset, 0.83 on small). Only the cache is built from the copy; the
  sliding mask is then sized against a full cache layer (kv length = cache length, offset 0), which with
  `L <= window` equals the causal mask.

So every cache layer is a `StaticLayer` (a tensor `cumulative_length`, fixed `[batch, kv_heads, L, head_dim]`
buffers, constant mask sizes): one decode graph per batch shape, no SymInt inputs, identical greedy tokens
(tests/test_static_decode.py).

The cache is passed to `generate` as a user cache, not `cache_implementation="static"`: transformers
(5.17 to 5.24) builds a *new* `StaticCache` on every `generate` call, from the model's config (so with
sliding layers). New buffers every call mean new static input addresses: CUDA graphs re-record once per
batch, and on older torch the re-records count toward `cudagraph_unexpected_rerecord_limit` (128), after
which the step silently runs without CUDA graphs. `StaticDecode` keeps one cache per batch bucket and
`reset()`s it in place (zeroes the buffers, keeps their addresses). Batches are padded up to a bucket (the
run's batch size, else a power of two) so a short batch (failed images, the last one, an out-of-memory
halving) reuses a graph instead of compiling a new one; the pad rows are dropped afterwards. On a GPU a batch
the pipeline assembled is padded to the run's batch size however short (`bucket(fill=True)`): a new decode
step's graph compiles for ~90 s on an H100 (BENCHMARKS.md §6), a whole batch of pad rows decodes in ~10 s,
and needs no second cache beside the run's; and a smaller batch (a retry of flagged captions, a row alone) to
at least 64 rows (backends.GPU_MIN_BUCKET), not to 1, 2, 4 ... 32, each a compile of its own: below 64 rows a
step costs little less (run 3's compiled step at 64 rows took 9.67 ms, of which reading the rows' KV cache is
~1.4 ms; the weights' read and the kernels' launches are the same at any batch).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import COMPILE_CHOICES

log = logging.getLogger(__name__)


def compile_wanted(choice: str, device: torch.device) -> bool:
    """`--compile` auto/on/off -> whether to use the static, compiled decode. auto = on for CUDA only
    (CPU inductor compiles for minutes and the static cache was slower on CPU, BENCHMARKS.md section 2)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return device.type == "cuda"
    return choice == "on"


def sliding_window(model_config) -> int | None:
    """The text model's sliding window, or None when no layer is a sliding one."""
    text = model_config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    if window is None or (types and "sliding_attention" not in types):
        return None
    return int(window)


def full_attention_config(model_config):
    """A copy of the text config with every layer "full_attention" (for building the cache only)."""
    text = copy.deepcopy(model_config.get_text_config(decoder=True))
    text.layer_types = ["full_attention"] * int(text.num_hidden_layers)
    return text


def _cache_kwarg_name() -> str:
    """`generate`'s keyword for a user cache: `cache` from transformers 5.2x (`past_key_values` is then a
    deprecated alias), `past_key_values` before (5.17)."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", ["past_key_values"])
    return "cache" if "cache" in names else "past_key_values"


def make_compile_config(device: torch.device, *, backend: Any = "inductor", mode: str | None = None,
                        fullgraph: bool = False, force: bool = False):
    """transformers' `CompileConfig` for the decode step.

    `generate` compiles `model.__call__` for the decode steps only (prefill runs eagerly) when
    `_valid_auto_compile_criteria` holds: the device is cuda/xpu/tpu/neuron, or the compile config has
    `_compile_all_devices` set (what `force=True` does, for CPU tests), and the cache is compileable and
    not a `DynamicCache`. `get_compiled_call` then `torch.compile`s once per distinct `CompileConfig`.

    dynamic=False: every batch bucket gets its own fully static graph (a bounded set, see `bucket`),
    instead of one symbolic-batch graph after the second size. mode: "reduce-overhead" (CUDA graphs) on
    CUDA with inductor; None elsewhere (CUDA graphs are CUDA-only).
    """
    from transformers import CompileConfig

    if mode is None and device.type == "cuda" and backend == "inductor":
        mode = "reduce-overhead"
    # mode=None is torch.compile's default mode (the dataclass default would be "reduce-overhead").
    config = CompileConfig(fullgraph=fullgraph, dynamic=False, backend=backend, mode=mode)
    if force:
        config._compile_all_devices = True
    return config


@dataclass
class StaticDecode:
    """What `Captioner.generate` needs for static decoding; built by `prepare_static_decode`."""

    max_cache_len: int  # prompt tokens + max new tokens: the length of every cache buffer
    cache_config: Any  # the full-attention copy of the text config the caches are built from
    compile_config: Any | None  # transformers CompileConfig, or None = static cache without compiling
    reason: str
    caches: dict[int, Any] = field(default_factory=dict)  # bucket -> StaticCache, reused across calls
    run_batch: int = 0  # the largest batch seen: the usual bucket
    dtype: torch.dtype | None = None  # the language model's: the cache buffers' (None: at their first update)
    device: torch.device | None = None
    said_too_long: bool = False  # fits() logged a batch whose prompts the cache does not hold
    kv_fp8: bool = False  # --kv-cache-dtype fp8: the caches store float8 (kv_fp8.py)

    def fits(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a batch's prompts fit the caches (sized for the run's longest prompt); a longer templated
        prompt runs with the dynamic cache instead (said once)."""
        if prompt_tokens + new_tokens <= self.max_cache_len:
            return True
        if not self.said_too_long:
            log.info("a batch's prompts (%d tokens) are longer than the static cache holds; such batches decode "
                     "with the dynamic cache", prompt_tokens)
            self.said_too_long = True
        return False

    def configure(self, generation_config) -> None:
        """Set the run's GenerationConfig for static decoding (the cache itself goes in per call)."""
        generation_config.cache_implementation = None
        generation_config.compile_config = self.compile_config
        generation_config.disable_compile = self.compile_config is None

    def bucket(self, n: int, fill: bool = False, floor: int = 1) -> int:
        """The batch shape to run `n` rows as: the run's batch size if `n` is more than half of it (or at all,
        with `fill`: the last batch of a run on a GPU), else the smallest power of two >= n, and >= `floor`
        (a power of two; on a GPU the smaller shapes cost a compile each and hardly less a step). At most
        log2(batch) + 2 shapes (= graphs, = caches) per run."""
        self.run_batch = max(self.run_batch, n)
        power = max(1 << (n - 1).bit_length(), floor)
        return self.run_batch if fill or power >= self.run_batch else power

    @property
    def cache_name(self) -> str:
        """`generate`'s keyword for the cache (transformers 5.17: past_key_values, 5.2x: cache)."""
        return _cache_kwarg_name()

    def new_cache(self):
        """An empty StaticCache of the run's length, with float8 layers in an fp8-cache run."""
        from transformers import StaticCache

        from .kv_fp8 import fp8_cache

        cache = StaticCache(config=self.cache_config, max_cache_len=self.max_cache_len)
        return fp8_cache(cache) if self.kv_fp8 else cache

    def cache_for(self, batch: int) -> tuple[str, Any]:
        """(generate's keyword, a reset StaticCache for `batch` rows). Same object, same buffers each call."""
        cache = self.caches.get(batch)
        if cache is None:
            cache = self.new_cache()
            if self.dtype is not None:
                # Its buffers now, not at their first update: that is inside the compiled prefill
                # (prefill_compile.py), where transformers leaves their addresses unmarked as static, and a
                # decode step's CUDA graph needs them marked. (And the prefill's graph is the same every batch.)
                text = self.cache_config
                head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
                cache.early_initialization(batch, text.num_key_value_heads, head_dim, self.dtype, self.device)
            self.caches[batch] = cache
        else:
            cache.reset()  # zeroes the buffers in place: their addresses (CUDA graph inputs) stay put
        return _cache_kwarg_name(), cache

    def drop_caches(self) -> None:
        """Free every cache (after an out-of-memory error, before the caller retries with fewer rows) and
        forget the run's batch size, so no later batch is padded back up to the size that did not fit."""
        self.caches.clear()
        self.run_batch = 0


def prepare_static_decode(model, max_seq_len: int, *, compile: bool = True, backend: Any = "inductor",
                          mode: str | None = None, fullgraph: bool = False,
                          force_compile: bool = False) -> tuple[StaticDecode | None, str]:
    """(StaticDecode, reason) for a run whose sequences are at most `max_seq_len` tokens (prompt + max new
    tokens), or (None, reason) when the default dynamic cache must stay: the sequence would pass the
    sliding window, so a sliding layer would have to forget tokens a full layer keeps.

    `compile=False` gives the static cache without compiling (eager). `force_compile` compiles on devices
    transformers would not (CPU), for tests. The model keeps its config; only its `create_masks_for_generate`
    is overridden on the instance (`use_full_masks_when_exact`).
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    window = sliding_window(model.config)
    if window is not None and max_seq_len > window:
        return None, (f"prompt + max new tokens = {max_seq_len} > sliding window {window}: the static "
                      "full-attention cache would not be exact; keeping the dynamic cache")
    from .model_loading import spread_over_devices

    device = next(model.parameters()).device
    use_full_masks_when_exact(model, window)
    compile_config = None
    if compile:
        compile_config = make_compile_config(device, backend=backend, mode=mode, fullgraph=fullgraph,
                                             force=force_compile)
        raise_recompile_limit(needed=16)
        if device.type == "cuda":
            log.info("the first batch compiles the prefill (the vision tower's and the language model's layers), "
                     "and the first of each size the decode step, before it runs (H100, 256 rows: ~90 s the decode "
                     "step; the prefill ~140 s when each part was one graph, less now); --compile-cache keeps the "
                     "kernels for a relaunch")
    what = "compiled" if compile else "eager"
    window_text = f"<= sliding window {window}" if window is not None else "(no sliding layers)"
    reason = (f"static full-attention cache of {max_seq_len} tokens {window_text}, {what} decode"
              + (f" ({getattr(compile_config, 'backend', '')}, mode {getattr(compile_config, 'mode', None)})"
                 if compile else ""))
    return StaticDecode(max_cache_len=max_seq_len, cache_config=full_attention_config(model.config),
                        compile_config=compile_config, reason=reason, device=device,
                        # spread over devices: each layer's buffers on its own, at their first update (never
                        # traced there: the prefill stays eager, prefill_compile.py)
                        dtype=None if spread_over_devices(model) else _text_dtype(model)), reason


def _text_dtype(model) -> torch.dtype:
    """The dtype of the language model's weights: its keys and values are computed in it."""
    inner = getattr(model, "model", model)
    text = getattr(inner, "language_model", inner)
    return next(text.parameters()).dtype


def use_full_masks_when_exact(model, window: int | None) -> None:
    """Make `generate` build one causal mask per decode step, not also a sliding-window one, when the cache
    is a full-attention static cache no longer than the window (where both masks are the same).

    With a compileable cache, `generate` builds the 4D masks eagerly every step, outside the compiled graph
    (`prepare_inputs_for_generation` -> the model's `create_masks_for_generate`). For a config with sliding
    layers that is a full mask plus a sliding one made with an `and_mask_function`, which transformers
    builds with `torch.vmap` over 4 dimensions: the slowest thing in a compiled decode step on CPU
    (BENCHMARKS.md §6). On our caches every key is inside the window, so the sliding mask equals the full
    one and is not built, and the query (one generated text token) is in no image block, so Gemma 3's
    bidirectional image overlay adds nothing. Any other call (prefill, another cache) goes to the model's own
    function. Installed once per model instance; the class is not touched.
    """
    original = getattr(model, "create_masks_for_generate", None)
    if window is None or original is None or getattr(original, "full_masks_when_exact", False):
        return
    from transformers.masking_utils import create_causal_mask

    def create_masks_for_generate(**kwargs):
        name = "cache" if "cache" in kwargs else "past_key_values"  # transformers 5.2x renamed it
        cache, embeds = kwargs.get(name), kwargs.get("inputs_embeds")
        layers = getattr(cache, "layers", None) or []
        # One new text token per row (not the prefill): image-block overlays cannot apply to its query.
        exact = (layers and embeds is not None and embeds.shape[1] == 1 and not kwargs.get("is_first_iteration")
                 and all(not getattr(layer, "is_sliding", True)
                         and getattr(layer, "max_cache_len", window + 1) <= window for layer in layers))
        if not exact:
            return original(**kwargs)
        full = create_causal_mask(config=kwargs["config"].get_text_config(), inputs_embeds=embeds,
                                  attention_mask=kwargs.get("attention_mask"), position_ids=kwargs.get("position_ids"),
                                  **{name: cache})
        return {"full_attention": full, "sliding_attention": full}

    create_masks_for_generate.full_masks_when_exact = True
    model.create_masks_for_generate = create_masks_for_generate


def raise_recompile_limit(needed: int) -> None:
    """Dynamo keeps 8 graphs per function by default; buckets of a batch of 256 alone are 9 shapes.
    Past the limit dynamo runs the step eagerly (correct, slow), so make room; never lower it."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name, needed) < needed:
        setattr(config, name, needed)
