"""The prefill compiled with the decode step (`--compile`): the vision tower, its projector, and the language
model over the prompt. Generate's decode steps were compiled first; the prefill is now most of an image's time.

Why: on an H100 a 4B image took ~36 ms at batch 256 (BENCHMARKS.md §6), of it
- SigLIP over 896 px = 4,096 patches 16.4 ms, its compute roof 5.5 ms. Run 3 timed the tower + projector alone
  at batch 64: 1.047 s eager, 0.889 s compiled (inductor, default mode), 1.18x, after a 28 s compile;
- the language model over the ~336-token prompt ~7 ms, its roof 2.2 ms. Eager, its elementwise ops (Gemma's
  RMSNorm upcasts to float32 in ~7 kernels, 6 norms a layer; rotary; GELU; residuals) move ~710 KB per token per
  layer (`benchmarks/bench_prefill.py` counts them): ~8.3 GB an image, ~3.3 ms of memory traffic that inductor
  fuses into a few passes.

How: each module gets a compiled call in place of its own (what `nn.Module.compile` sets): the weights keep
their names, and every caller (generate's prefill, continuous batching's chunk prefills, --vision-overlap's side
stream) goes through it. torch.compile's default mode, no CUDA graphs: a graph would keep a whole batch's
activations in its own memory pool.
- The tower and projector: the batch dimension is dynamic from the first call, so one graph serves every batch
  size a run meets (the last batch, the out-of-memory back-off, the retry of flagged captions); torch still
  compiles a batch of one row on its own (it specialises a size of 1). The tower is compiled layer by layer
  (its embeddings and final norm stay eager): its 27 encoder layers are the same code on other weights and
  share one graph, so compiling it does not grow with its depth (the 4B's tower on the CPU,
  `benchmarks/bench_tower_compile.py`: 3.6-4.3x faster to compile cold, 1-2 % slower to run; BENCHMARKS.md
  §6).
- The language model: compiled decoder layer by decoder layer, only in a prefill (a call over more than one
  token) into an empty cache, the only prefill a run makes; the code around the layers (rotary tables, the
  final norm) stays eager. Layers write the KV cache by their own index, on which dynamo would specialise each
  layer's graph (one graph per layer, then its recompile limit). So the compiled layer is handed a stand-in
  for the cache (`_KeptWrites`) that keeps its new keys and values and gives them back as the ones to attend
  over (what an empty cache holds once they are written), with the masks cut to the prompt's own keys; the
  layer's call then writes them into the real cache (static or dynamic), by index, outside the graph. Every
  layer, sliding or full, shares one graph whose batch and prompt length are dynamic from the first call: one
  for every batch shape, prompt length and kind of cache a run meets, one more for a single row (before: the
  whole model unrolled, up to 5 graphs a run; on the CPU at the 4B's 34 layers its cold compile took 7.1x as
  long, and layer by layer runs 1.4-1.8 % slower there: `benchmarks/bench_prefill.py --whole`, BENCHMARKS.md
  §6). A one-token call (an eager decode step) and a cache that already holds tokens
  run the module itself, as does a call traced from an outer compiled region (the decode step's own graph).

A failure: an error raised inside a compiled call is marked with its part (`failed_part`). The batch it broke
gives that part's compile up for the rest of the run (a warning with the compiler's own error) and runs again
at once with it eager (Captioner._generate, `eager_prefill_on_failure` elsewhere): a compile that does not work
on some card, torch or Triton costs one batch's retry, not the run, and no other part or speed-up (the other
prefill part, the decode step's FlexAttention) is blamed for it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
# Parts of the prefill -> Gemma 3's modules of each, under the inner model (`model.model`).
PARTS = {"vision": ("vision_tower", "multi_modal_projector"), "language": ("language_model",)}
PART_NAMES = {"vision": "vision tower", "language": "language model's prefill"}  # for the log
_RAISED_IN = "_raised_in_compiled_prefill"  # set on an error that left a compiled call: its part


def _modules(model, part: str) -> list:
    """The modules of `part` whose calls are replaced: the vision tower's encoder layers one by one (where it
    has them) and the projector; the language model (its call decides whether a prefill runs its layers
    compiled) and its decoder layers one by one."""
    inner = getattr(model, "model", model)
    found = []
    for module in (getattr(inner, name, None) for name in PARTS[part]):
        if module is None:
            continue
        if part == "vision":
            layers = getattr(getattr(module, "encoder", None), "layers", None)
            found.extend(layers if layers else [module])
        elif getattr(module, "layers", None):
            found.extend([module, *module.layers])
    return found


def set_prefill_compile(model, parts, options: dict[str, Any] | None = None) -> set[str]:
    """Compile the `parts` of `model`'s prefill (of PARTS) in place and run the others eagerly (an empty
    `parts`: all eager, e.g. a model an earlier Captioner compiled, in a benchmark); `options`: torch.compile's
    backend, for tests. Returns the parts that run compiled now. A model spread over devices by --device-map
    stays eager (accelerate moves weights in hooks around each module)."""
    from .model_loading import spread_over_devices
    from .static_decode import raise_recompile_limit

    spread = spread_over_devices(model)
    backend = (options or {}).get("backend", "inductor")
    if parts:  # the tower's and language model's layers and the projector may share a traced function
        raise_recompile_limit(needed=16)  # (transformers' wrapper): 6 graphs of it in a run (the tests)
    compiled = set()
    for part in PARTS:
        modules = _modules(model, part)
        on = part in parts and modules and not spread
        for module in modules:
            # (nn.Module.compile's attribute: None, __call__ runs the module itself)
            module._compiled_call_impl = _compiled_call(module, part, backend) if on else None
        if on:
            compiled.add(part)
        elif part in parts:
            log.info("%s: eager (%s)", PART_NAMES[part], "spread over devices" if spread else "the model has none")
    if compiled:
        names = ", ".join(PART_NAMES[part] for part in PARTS if part in compiled)
        log.info("compiled at its first batch: %s (%s)", names, getattr(backend, "__name__", backend))
    return compiled


def _compiled_call(module, part: str, backend):
    """`module`'s new call: compiled (a vision module, a decoder layer), or the language model's gate."""
    if part == "language":
        return _decoder_layer_call(module, backend) if _is_decoder_layer(module) else _language_model_call(module)
    import torch._dynamo

    compiled = _compile(module, part, backend)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced from an outer compiled region: the module itself
            return module._call_impl(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)  # (a size of 1 is specialised all the same)
        return compiled(*args, **kwargs)

    return call


def _compile(module, part: str, backend):
    """torch.compile of `module`'s own call, marking the errors it raises with `part`."""
    compiled = torch.compile(module._call_impl, backend=backend)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except RuntimeError as e:  # dynamo's and inductor's errors included
            setattr(e, _RAISED_IN, part)
            raise

    return call


def _is_decoder_layer(module) -> bool:
    return hasattr(module, "self_attn") and isinstance(getattr(module, "layer_idx", None), int)


_prefill = threading.local()  # .on: the language model's call on this thread is a prefill from an empty cache
_CACHE_KWARGS = ("cache", "past_key_values")  # the cache's keyword: transformers 5.2x, 5.17


def _language_model_call(module):
    """The language model's call: eager, its decoder layers compiled when it is a prefill (more than one token)
    into an empty cache, the only prefill a captioning run makes. Otherwise (a one-token call, an eager decode
    step; a cache already holding tokens; masks not passed in as 4D tensors) the module itself, layers eager."""
    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or not _is_prefill_from_empty(kwargs):
            return module._call_impl(*args, **kwargs)
        masks = kwargs.get("attention_mask")
        if isinstance(masks, dict):  # a static cache's masks span all its slots: the prompt's are the first ones
            length = kwargs["inputs_embeds"].shape[1]
            kwargs["attention_mask"] = {name: _mask_over(mask, length) for name, mask in masks.items()}
        _prefill.on = True
        try:
            return module._call_impl(*args, **kwargs)
        finally:
            _prefill.on = False

    return call


def _is_prefill_from_empty(kwargs: dict) -> bool:
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or embeds.shape[1] <= 1:  # not a prefill: a decode step (or ids only)
        return False
    cache = next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
    if cache is None:  # (the model builds masks over the prompt's keys)
        return True
    # With a cache, the masks as Gemma 3's outer model passes them, one per attention type (cut to the prompt's
    # keys by the caller); a mask the language model would build itself would span the cache's slots.
    masks = kwargs.get("attention_mask")
    if not isinstance(masks, dict) or not all(
            m is None or (isinstance(m, torch.Tensor) and m.dim() == 4) for m in masks.values()):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:  # a kind of cache this does not know
        return False
    if not layers or not getattr(layers[0], "is_initialized", False):
        return True
    return not bool(layers[0].get_seq_length())  # a static layer's is a tensor on the device: one wait a batch


def _mask_over(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """A 4D mask over the prompt's own keys (the first `length` slots), laid out as one built that size."""
    return mask if mask is None or mask.shape[-1] == length else mask[..., :length].contiguous()


class _KeptWrites:
    """The KV cache as a compiled decoder layer sees it in a prefill from an empty cache: keeps the layer's new
    keys and values, to be written into the real cache after the call, and gives them back as the ones to
    attend over (which is what an empty cache holds once they are written). The compiled layer then never
    touches the cache: it is the same code for every layer, where writing by the layer's own index made dynamo
    compile each layer on its own (BENCHMARKS.md §6)."""

    def __init__(self):
        self.kv = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.kv = (key_states, value_states)
        return key_states, value_states


def _decoder_layer_call(layer, backend):
    """A decoder layer's call: compiled in a prefill from an empty cache (`_language_model_call`), with the
    batch and the prompt length dynamic from the first call, so every layer of a kind shares a graph for every
    batch and prompt; otherwise the layer itself."""
    compiled = _compile(layer, "language", backend)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling() or not getattr(_prefill, "on", False):
            return layer._call_impl(*args, **kwargs)
        name = next((name for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)
        cache = kwargs.get(name) if name else None
        hidden = args[0] if args else kwargs["hidden_states"]
        length = hidden.shape[1]
        if cache is not None:
            writes = kwargs[name] = _KeptWrites()
        _mark_dynamic_size(length, (*args, *kwargs.values()))
        out = compiled(*args, **kwargs)
        if cache is not None and writes.kv is not None:
            cache.update(*writes.kv, layer.layer_idx)
        return out

    return call


def _mark_dynamic_size(size: int, values) -> None:
    """Mark the batch and every dimension of `size` (the prompt length) dynamic in the tensors among `values`,
    tuples of them included (the rotary cos and sin)."""
    import torch._dynamo

    for value in values:
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, torch.Tensor):
                for dim, length in enumerate(tensor.shape):
                    if length == size or (dim == 0 and length > 1):
                        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def compiled_parts(model) -> dict[str, str]:
    """How each part of `model`'s prefill runs, for run_summary.json: "compiled" or "eager"."""
    def how(part: str) -> str:
        return "compiled" if any(getattr(m, "_compiled_call_impl", None) for m in _modules(model, part)) else "eager"

    return {"vision_tower": how("vision"), "language_model_prefill": how("language")}


def failed_part(error: BaseException) -> str | None:
    """The part of the prefill whose compiled call raised `error` (out of memory excepted: a smaller batch's
    to fix), or None."""
    from .batch_size import is_out_of_memory

    return None if is_out_of_memory(error) else getattr(error, _RAISED_IN, None)


def give_up_prefill_compile(model, error: BaseException) -> bool:
    """A compiled part of the prefill failed a batch: the rest of the run runs that part eagerly. False when
    that part was not compiled (nothing changed: a retry would fail the same way)."""
    from .errors import described

    part = failed_part(error)
    modules = [m for m in _modules(model, part) if getattr(m, "_compiled_call_impl", None) is not None]
    if not modules:
        return False
    cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps the compiler's
    log.warning("%s: a batch failed with it compiled (%s); running it eagerly from now on "
                "(--compile off also skips the decode step's compile)", PART_NAMES[part], described(cause))
    for module in modules:
        module._compiled_call_impl = None
    return True


def eager_prefill_on_failure(model, fn: Callable[[], T]) -> T:
    """fn(); if a compiled part of the prefill failed it, fn() again with that part eager for the rest of the run
    (and once more if the other part then fails too)."""
    while True:  # at most once per part: each retry follows a part given up
        try:
            return fn()
        except RuntimeError as e:
            if failed_part(e) is None or not give_up_prefill_compile(model, e):
                raise
