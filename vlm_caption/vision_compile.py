"""The vision tower compiled with the decode step (`--compile`): the larger half of the prefill.

Why: on an H100 a 4B image took ~36 ms at batch 256, 16.4 ms of it SigLIP over 896 px = 4,096 patches, its
compute roof 5.5 ms (BENCHMARKS.md §6). Run 3 timed the tower + projector alone at batch 64: 1.047 s eager,
0.889 s compiled (inductor, default mode), 1.18x, after a 28 s compile.

How: each of the tower and the projector gets a compiled call in place of its own (what `nn.Module.compile`
sets): the weights keep their names, and every caller (generate's prefill, continuous batching's chunk
prefills, --vision-overlap's side stream) goes through it. torch.compile's default mode, no CUDA graphs: a
graph would keep a whole batch's vision activations in its own memory pool. The batch dimension is marked
dynamic from the first call, so one graph serves every batch size a run meets (the last batch, the
out-of-memory back-off, the retry of flagged captions) and the graph a benchmark times is the one that runs;
torch still compiles a batch of one row on its own (it specialises a size of 1).

A failure: an error raised inside the compiled call is marked as the tower's (`tower_failed`). The batch it
broke gives the compiled tower up for the rest of the run (a warning with the compiler's own error) and runs
again at once with it eager (Captioner._generate, `eager_tower_on_failure` elsewhere): a compile that does
not work on some card, torch or Triton costs one batch's retry, not the run, and no other speed-up (the
decode step's FlexAttention) is blamed for it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
VISION_MODULES = ("vision_tower", "multi_modal_projector")  # Gemma 3's, under the inner model (get_image_features)
_RAISED_IN_TOWER = "_raised_in_compiled_vision_tower"  # set on an error that left the compiled call


def _modules(model) -> list:
    inner = getattr(model, "model", model)
    return [m for m in (getattr(inner, name, None) for name in VISION_MODULES) if m is not None]


def set_vision_compile(model, on: bool, options: dict[str, Any] | None = None) -> bool:
    """Compile `model`'s vision tower and projector in place (`on`; `options`: torch.compile's backend, for
    tests), or run them eagerly (a model that an earlier Captioner compiled, in a benchmark); True when they
    run compiled now. A model spread over devices by --device-map stays eager (accelerate moves weights in
    hooks around each module)."""
    modules = _modules(model)
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    if not on or not modules or spread:
        for module in modules:
            module._compiled_call_impl = None  # what nn.Module.compile sets; __call__ then runs the module itself
        if on:
            log.info("vision tower: eager (%s)", "spread over devices" if spread else "the model has none")
        return False
    backend = (options or {}).get("backend", "inductor")
    for module in modules:
        module._compiled_call_impl = _compiled_call(module, backend)
    log.info("vision tower: compiled (%s, at its first batch; a batch of one row once more)",
             getattr(backend, "__name__", backend))
    return True


def _compiled_call(module, backend):
    """`module`'s call compiled, with its inputs' batch dimension dynamic, marking the errors it raises."""
    import torch._dynamo

    compiled = torch.compile(module._call_impl, backend=backend)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced from an outer compiled region: the module itself
            return module._call_impl(*args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(value, 0)  # (a size of 1 is specialised all the same)
        try:
            return compiled(*args, **kwargs)
        except RuntimeError as e:  # dynamo's and inductor's errors included
            setattr(e, _RAISED_IN_TOWER, True)
            raise

    return call


def vision_compiled(model) -> bool:
    """Whether `model`'s vision tower runs compiled."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in _modules(model))


def tower_failed(error: BaseException) -> bool:
    """Whether `error` came out of the compiled vision tower (out of memory excepted: a smaller batch's to fix)."""
    from .batch_size import is_out_of_memory

    return bool(getattr(error, _RAISED_IN_TOWER, False)) and not is_out_of_memory(error)


def give_up_vision_compile(model, error: BaseException) -> None:
    """The compiled vision tower failed a batch: the rest of the run runs it eagerly."""
    from .errors import described

    cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps the compiler's
    log.warning("vision tower: a batch failed with the tower compiled (%s); running it eagerly from now on "
                "(--compile off also skips the decode step's compile)", described(cause))
    set_vision_compile(model, False)


def eager_tower_on_failure(model, fn: Callable[[], T]) -> T:
    """fn(); if the compiled vision tower failed it, fn() again with the tower eager for the rest of the run."""
    try:
        return fn()
    except RuntimeError as e:
        if not tower_failed(e):
            raise
        give_up_vision_compile(model, e)
        return fn()
